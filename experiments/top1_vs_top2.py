"""Experiment 2, top-1 against top-2 routing with capacity factors (Switch Transformer, Fedus et
al. 2021, Table 1): {top-1, top-2} x capacity factor {1.0, 1.25, 2.0}, top-2 with its gates
renormalized (GShard) and not (Flaxformer), against the dense baseline and a larger dense model,
in the decoder-only regime of experiments/regime.py, where the headline holds, three seeds.
The paper: top-2 is slightly better per step but slower; top-1 is faster and better per second;
a higher capacity factor drops fewer tokens at some speed cost.

    python -m experiments.top1_vs_top2
"""
from __future__ import annotations

import json

import numpy as np

from experiments import headline, regime, report, runner
from experiments.report import fmt

NAME = "top1_vs_top2"
SEEDS = (0, 1, 2)
FACTORS = (1.0, 1.25, 2.0)
# A larger dense model (the paper's T5-Large role): twice the regime's width, about 3x the FLOPs per token;
# one seed, as a reference line.
LARGER_DENSE = {"model.d_model": 128, "model.num_heads": 4, "model.d_ff": 512}
# The headline's runs of the same configs and seeds, reused rather than trained again.
SHARED = {"dense": f"{headline.NAME}/dense", "top1_cf1.25": f"{headline.NAME}/switch_e8"}
SPEED = runner.RESULTS / NAME / "speed.json"  # written by experiments/top1_vs_top2_speed.py


def _run(group: str, seed: int, overrides: dict) -> runner.Run:
    shared = f"{SHARED[group]}_s{seed}" if group in SHARED else ""
    return runner.Run(f"{group}_s{seed}", "switch_tiny.py", overrides, group=group, same_as=shared)


def _top1(cf: float, seed: int, common: dict) -> runner.Run:
    overrides = {**common, "moe.num_experts": 8}
    if cf != 1.25:  # the headline's setting, spelled as it spells it
        overrides.update({"moe.k": 1, "moe.train_capacity_factor": cf})
    return _run(f"top1_cf{cf}", seed, overrides)


def _seed_runs(seed: int) -> list[runner.Run]:
    common = {**regime.LM_OVERRIDES, "seed": seed}
    sparse = {**common, **regime.LM_SPARSE}
    out = [_run("dense", seed, {**common, **regime.LM_DENSE})]
    for cf in FACTORS:
        out.append(_top1(cf, seed, sparse))
        for renorm in (False, True):
            # token-major fill: the causal decoder refuses rank-major order with two choices and dropping
            out.append(_run(f"top2_cf{cf}" + ("_renorm" if renorm else ""), seed,
                            {**sparse, "moe.num_experts": 8, "moe.k": 2, "moe.train_capacity_factor": cf,
                             "moe.order": "token_major", "moe.renormalize": renorm}))
    return out


def runs() -> list[runner.Run]:
    dense = {**regime.LM_OVERRIDES, "seed": 0, **regime.LM_DENSE}
    larger = runner.Run("dense_large", "switch_tiny.py", {**dense, **LARGER_DENSE})
    return [larger] + [run for seed in SEEDS for run in _seed_runs(seed)]


def _mean(rs: list[dict], key: str) -> float | None:
    values = [r[key] for r in rs if r[key] is not None]
    return float(np.mean(values)) if values else None


def threshold(groups: dict[str, list[dict]]) -> float:
    """The quality threshold every sparse model reaches: the worst seed-mean final eval loss of them."""
    return max(float(np.mean(report.final_losses(rs))) for name, rs in groups.items()
               if name.startswith("top"))


def seconds_to(rs: list[dict], line: float) -> float | None:
    """Mean over the seeds of the training seconds to eval loss <= line (None if a seed never gets there)."""
    reach = [report.time_to_reach(r, line) for r in rs]
    return None if None in reach else float(np.mean(reach))


def _speeds() -> dict[float, dict]:
    """The interleaved bench run's figures by capacity factor (experiments/top1_vs_top2_speed.py)."""
    if not SPEED.exists():
        return {}
    return {r["capacity_factor"]: r for r in json.loads(SPEED.read_text())["results"]}


def _speed(r: dict | None) -> str:
    """Top-2's training throughput against top-1's at one capacity factor."""
    if r is None:
        return "top-2's speed against top-1's not measured yet (`python -m experiments.top1_vs_top2_speed`)"
    return (f"top-2 trains at {r['top2_over_top1_tokens_per_s']:.2f}x top-1's tokens/s "
            f"({r['top2_step_ms']:.0f} against {r['top1_step_ms']:.0f} ms a step, both timed interleaved "
            "in one process)")


def _time_to_threshold(groups: dict[str, list[dict]], speeds: dict[float, dict]) -> str:
    """Top-1 against top-2 at each capacity factor to the threshold: the first evaluated step at which the
    seed-mean eval loss is at or below it, times the step time of the pair's interleaved bench run (the
    pairs were timed at different moments, so only the two of a pair compare)."""
    line = threshold(groups)
    if not speeds:
        return f"Time to eval loss {line:.4f}: not measured yet (`python -m experiments.top1_vs_top2_speed`)."
    pairs = []
    for cf, r in speeds.items():
        one, two = (report.first_step_at_or_below(groups[f"top{k}_cf{cf}"], line) * r[f"top{k}_step_ms"] / 1e3
                    for k in (1, 2))
        pairs.append(f"at cf {cf} top-1 {one:.0f} s, top-2 {two:.0f} s")
    return (f"Time to eval loss {line:.4f} (the worst sparse seed-mean final loss), as the first evaluated "
            f"step at or below it times the pair's interleaved step time: {'; '.join(pairs)}.")


