"""Experiment 1, scaling the number of experts (Switch Transformer, Fedus et al. 2021, Fig. 1/4):
a dense model and FLOP-matched Switch models with 2-32 experts (top-1, capacity factor 1.25),
same steps, 3 seeds each, in the regime the diagnosis settled on (experiments/regime.py). The
paper: at a fixed number of steps quality improves steadily with the number of experts, at the
same FLOPs per token, and a sparse model reaches the dense model's quality in fewer steps.

    python -m experiments.scaling_experts            # 18 runs; see experiments/README.md for the time
"""
from __future__ import annotations

from experiments import regime, report, runner
from experiments.report import fmt, mean_std

NAME = "scaling_experts"
SEEDS = (0, 1, 2)
EXPERTS = (2, 4, 8, 16, 32)
DENSE = {"model.encoder_moe_every": 0, "model.decoder_moe_every": 0}


def group(e: int) -> str:
    return f"switch {e} experts"


def runs() -> list[runner.Run]:
    out = []
    for seed in SEEDS:
        out.append(runner.Run(f"dense_s{seed}", "switch_tiny.py", {**regime.OVERRIDES, **DENSE, "seed": seed},
                              group="dense"))
        for e in EXPERTS:
            out.append(runner.Run(f"switch_e{e}_s{seed}", "switch_tiny.py",
                                  {**regime.OVERRIDES, "seed": seed, "moe.num_experts": e}, group=group(e)))
    return out


def monotone_in_experts(groups: dict[str, list[dict]], experts: tuple[int, ...]) -> str:
    """Whether the mean final loss falls with E, each step up judged against the pooled seed sd."""
    worse = []
    for lo, hi in zip(experts, experts[1:]):
        a, b = (report.final_losses(rs) for rs in report.common_seeds(groups[group(lo)], groups[group(hi)]))
        rise, sd = sum(b) / len(b) - sum(a) / len(a), report.pooled_sd(a, b)
        if rise > (sd or 0.0):
            spread = "one seed each: no seed spread" if sd is None else f"pooled seed sd {sd:.4f}"
            worse.append(f"{lo} -> {hi} experts worsens it by {rise:.4f} ({spread})")
    span = f"from {experts[0]} to {experts[-1]} experts"
    first, last = (report.final_losses(rs) for rs in report.common_seeds(groups[group(experts[0])],
                                                                           groups[group(experts[-1])]))
    net, sd = sum(last) / len(last) - sum(first) / len(first), report.pooled_sd(first, last)
    spread = "one seed each" if sd is None else f"pooled seed sd {sd:.4f}"
    change = f"{span} the final eval loss changes by {net:+.4f} ({spread})"
    if worse:
        return f"Not monotone: {change}, and " + "; ".join(worse) + "."
    return (f"Monotone within the seed spread (no step up in experts worsens it by more than one sd): "
            f"{change}.")


def reach_sentence(name: str, runs: list[dict], dense: list[dict]) -> str:
    """When `runs` (seed mean) first reach the dense model's final loss, over the seeds both have."""
    runs, dense = report.common_seeds(runs, dense)
    target = sum(report.final_losses(dense)) / len(dense)
    steps = dense[0]["overrides"]["num_train_steps"]
    step = report.first_step_at_or_below(runs, target)
    ahead = report.overtakes(runs, dense)
    lead = "never ends ahead of dense" if ahead is None else f"stays ahead of dense from step {ahead} on"
    if step is None:
        return f"{name} does not reach dense's final eval loss ({target:.4f}) in {steps} steps and {lead}."
    return (f"{name} reaches dense's final eval loss ({target:.4f}) at step {step} of {steps} "
            f"({steps / step:.2f}x fewer steps) and {lead}.")


def findings(results: list[dict]) -> list[str]:
    groups = report.by_group(results)
    dense, experts = groups["dense"], tuple(e for e in EXPERTS if group(e) in groups)
    out = [report.compare(group(e), groups[group(e)], "dense", dense) for e in experts]
    out.append(monotone_in_experts(groups, tuple(e for e in experts if e <= 16)))
    out += [reach_sentence(group(e), groups[group(e)], dense) for e in experts]
    missing = [r.name for r in runs() if r.name not in {x["name"] for x in results}]
    if missing:
        out.append(f"Not run yet: {', '.join(missing)} (`python -m experiments.{NAME}` runs what is "
                   "missing); "
                   "the sentences above use the seeds that are done.")
    return out


def results_table(results: list[dict]) -> str:
    """Per group: seeds, final eval loss, its gap to dense over the same seeds, accuracy, speed, drops."""
    groups = report.by_group(results)
    rows = []
    for name, rs in groups.items():
        ours, dense = (report.final_losses(x) for x in report.common_seeds(rs, groups["dense"]))
        rows.append([name, len(rs), mean_std(report.final_losses(rs)),
                     fmt(sum(ours) / len(ours) - sum(dense) / len(dense), "+.4f"),
                     mean_std([r["final_eval_accuracy"] for r in rs]),
                     fmt(sum(r["examples_per_sec"] for r in rs) / len(rs), ".1f"),
                     fmt(sum(r["dropped_fraction"] or 0 for r in rs) / len(rs), ".3f")])
    steps = results[0]["overrides"]["num_train_steps"]
    return report.markdown_table(["model", "seeds", f"eval loss at step {steps} (mean ± sd)",
                                  "vs dense (same seeds)",
                                  "eval accuracy", "examples/s", "dropped (train)"], rows)


def write_report(results: list[dict], out) -> None:
    report.plot_curves(report.by_group(results), out / "eval_loss.png", "Switch: number of experts")
    steps = results[0]["overrides"]["num_train_steps"]
    table = results_table(results)
    (out / "README.md").write_text(f"""# Experiment 1: scaling the number of experts

Command: `python -m experiments.{NAME}` (results below are what it wrote).
switch_tiny (encoder-decoder, d_model 128, MoE in every second FFN, top-1, capacity factor 1.25)
with 2-32 experts against its FLOP-matched dense twin (every FFN dense), in the regime of
[experiments/regime.py](../../regime.py) ({regime.DESCRIPTION}); {steps} steps of 16 sequences
on the offline corpus, seeds {SEEDS}. Eval loss is the token cross-entropy on the validation
split (= minus the negative log perplexity). Examples/s: two runs at once on the 2-core CPU,
with other jobs on it for part of the time (see experiments/README.md, Budget).

{table}

{report.findings_section(findings(results), f"experiments/{NAME}.py")}
![eval loss against step and training seconds](eval_loss.png)
""")


PARTIAL_REPORT = True  # the report uses the seeds that are done and names the missing runs


if __name__ == "__main__":
    runner.main(NAME, runs(), write_report, steps=regime.STEPS, eval_every=regime.EVAL_EVERY,
                partial=PARTIAL_REPORT)
