"""Experiment 4, routers, in the headline's regime (experiments/regime.py): token choice top-1 and
top-2 (Switch, GShard), noisy top-k (Shazeer et al. 2017), dense mixture (Jacobs et al. 1991),
hierarchical (Jordan & Jacobs 1994), top-1 with auxiliary-loss-free bias balancing, DeepSeek-V3's
gating (DeepSeek-AI 2024: sigmoid affinities, group-limited choice, that bias, renormalised and
scaled weights) and gpt-oss's (OpenAI 2025: softmax over the chosen experts, no token dropped) in
the decoder-only LM; expert choice (Zhou et al. 2022) and soft MoE (Puigcerver et al. 2023), which
look at the whole group, in the encoder of the encoder-decoder model, against top-1 there.

    python -m experiments.routers
"""
from experiments import regime, report, runner
from experiments.report import fmt

NAME = "routers"
DECODER = {**regime.LM_OVERRIDES, **regime.LM_SPARSE}
ENCODER_ONLY_MOE = {**regime.OVERRIDES, "model.decoder_moe_every": 0}
# DeepSeek-V3's gating at 8 experts: 4 groups of 2, the best 2 groups open, 2 chosen; its
# sequence-wise balance loss at the paper's small weight, the bias doing the balancing.
DEEPSEEK_V3 = {"moe.router": "sigmoid", "moe.k": 2, "moe.order": "token_major", "moe.renormalize": True,
               "moe.num_expert_groups": 4, "moe.k_groups": 2, "moe.routed_scaling_factor": 2.5,
               "moe.bias_update_rate": 1e-3, "balance_loss_weight": 1e-4}
# gpt-oss's routing at 8 experts: top-2 (gpt-oss: top-4 of 32 or 128) of logits with a learned bias,
# softmax over the chosen logits (= renormalised top-k probabilities), dropless.
GPT_OSS = {"moe.k": 2, "moe.order": "token_major", "moe.renormalize": True, "moe.router_bias": True,
           "moe.train_capacity_factor": 0.0, "moe.eval_capacity_factor": 0.0}


def runs() -> list[runner.Run]:
    decoder = {
        "top1": {"moe.k": 1},
        "top2": {"moe.k": 2, "moe.order": "token_major", "moe.renormalize": True},
        "noisy_top2": {"moe.router": "noisy_top_k", "moe.k": 2, "moe.order": "token_major"},
        "dense_mixture": {"moe.router": "dense"},
        "hierarchical": {"moe.router": "hierarchical", "moe.num_expert_groups": 2, "moe.k_groups": 1,
                         "moe.k": 1},
        "top1_aux_free": {"moe.k": 1, "moe.bias_update_rate": 1e-3, "balance_loss_weight": 0.0},
        "deepseek_v3": DEEPSEEK_V3,
        "gpt_oss": GPT_OSS,
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

Command: `python -m experiments.routers` (results below are what it wrote). The regime:
{regime.DESCRIPTION}. `decoder_*`: the 4-layer decoder-only LM with every FFN sparse, 8
experts, capacity factor 1.25, trained on causal LM; routers that decide per token (`deepseek_v3`:
sigmoid gating over 4 groups of 2 experts, 2 groups open, top-2, bias balancing; `gpt_oss`:
softmax over the top-2 of biased logits, dropless). `encoder_*`: the switch_tiny encoder-decoder
on span corruption with MoE layers in the encoder only; the routers that look at the whole group
(expert choice, soft MoE) are allowed there. The two families train on different objectives:
compare losses within a family only. {steps} steps of 16 sequences, seed 0. Load: max over
mean of the tokens routed per expert (1.0 is perfect balance; under expert choice every expert
takes the same number by construction; soft MoE's figure is each expert's share of the combine
weights, as every expert processes the same slots). tokens/s: training throughput on this 2-core
CPU with two runs sharing it (and, for some runs, other work): compare it across runs only loosely.

{table}

![decoder routers](eval_loss_decoder.png)
![encoder routers](eval_loss_encoder.png)
""")


if __name__ == "__main__":
    runner.main(NAME, runs(), write_report, steps=regime.STEPS, eval_every=regime.EVAL_EVERY)
