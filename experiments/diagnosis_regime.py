"""Diagnosis, second stage: why Switch still does not beat its dense twin in the headline regime
(experiments/regime.py, 1,500 steps), one run or pair per hypothesis, each judged against the
scaling family's pooled seed sd in the same regime. The regime's own pair is scaling_experts'
seed-0 dense and Switch-8 runs, read from its committed results.

    python -m experiments.diagnosis_regime

What the first stage left: the router's distribution stays close to uniform (mean entropy about
ln E), so every expert's output is scaled by a gate near 1/E and a token's expert can change
from step to step. Hypotheses:
- scaled_gates: DeepSeek-V2's routed_scaling_factor = E, so a uniform router's gate is 1 and the
  experts start at the dense FFN's output scale (Switch scales by the raw probability);
- router_init_1.0: the router at 1.0x variance in the regime, so its logits start spread out;
- lm_*: the tiny-scale study's setting (arXiv 2605.13769: decoder-only LM, 4 experts top-2,
  softmax over the chosen as in Mixtral, every FFN sparse, matched active parameters): a 4-layer
  decoder, every position a target, experts of half the dense FFN width so two of them cost what
  the dense FFN does; also 8 such experts, and Switch (8 full-width experts, top-1) in every layer.
"""
from __future__ import annotations

import math

from experiments import diagnosis, regime, report, runner, scaling_experts
from experiments.report import fmt

NAME = "diagnosis_regime"
SEED = 0
LM = regime.LM
HALF_TOP2 = {"model.decoder_moe_every": 1, "moe.k": 2, "moe.d_ff": regime.WIDTH["moe.d_ff"] // 2,
             "moe.renormalize": True, "moe.order": "token_major"}
# hypothesis -> (its dense twin: a run name here or in scaling_experts, changes to the sparse run)
HYPOTHESES = {
    "regime": ("scaling_experts/dense_s0", None),
    "scaled_gates": ("scaling_experts/dense_s0", {"moe.routed_scaling_factor": 8.0}),
    "router_init_1.0": ("scaling_experts/dense_s0", {"moe.router_init_scale": 1.0}),
    "lm_top2_of_4_half": ("lm_dense", {**LM, **HALF_TOP2, "moe.num_experts": 4}),
    "lm_top2_of_8_half": ("lm_dense", {**LM, **HALF_TOP2, "moe.num_experts": 8}),
    "lm_switch8_every": ("lm_dense", {**LM, "model.decoder_moe_every": 1}),
}
DENSE_RUNS = {"lm_dense": {**LM, "model.decoder_moe_every": 0}}


def runs() -> list[runner.Run]:
    base = {**regime.OVERRIDES, "seed": SEED}
    out = [runner.Run(name, "switch_tiny.py", {**base, **changes}) for name, changes in DENSE_RUNS.items()]
    out += [runner.Run(name, "switch_tiny.py", {**base, **sparse})
            for name, (_, sparse) in HYPOTHESES.items() if sparse is not None]
    return out


def _scaling(name: str) -> dict | None:
    found = runner.load_results(scaling_experts.NAME, [r for r in scaling_experts.runs() if r.name == name])
    return found[0] if found else None


def pair(results: list[dict], name: str) -> tuple[dict, dict] | None:
    """(dense twin, sparse run) of a hypothesis, or None while either is missing."""
    by_name = {r["name"]: r for r in results}
    dense_name, sparse = HYPOTHESES[name]
    dense = _scaling(dense_name.split("/")[1]) if "/" in dense_name else by_name.get(dense_name)
    sparse_run = _scaling("switch_e8_s0") if sparse is None else by_name.get(name)
    return None if dense is None or sparse_run is None else (dense, sparse_run)


def noise_level() -> float:
    """The scaling family's pooled seed sd of final eval loss, in the same regime and step count."""
    scaling = runner.load_results(scaling_experts.NAME, scaling_experts.runs())
    return report.pooled_sd(*(report.final_losses(g) for g in report.by_group(scaling).values()))


def entropy_ratio(run: dict) -> float | None:
    """Mean router entropy over the last quarter of training, as a fraction of ln E (1 = uniform)."""
    entropy = run.get("router_entropy")
    experts = run["overrides"].get("moe.num_experts", 8)
    return None if entropy is None else entropy / math.log(experts)


def findings(results: list[dict]) -> list[str]:
    noise = noise_level()
    done = [name for name in HYPOTHESES if pair(results, name) is not None]
    out = [f"{name}: {diagnosis.verdict(*pair(results, name), noise)}." for name in done]
    outside = [name for name in done if -diagnosis.gap(*pair(results, name)) > noise]
    if outside:
        out.append(f"Sparse ahead of its dense twin by more than the seed spread: {', '.join(outside)}; "
                   "experiments/headline.py redoes the headline with three seeds in regime.py's decoder-only "
                   "regime (the lm_switch8_every setting).")
    pending = [name for name in HYPOTHESES if name not in done]
    if pending:
        out.append(f"Not run yet: {', '.join(pending)} "
                   f"(`python -m experiments.{NAME}` runs what is missing).")
    return out


def write_report(results: list[dict], out) -> None:
    rows, groups, noise = [], {}, noise_level()
    for name in HYPOTHESES:
        found = pair(results, name)
        if found is None:
            continue
        dense, sparse = found
        groups[f"{name}: dense"], groups[f"{name}: sparse"] = [dense], [sparse]
        changes = HYPOTHESES[name][1]
        flags = " ".join(f"--config.{k}={v}" for k, v in (changes or {}).items()) or "(the regime)"
        rows.append([name, f"`{flags}`", dense["name"], fmt(dense["final_eval_loss"], ".4f"),
                     fmt(sparse["final_eval_loss"], ".4f"), fmt(diagnosis.gap(dense, sparse), "+.4f"),
                     fmt(entropy_ratio(sparse), ".3f"), fmt(sparse["dropped_fraction"], ".3f"),
                     diagnosis.verdict(dense, sparse, noise)])
    report.plot_curves(groups, out / "eval_loss.png", "diagnosis in the regime")
    table = report.markdown_table(["hypothesis", "changes from the regime (sparse run)", "dense twin",
                                   "dense", "sparse", "sparse - dense", "router entropy / ln E",
                                   "dropped (train)", "verdict"], rows)
    (out / "README.md").write_text(f"""# Diagnosis in the regime

Command: `python -m experiments.{NAME}` (results below are what it wrote; the verdicts are computed
by experiments/{NAME}.py from the runs' JSON). Every run is switch_tiny in the regime of
[regime.py](../../regime.py) ({regime.DESCRIPTION}), {regime.STEPS} steps, seed {SEED}, changed as
the second column says; each is judged against the scaling family's pooled seed sd in final eval loss
({noise:.4f}). Router entropy is the mean per-token entropy of the router's distribution over the
last quarter of training, divided by ln E (1: uniform).

{table}

{report.findings_section(findings(results), f"experiments/{NAME}.py")}
![eval loss of each pair](eval_loss.png)
""")


PARTIAL_REPORT = True  # the report names the runs still missing


if __name__ == "__main__":
    runner.main(NAME, runs(), write_report, steps=regime.STEPS, eval_every=regime.EVAL_EVERY,
                partial=PARTIAL_REPORT)
