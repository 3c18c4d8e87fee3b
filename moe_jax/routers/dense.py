"""The dense mixture of experts (Jacobs et al. 1991): every token to every expert, weighted by the
softmax gate; nothing is dropped and nothing needs balancing."""
from __future__ import annotations

from moe_jax import routing
from moe_jax.routers import base


class Dense(base.RouterKind):
    name = "dense"
    paper = "Jacobs et al. 1991"
    reads = base.KERNEL
    has_capacity = False

    def choices_per_token(self, cfg) -> int:
        return cfg.num_experts

    def route(self, router, x, *, capacity, train):
        return routing.dense_choose(base.logits(router.cfg, x, router.kernel[...]))
