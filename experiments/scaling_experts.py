"""Experiment 1, scaling the number of experts (Switch Transformer, Fedus et al. 2021, Fig. 1/4):
a dense model and FLOP-matched Switch models with 2-32 experts (top-1, capacity factor 1.25),
same steps, 3 seeds each. The paper: at a fixed number of steps quality improves steadily with
the number of experts, at the same FLOPs per token.

    python -m experiments.scaling_experts            # 18 runs; see experiments/README.md for the time

experiments/scaling_experts_long.py runs the same models for 2,000 steps.
"""
from experiments import report, runner
from experiments.report import fmt, mean_std

NAME = "scaling_experts"
SEEDS = (0, 1, 2)
EXPERTS = (2, 4, 8, 16, 32)
BATCH_GROUP = 2048  # moe.group_size of the batch-wide groups: all 16 sequences of a batch


def runs(seeds=SEEDS, experts=EXPERTS, batch_groups=()) -> list[runner.Run]:
    """Dense and Switch runs; `batch_groups`: numbers of experts also run with batch-wide groups."""
    out = []
    for seed in seeds:
        out.append(runner.Run(f"dense_s{seed}", "dense_tiny.py", {"seed": seed}, group="dense"))
        for e in experts:
            out.append(runner.Run(f"switch_e{e}_s{seed}", "switch_tiny.py",
                                  {"seed": seed, "moe.num_experts": e, "moe.train_capacity_factor": 1.25},
                                  group=f"switch {e} experts"))
        for e in batch_groups:
            out.append(runner.Run(f"switch_e{e}_g{BATCH_GROUP}_s{seed}", "switch_tiny.py",
                                  {"seed": seed, "moe.num_experts": e, "moe.train_capacity_factor": 1.25,
                                   "moe.group_size": BATCH_GROUP},
                                  group=f"switch {e} experts, batch groups"))
    return out


def write_report(results: list[dict], out) -> None:
    groups = report.by_group(results)
    report.plot_curves(groups, out / "eval_loss.png", "Switch: number of experts")
    dense = groups["dense"]
    base = sum(r["final_eval_loss"] for r in dense) / len(dense)
    rows = []
    for name, rs in groups.items():
        rows.append([name, len(rs), mean_std([r["final_eval_loss"] for r in rs]),
                     fmt(sum(r["final_eval_loss"] for r in rs) / len(rs) - base, "+.4f"),
                     mean_std([r["final_eval_accuracy"] for r in rs]),
                     fmt(sum(r["examples_per_sec"] for r in rs) / len(rs), ".1f"),
                     fmt(sum(r["dropped_fraction"] or 0 for r in rs) / len(rs), ".3f")])
    steps = results[0]["overrides"]["num_train_steps"]
    seeds = tuple(sorted({r["overrides"]["seed"] for r in results}))
    table = report.markdown_table(["model", "seeds", f"eval loss at step {steps} (mean ± sd)", "vs dense",
                                   "eval accuracy", "examples/s", "dropped (train)"], rows)
    (out / "README.md").write_text(f"""# Experiment 1: scaling the number of experts

Command: `python -m experiments.{out.name}` (results below are what it wrote).
switch_tiny (encoder-decoder, d_model 128, MoE in every second FFN, top-1, capacity factor 1.25)
with 2-32 experts against dense_tiny, its FLOP-matched dense twin; {steps} steps of 16 sequences
on the offline corpus, seeds {seeds}. Eval loss is the token cross-entropy on the validation
split (= minus the negative log perplexity).

{table}

![eval loss against step and training seconds](eval_loss.png)
""")


if __name__ == "__main__":
    runner.main(NAME, runs(), write_report, steps=200, eval_every=50)
