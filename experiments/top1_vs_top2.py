"""Experiment 2, top-1 against top-2 routing with capacity factors (Switch Transformer, Fedus et
al. 2021, Table 1): {top-1, top-2} x capacity factor {1.0, 1.25, 2.0}, top-2 with its gates
renormalized (GShard) and not (Flaxformer), against the dense baseline and a larger dense model,
in the decoder-only regime of experiments/regime.py, where the headline holds.
The paper: top-2 is slightly better per step but slower; top-1 is faster and better per second;
a higher capacity factor drops fewer tokens at some speed cost.

    python -m experiments.top1_vs_top2
"""
from __future__ import annotations

from experiments import headline, regime, report, runner
from experiments.report import fmt

NAME = "top1_vs_top2"
FACTORS = (1.0, 1.25, 2.0)
# A larger dense model (the paper's T5-Large role): twice the regime's width, about 3x the FLOPs per token.
LARGER_DENSE = {"model.d_model": 128, "model.num_heads": 4, "model.d_ff": 512}
# The headline's seed-0 runs of the same configs, reused rather than trained again.
SHARED = {"dense": f"{headline.NAME}/dense_s0", "top1_cf1.25": f"{headline.NAME}/switch_e8_s0"}


def _top1(cf: float, common: dict) -> runner.Run:
    overrides = {**common, "moe.num_experts": 8}
    if cf != 1.25:  # the headline's setting, spelled as it spells it
        overrides.update({"moe.k": 1, "moe.train_capacity_factor": cf})
    return runner.Run(f"top1_cf{cf}", "switch_tiny.py", overrides, same_as=SHARED.get(f"top1_cf{cf}", ""))


def runs() -> list[runner.Run]:
    common = {**regime.LM_OVERRIDES, "seed": 0}
    dense = {**common, **regime.LM_DENSE}
    sparse = {**common, **regime.LM_SPARSE}
    out = [runner.Run("dense", "switch_tiny.py", dense, same_as=SHARED["dense"]),
           runner.Run("dense_large", "switch_tiny.py", {**dense, **LARGER_DENSE})]
    for cf in FACTORS:
        out.append(_top1(cf, sparse))
        for renorm in (False, True):
            # token-major fill: the causal decoder refuses rank-major order with two choices and dropping
            out.append(runner.Run(f"top2_cf{cf}" + ("_renorm" if renorm else ""), "switch_tiny.py",
                                  {**sparse, "moe.num_experts": 8, "moe.k": 2,
                                   "moe.train_capacity_factor": cf, "moe.order": "token_major",
                                   "moe.renormalize": renorm}))
    return out


def threshold(results: list[dict]) -> float:
    """The quality threshold every sparse run reaches: the worst sparse final eval loss."""
    return max(r["final_eval_loss"] for r in results if r["name"].startswith("top"))


def _seed_scale(by: dict) -> list[str]:
    """The seed spread these one-seed gaps are read against: the headline family's, in the same regime,
    whose seed-0 dense and Switch-8 runs are this experiment's dense and top1_cf1.25."""
    family = runner.load_results(headline.NAME, headline.runs(), True)
    if not family:
        return []
    sd = report.pooled_sd(*(report.final_losses(g) for g in report.by_group(family).values()))
    gaps = [abs(by[f"top2_cf{cf}{v}"]["final_eval_loss"] - by[f"top1_cf{cf}"]["final_eval_loss"])
            for cf in FACTORS for v in ("", "_renorm")]
    over = [sum(g > n * sd for g in gaps) for n in (1, 3)]
    return [f"For scale: the headline family in the same regime has a pooled seed sd of {sd:.4f} in final "
            f"eval loss; of the {len(gaps)} top-2 minus top-1 gaps above, {over[0]} exceed 1 sd and "
            f"{over[1]} exceed 3 sd."]


