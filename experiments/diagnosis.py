"""Why the tiny Switch models do not beat their dense twin: one pair of runs (dense, Switch with 8
experts, top-1, same FLOPs per token, same seed and data order) per hypothesis, each changing
one thing from switch_tiny / dense_tiny, with the verdict computed from the pair's eval losses.

    python -m experiments.diagnosis        # see experiments/README.md for the time

Hypotheses (Switch Transformer, Fedus et al. 2021; Clark et al. 2022 for tiny base models):
- baseline: switch_tiny as it is (encoder-decoder, span corruption, 8k vocabulary, one MoE layer
  in each 2-layer stack);
- every_layer: every FFN of both stacks sparse (Switch-C style), so more of the model is sparse;
- vocab_2k: a 2k vocabulary, so the softmax layer no longer holds most of the FLOPs and the loss;
- decoder_lm: a 4-layer decoder-only LM (every position a target, not 15% of them), MoE in every
  second layer;
- decoder_lm_2k_every: the decoder LM with a 2k vocabulary and every FFN sparse;
- init_0.1: Switch's init, every weight matrix at 0.1x variance (model.init_scale), not only the
  router's;
- lr_0.003 / lr_0.03: the peak learning rate a third and three times the dense-tuned 0.01.
"""
from __future__ import annotations

from experiments import report, runner
from experiments.report import fmt

NAME = "diagnosis"
SEED = 0
DECODER = {"model.kind": "decoder", "model.num_encoder_layers": 0, "model.encoder_moe_every": 0,
           "model.num_decoder_layers": 4, "data.objective": "lm"}
VOCAB_2K = {"model.vocab_size": 2048, "data.spm_vocab_size": 1948}
# hypothesis -> (changes to both models, changes to the sparse model only)
HYPOTHESES = {
    "baseline": ({}, {}),
    "decoder_lm_2k_every": ({**DECODER, **VOCAB_2K}, {"model.decoder_moe_every": 1}),
    "every_layer": ({}, {"model.encoder_moe_every": 1, "model.decoder_moe_every": 1}),
    "vocab_2k": (VOCAB_2K, {}),
    "decoder_lm": (DECODER, {"model.decoder_moe_every": 2}),
    "init_0.1": ({"model.init_scale": 0.1}, {}),
    "lr_0.003": ({"learning_rate": 0.003}, {}),
    "lr_0.03": ({"learning_rate": 0.03}, {}),
}
DENSE = {"model.encoder_moe_every": 0, "model.decoder_moe_every": 0}


def runs() -> list[runner.Run]:
    """Per hypothesis a dense run and a Switch run; a hypothesis that changes only the sparse model
    shares the baseline's dense run."""
    out = []
    for name, (both, sparse) in HYPOTHESES.items():
        if both or name == "baseline":
            out.append(runner.Run(f"{name}_dense", "switch_tiny.py", {"seed": SEED, **both, **DENSE}, group=name))
        out.append(runner.Run(f"{name}_switch8", "switch_tiny.py", {"seed": SEED, **both, **sparse}, group=name))
    return out


def pair(results: list[dict], name: str) -> tuple[dict, dict]:
    both, _ = HYPOTHESES[name]
    by_name = {r["name"]: r for r in results}
    dense = by_name[f"{name if both else 'baseline'}_dense"]
    return dense, by_name[f"{name}_switch8"]


def verdict(dense: dict, sparse: dict, noise: float) -> str:
    """One line from the pair's final eval losses; `noise` is the seed spread it is judged against."""
    gap = sparse["final_eval_loss"] - dense["final_eval_loss"]
    lead = "Switch ahead" if gap < 0 else "dense ahead"
    inside = "inside" if abs(gap) <= noise else "outside"
    return f"{lead} by {abs(gap):.4f}, {inside} the seed spread ({noise:.4f})"


def write_report(results: list[dict], out, noise: float | None = None) -> None:
    """noise: the dense models' seed standard deviation in the short-run scaling experiment."""
    noise = report.seed_spread("scaling_experts", "dense") if noise is None else noise
    rows, groups = [], {}
    for name in HYPOTHESES:
        dense, sparse = pair(results, name)
        groups[f"{name}: dense"], groups[f"{name}: switch 8"] = [dense], [sparse]
        changes = {**HYPOTHESES[name][0], **HYPOTHESES[name][1]}
        flags = " ".join(f"--config.{k}={v}" for k, v in changes.items()) or "(switch_tiny as it is)"
        rows.append([name, f"`{flags}`", fmt(dense["final_eval_loss"], ".4f"), fmt(sparse["final_eval_loss"], ".4f"),
                     fmt(sparse["final_eval_loss"] - dense["final_eval_loss"], "+.4f"),
                     fmt(sparse["max_mean_load"], ".2f"), fmt(sparse["dropped_fraction"], ".3f"),
                     verdict(dense, sparse, noise)])
    report.plot_curves(groups, out / "eval_loss.png", "diagnosis")
    steps = results[0]["overrides"]["num_train_steps"]
    table = report.markdown_table(["hypothesis", "changes (Switch run; dense twin without MoE)", "dense",
                                   "switch 8", "switch - dense", "max/mean load", "dropped (train)",
                                   "verdict"], rows)
    (out / "README.md").write_text(f"""# Diagnosis: why Switch did not beat dense

Command: `python -m experiments.{NAME}` (results below are what it wrote; the verdicts are computed
by experiments/diagnosis.py from the runs' JSON). Each hypothesis is a pair of runs of {steps}
steps, seed {SEED}, same data order: the dense twin (`model.*_moe_every=0`) and Switch with 8
experts, top-1, capacity factor 1.25, each changed from switch_tiny as the second column says.
Eval loss at step {steps}. The seed spread is the dense model's seed standard deviation at step
200 in [scaling_experts](../scaling_experts/README.md).

{table}

![eval loss of each pair](eval_loss.png)
""")


if __name__ == "__main__":
    runner.main(NAME, runs(), write_report, steps=400, eval_every=100)