def findings(results: list[dict]) -> list[str]:
    groups, speeds = report.by_group(results), _speeds()
    out = []
    for cf in FACTORS:
        top1 = groups[f"top1_cf{cf}"]
        for variant in (f"top2_cf{cf}", f"top2_cf{cf}_renorm"):
            out.append(f"cf {cf}: " + report.compare(variant, groups[variant], f"top1_cf{cf}", top1))
        top2 = groups[f"top2_cf{cf}"]
        out.append(f"cf {cf}: {_speed(speeds.get(cf))}; top-1 drops {_mean(top1, 'dropped_fraction'):.1%} "
                   f"of its assignments in training, top-2 {_mean(top2, 'dropped_fraction'):.1%}.")
    out.append(_time_to_threshold(groups, speeds))
    out.append(_against_dense(groups))
    missing = [r.name for r in runs() if r.name not in {x["name"] for x in results}]
    if missing:
        out.append(f"Not run yet: {', '.join(missing)} (`python -m experiments.{NAME}` runs what is "
                   "missing); the sentences above use the seeds that are done.")
    return out


def _against_dense(groups: dict[str, list[dict]]) -> str:
    """How many sparse models end below the dense twin, and by how many pooled seed sd (same seeds)."""
    sparse = [n for n in groups if n.startswith("top")]
    gaps = {}
    for name in sparse:
        a, b = (report.final_losses(x) for x in report.common_seeds(groups[name], groups["dense"]))
        sd = report.pooled_sd(a, b)
        gaps[name] = (float(np.mean(b) - np.mean(a)), sd)
    below = [n for n, (gap, _) in gaps.items() if gap > 0]
    spread = [n for n, (gap, sd) in gaps.items() if sd is not None and gap > 3 * sd]
    with_sd = sum(sd is not None for _, sd in gaps.values())
    larger = groups["dense_large"][0]["final_eval_loss"]
    return (f"{len(below)} of {len(sparse)} sparse models end below the FLOP-matched dense model (over "
            f"the seeds both have); {len(spread)} of the {with_sd} with a seed spread lead it by more than 3 "
            f"pooled seed sd. The larger dense model (one seed) ends at {larger:.4f}.")


def _rows(groups: dict[str, list[dict]], line: float) -> list[list[str]]:
    rows = []
    for name, rs in groups.items():
        rows.append([name, len(rs), report.mean_std(report.final_losses(rs)),
                     report.mean_std([r["final_eval_accuracy"] for r in rs]),
                     fmt(_mean(rs, "examples_per_sec"), ".1f"),
                     "never" if (t := seconds_to(rs, line)) is None else f"{t:.0f}",
                     *(fmt(_mean(rs, key), ".3f") for key in ("dropped_fraction", "eval_dropped_fraction")),
                     fmt(_mean(rs, "max_mean_load"), ".2f")])
    return rows


def write_report(results: list[dict], out) -> None:
    groups = report.by_group(results)
    report.plot_curves(groups, out / "eval_loss.png", "top-1 vs top-2")
    line = threshold(groups)
    steps = results[0]["overrides"]["num_train_steps"]
    table = report.markdown_table(
        ["run", "seeds", f"eval loss at step {steps} (mean ± sd)", "eval accuracy", "examples/s",
         f"seconds to eval loss <= {line:.4f} (worst sparse)", "dropped (train)", "dropped (eval, cf 2.0)",
         "max/mean load"], _rows(groups, line))
    shared = sorted({r["same_as"].rsplit("_s", 1)[0] for r in results if r.get("same_as")})
    (out / "README.md").write_text(f"""# Experiment 2: top-1 vs top-2, capacity factors

Command: `python -m experiments.{NAME}` (results below are what it wrote).
The headline's decoder-only model (4 layers, every FFN sparse, 8 experts) with top-1 or top-2
routing and training capacity factor 1.0, 1.25 or 2.0 (evaluation always 2.0); top-2 fills
buffers token-major (causal decoder) with its two gates renormalized to sum to 1 (`_renorm`,
GShard/Mixtral) or kept as probabilities (Flaxformer/V-MoE). `dense` is the FLOP-matched dense
twin of top-1, `dense_large` a dense model of twice the width (about 3x the FLOPs), one seed.
Regime: {regime.LM_DESCRIPTION} ([experiments/regime.py](../../regime.py)). {steps} steps of 16
sequences, seeds {SEEDS}. `dense` and `top1_cf1.25` are the [headline](../headline/README.md)'s runs
{", ".join(f"`{name}_s*`" for name in shared)} (same config and seeds), reused. Examples/s: training
throughput on this 2-core CPU, compile excluded, two runs at a time with other jobs on the machine
for part of the time, so examples/s and the seconds-to-threshold column compare the runs only
roughly (quality per step is unaffected); the speed sentences below come from
`python -m experiments.top1_vs_top2_speed`, which times top-2 and top-1 steps interleaved in one
process ([speed.json](speed.json)). Dropped: fraction of routed assignments beyond capacity,
mean over MoE layers (train: last quarter of training; eval: final evaluation).

{table}

{report.findings_section(findings(results), f"experiments/{NAME}.py")}
![eval loss against step and training seconds](eval_loss.png)
""")


PARTIAL_REPORT = True  # the report uses the seeds that are done and names the missing runs

if __name__ == "__main__":
    runner.main(NAME, runs(), write_report, steps=regime.STEPS, eval_every=regime.EVAL_EVERY,
                partial=PARTIAL_REPORT)
