"""Experiment 4, routers: token choice top-1 and top-2 (Switch, GShard), noisy top-k (Shazeer et
al. 2017), dense mixture (Jacobs et al. 1991), hierarchical (Jordan & Jacobs 1994), and top-1 with
auxiliary-loss-free bias balancing (DeepSeek-V3) in a decoder-only LM; expert choice (Zhou et al.
2022) and soft MoE (Puigcerver et al. 2023), which look at the whole group, in the encoder of
the encoder-decoder model, against top-1 in the same place.

    python -m experiments.routers
"""
from experiments import report, runner
from experiments.report import fmt

NAME = "routers"
DECODER = {"model.kind": "decoder", "data.objective": "lm", "model.num_encoder_layers": 0,
           "model.encoder_moe_every": 0, "model.num_decoder_layers": 4}
ENCODER_ONLY_MOE = {"model.decoder_moe_every": 0}


def runs() -> list[runner.Run]:
    decoder = {
        "top1": {"moe.k": 1},
        "top2": {"moe.k": 2, "moe.order": "token_major", "moe.renormalize": True},
        "noisy_top2": {"moe.router": "noisy_top_k", "moe.k": 2, "moe.order": "token_major"},
        "dense_mixture": {"moe.router": "dense"},
        "hierarchical": {"moe.router": "hierarchical", "moe.num_expert_groups": 2, "moe.k_groups": 1,
                         "moe.k": 1},
        "top1_aux_free": {"moe.k": 1, "moe.bias_update_rate": 1e-3, "balance_loss_weight": 0.0},
    }
    encoder = {"top1": {"moe.k": 1}, "expert_choice": {"moe.router": "expert_choice"},
               "soft_moe": {"moe.router": "soft"}}
    out = [runner.Run(f"decoder_{n}", "switch_tiny.py", {**DECODER, **o}) for n, o in decoder.items()]
    out += [runner.Run(f"encoder_{n}", "switch_tiny.py", {**ENCODER_ONLY_MOE, **o})
            for n, o in encoder.items()]
    return out


def write_report(results: list[dict], out) -> None:
    for family in ("decoder", "encoder"):
        rs = [r for r in results if r["name"].startswith(family)]
        report.plot_curves(report.by_group(rs), out / f"eval_loss_{family}.png", f"routers ({family})")
    rows = [[r["name"], fmt(r["final_eval_loss"], ".4f"), fmt(r["final_eval_accuracy"], ".4f"),
             fmt(r["tokens_per_sec"], ",.0f"), fmt(r["max_mean_load"], ".2f"),
             fmt(r["dropped_fraction"], ".3f"), r["error"] or ""] for r in results]
    steps = results[0]["overrides"]["num_train_steps"]
    table = report.markdown_table(["run", f"eval loss at step {steps}", "eval accuracy", "tokens/s",
                                   "max/mean load (routed)", "dropped (train)", "error"], rows)
    (out / "README.md").write_text(f"""# Experiment 4: routers

Command: `python -m experiments.routers` (results below are what it wrote).
`decoder_*`: a 4-layer decoder-only LM (d_model 128, MoE in every second FFN, 8 experts,
capacity factor 1.25) trained on causal LM; routers that decide per token. `encoder_*`: the
switch_tiny encoder-decoder on span corruption with MoE layers in the encoder only; the routers
that look at the whole group (expert choice, soft MoE) are allowed there. The two families
train on different objectives: compare losses within a family only. {steps} steps of 16
sequences, seed 0. Load: max over mean of the tokens routed per expert (1.0 is perfect balance;
for expert choice and soft MoE every expert takes the same number by construction).

{table}

![decoder routers](eval_loss_decoder.png)
![encoder routers](eval_loss_encoder.png)
""")


if __name__ == "__main__":
    runner.main(NAME, runs(), write_report, steps=200, eval_every=50)