def findings(results: list[dict]) -> list[str]:
    by = {r["name"]: r for r in results}
    out = []
    for cf in FACTORS:
        top1 = by[f"top1_cf{cf}"]
        for variant in (f"top2_cf{cf}", f"top2_cf{cf}_renorm"):
            out.append(f"cf {cf}: " + report.compare(variant, [by[variant]], top1["name"], [top1]))
        speed = by[f"top2_cf{cf}"]["examples_per_sec"] / top1["examples_per_sec"]
        out.append(f"cf {cf}: top-2 trains at {speed:.2f}x top-1's examples/s; top-1 drops "
                   f"{top1['dropped_fraction']:.1%} of its assignments in training, top-2 "
                   f"{by[f'top2_cf{cf}']['dropped_fraction']:.1%}.")
    line = threshold(results)
    reach = {r["name"]: report.time_to_reach(r, line) for r in results}
    fastest = min((n for n in reach if reach[n] is not None), key=lambda n: reach[n])
    out.append(f"Fastest in wall clock to eval loss {line:.4f} (the worst sparse final loss): {fastest}, "
               f"in {reach[fastest]:.0f} training seconds.")
    out += _seed_scale(by)
    sparse = [r for r in results if r["name"].startswith("top")]
    beat = [r["name"] for r in sparse if r["final_eval_loss"] < by["dense"]["final_eval_loss"]]
    out.append(f"{len(beat)} of {len(sparse)} sparse runs end below the FLOP-matched dense model "
               f"({by['dense']['final_eval_loss']:.4f}); the larger dense model ends at "
               f"{by['dense_large']['final_eval_loss']:.4f}.")
    return out


def write_report(results: list[dict], out) -> None:
    groups = report.by_group(results)
    report.plot_curves(groups, out / "eval_loss.png", "top-1 vs top-2")
    line = threshold(results)
    rows = []
    for r in results:
        reach = report.time_to_reach(r, line)
        rows.append([r["name"], fmt(r["final_eval_loss"], ".4f"), fmt(r["final_eval_accuracy"], ".4f"),
                     fmt(r["examples_per_sec"], ".1f"), "never" if reach is None else f"{reach:.0f}",
                     fmt(r["dropped_fraction"], ".3f"), fmt(r["eval_dropped_fraction"], ".3f"),
                     fmt(r["max_mean_load"], ".2f")])
    steps = results[0]["overrides"]["num_train_steps"]
    table = report.markdown_table(
        ["run", f"eval loss at step {steps}", "eval accuracy", "examples/s",
         f"seconds to eval loss <= {line:.4f} (worst sparse final)", "dropped (train)",
         "dropped (eval, cf 2.0)",
         "max/mean load"], rows)
    (out / "README.md").write_text(f"""# Experiment 2: top-1 vs top-2, capacity factors

Command: `python -m experiments.{NAME}` (results below are what it wrote).
The headline's decoder-only model (4 layers, every FFN sparse, 8 experts) with top-1 or top-2
routing and training capacity factor 1.0, 1.25 or 2.0 (evaluation always 2.0); top-2 fills
buffers token-major (causal decoder) with its two gates renormalized to sum to 1 (`_renorm`,
GShard/Mixtral) or kept as probabilities (Flaxformer/V-MoE). `dense` is the FLOP-matched dense
twin of top-1, `dense_large` a dense model of twice the width (about 3x the FLOPs). Regime:
{regime.LM_DESCRIPTION} ([experiments/regime.py](../../regime.py)). {steps} steps of 16 sequences,
seed 0. `dense` and `top1_cf1.25` are the [headline](../headline/README.md)'s seed-0 runs
{", ".join(f"`{r['same_as']}`" for r in results if r.get("same_as"))} (same config and seed),
reused. Examples/s: training throughput on this 2-core CPU, compile excluded, two runs at a time
with other jobs on the machine for part of the time, so examples/s and the seconds-to-threshold
column compare the runs only roughly (quality per step is unaffected). Dropped: fraction of
routed assignments beyond capacity, mean over MoE layers (train: last quarter of training; eval:
final evaluation).

{table}

{report.findings_section(findings(results), f"experiments/{NAME}.py")}
![eval loss against step and training seconds](eval_loss.png)
""")


if __name__ == "__main__":
    runner.main(NAME, runs(), write_report, steps=regime.STEPS, eval_every=regime.EVAL_EVERY)
