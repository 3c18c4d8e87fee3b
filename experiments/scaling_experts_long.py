"""Experiment 1, long: the expert-scaling experiment (experiments/scaling_experts.py) for 2,000
steps instead of 200, seed 0: dense against 2, 8 and 32 experts. It checks whether the paper's
gain from more experts appears once the experts have had more updates. 8 and 32 experts are also
routed in groups of the whole batch (16 sequences, 2,048 encoder tokens) instead of one 128-token
sequence: with 32 experts a sequence gives each expert 4 tokens and 5 slots, so chance
fluctuations drop many tokens, where the paper's groups give each expert hundreds.

    python -m experiments.scaling_experts_long       # 6 runs; see experiments/README.md for the time
"""
from experiments import runner, scaling_experts

NAME = "scaling_experts_long"


def runs() -> list[runner.Run]:
    return scaling_experts.runs(seeds=(0,), experts=(2, 8, 32), batch_groups=(8, 32))


if __name__ == "__main__":
    runner.main(NAME, runs(), scaling_experts.write_report, steps=2000, eval_every=250)
