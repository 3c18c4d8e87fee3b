"""The Switch headline (Fedus et al. 2021, Fig. 1/4 and Table 1) where the diagnosis found it:
FLOP-matched Switch models (top-1, capacity factor 1.25, every FFN sparse) with 2-32 experts
against their dense twin, in the decoder-only regime of experiments/regime.py, three seeds.
The paper: quality per step improves steadily with the number of experts at fixed FLOPs per
token, and even 2 experts help.

    python -m experiments.headline          # 18 runs; see experiments/README.md for the time
"""
from __future__ import annotations

from experiments import regime, report, runner, scaling_experts

NAME = "headline"
SEEDS = (0, 1, 2)
EXPERTS = (2, 4, 8, 16, 32)
group = scaling_experts.group


def runs() -> list[runner.Run]:
    out = []
    for seed in SEEDS:
        common = {**regime.LM_OVERRIDES, "seed": seed}
        out.append(runner.Run(f"dense_s{seed}", "switch_tiny.py", {**common, **regime.LM_DENSE},
                              group="dense"))
        out += [runner.Run(f"switch_e{e}_s{seed}", "switch_tiny.py",
                           {**common, **regime.LM_SPARSE, "moe.num_experts": e}, group=group(e))
                for e in EXPERTS]
    return out


def findings(results: list[dict]) -> list[str]:
    groups = report.by_group(results)
    dense, experts = groups["dense"], tuple(e for e in EXPERTS if group(e) in groups)
    out = [report.compare(group(e), groups[group(e)], "dense", dense) for e in experts]
    upto16 = tuple(e for e in experts if e <= 16)  # the acceptance: monotone from 2 to at least 16
    if len(upto16) > 1:
        out.append(scaling_experts.monotone_in_experts(groups, upto16))
    out += [scaling_experts.reach_sentence(group(e), groups[group(e)], dense) for e in experts]
    missing = [r.name for r in runs() if r.name not in {x["name"] for x in results}]
    if missing:
        out.append(f"Not run yet: {', '.join(missing)} "
                   f"(`python -m experiments.{NAME}` runs what is missing); "
                   "the sentences above use the seeds that are done.")
    return out


def write_report(results: list[dict], out) -> None:
    report.plot_curves(report.by_group(results), out / "eval_loss.png",
                       "Switch in the decoder-only regime: number of experts")
    steps = results[0]["overrides"]["num_train_steps"]
    table = scaling_experts.results_table(results)
    (out / "README.md").write_text(f"""# The headline: Switch against its dense twin, decoder-only

Command: `python -m experiments.{NAME}` (results below are what it wrote).
A 4-layer decoder-only LM with every FFN a Switch layer (top-1, capacity factor 1.25, 2-32
experts) against its FLOP-matched dense twin (every FFN dense), in the regime of
[experiments/regime.py](../../regime.py) ({regime.LM_DESCRIPTION}); {steps} steps of 16 sequences on
the offline corpus, seeds {SEEDS}. Why this regime: [the diagnosis in the
regime](../diagnosis_regime/README.md). Eval loss is the token cross-entropy on the validation split.
Examples/s: two runs at once on the 2-core CPU, with other jobs on it for part of the time.

{table}

{report.findings_section(findings(results), f"experiments/{NAME}.py")}
![eval loss against step and training seconds](eval_loss.png)
""")


PARTIAL_REPORT = True  # the report uses the seeds that are done and names the missing runs


if __name__ == "__main__":
    runner.main(NAME, runs(), write_report, steps=regime.STEPS, eval_every=regime.EVAL_EVERY,
                partial=PARTIAL_REPORT)
