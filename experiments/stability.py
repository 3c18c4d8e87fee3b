"""Experiment 3, router stability (Switch Transformer, Fedus et al. 2021, Tables 2-3; ST-MoE, Zoph
et al. 2022): a bfloat16 model with a float32 router against a bfloat16 router; router
initialization scale 0.1 against 1.0 over seeds; router z-loss on and off. The papers: the
bfloat16 router diverges or trains worse at scale, the 1.0 init gives worse quality with a
larger spread over seeds, and the z-loss stabilizes training without hurting quality.

    python -m experiments.stability      # 14 runs of 1,500 steps in the headline's regime
"""
from experiments import regime, report, runner
from experiments.report import fmt, mean_std

NAME = "stability"
SEEDS = (0, 1, 2)
BF16 = {"model.dtype": "bfloat16"}
# The headline's Switch-8 model in the decoder-only regime (experiments/regime.py).
SWITCH8 = {**regime.LM_OVERRIDES, **regime.LM_SPARSE, "moe.num_experts": 8}


def runs() -> list[runner.Run]:
    return [runner.Run(r.name, r.config, {**SWITCH8, **r.overrides}, group=r.group) for r in _variants()]


def _variants() -> list[runner.Run]:
    out = []
    for seed in SEEDS[:2]:
        for dtype in ("float32", "bfloat16"):
            out.append(runner.Run(f"bf16_model_router_{dtype}_s{seed}", "switch_tiny.py",
                                  {**BF16, "moe.router_dtype": dtype, "seed": seed},
                                  group=f"bfloat16 model, {dtype} router"))
    for seed in SEEDS:
        for scale in (0.1, 1.0):
            out.append(runner.Run(f"init{scale}_s{seed}", "switch_tiny.py", {"moe.router_init_scale": scale,
                                                                             "seed": seed},
                                  group=f"router init scale {scale}"))
    for seed in SEEDS[:2]:
        for z in (1e-3, 0.0):
            out.append(runner.Run(f"zloss{z}_s{seed}", "switch_tiny.py", {"z_loss_weight": z, "seed": seed},
                                  group=f"z-loss weight {z}"))
    return out


def write_report(results: list[dict], out) -> None:
    groups = report.by_group(results)
    report.plot_curves(groups, out / "eval_loss.png", "router stability")
    rows = []
    for name, rs in groups.items():
        diverged = [r["name"] for r in rs if r["error"]]
        rows.append([name, len(rs), mean_std([r["final_eval_loss"] for r in rs if not r["error"]]),
                     mean_std([max(loss for _, loss, _ in r["train"][len(r["train"]) // 2:]) for r in rs]),
                     fmt(sum(r["max_mean_load"] or 0 for r in rs) / len(rs), ".2f"),
                     ", ".join(diverged) or "none"])
    steps = results[0]["overrides"]["num_train_steps"]
    table = report.markdown_table(["variant", "seeds", f"eval loss at step {steps} (mean ± sd)",
                                   "worst train loss, 2nd half", "max/mean load", "diverged"], rows)
    (out / "README.md").write_text(f"""# Experiment 3: router stability

Command: `python -m experiments.stability` (results below are what it wrote).
The headline's Switch-8 decoder-only model ({regime.LM_DESCRIPTION}) in
variants: a bfloat16 model (float32 parameters, bfloat16 activations) whose router
matmul is float32 (the default) or bfloat16 (`moe.router_dtype`); router init scale 0.1
(Switch's) or 1.0; router z-loss weight 1e-3 (ST-MoE) or 0. {steps} steps of 16 sequences.
"Worst train loss, 2nd half" is the largest logged training loss after the halfway step: spikes
show there.

{table}

![eval loss against step and training seconds](eval_loss.png)
""")


if __name__ == "__main__":
    runner.main(NAME, runs(), write_report, steps=regime.STEPS, eval_every=regime.EVAL_EVERY)
