"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens of a group. It
looks at the whole group, so it is not causal-safe."""
from __future__ import annotations

from moe_jax import routing
from moe_jax.routers import base


class ExpertChoice(base.RouterKind):
    name = "expert_choice"
    paper = "Zhou et al. 2022"
    reads = base.KERNEL
    causal_safe = False
    dispatches = ("einsum", "index")

    def validate(self, cfg) -> None:
        if min(cfg.train_capacity_factor, cfg.eval_capacity_factor) <= 0:
            raise ValueError("moe.router='expert_choice' needs train and eval capacity factors > 0 "
                             "(each expert takes capacity tokens); dropless is not defined for it")

    def choices_per_token(self, cfg) -> int:
        return 1

    def experts_per_token(self, cfg, group_tokens: int) -> float:
        return float(cfg.train_capacity_factor)  # E experts x cf * S / E tokens each, over S tokens

    def route(self, router, x, *, capacity, train):
        return routing.experts_choose(base.logits(router.cfg, x, router.kernel[...]), capacity=capacity)
