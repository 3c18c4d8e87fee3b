"""Two-level hierarchical gating (Jordan & Jacobs 1994; the sparse form of Shazeer et al. 2017,
App. B): a gate over moe.num_expert_groups groups, then top-k inside each chosen group."""
from __future__ import annotations

from moe_jax import routing
from moe_jax.routers import base


class Hierarchical(base.RouterKind):
    name = "hierarchical"
    paper = "Jordan & Jacobs 1994; Shazeer et al. 2017, App. B"
    reads = base.TOKEN_ORDER + base.KERNEL + ("renormalize", "num_expert_groups", "k_groups")

    def validate(self, cfg) -> None:
        if cfg.num_experts % cfg.num_expert_groups:
            raise ValueError(f"moe.num_experts={cfg.num_experts} must be divisible by "
                             f"moe.num_expert_groups={cfg.num_expert_groups} for the hierarchical router")
        per_group = cfg.num_experts // cfg.num_expert_groups
        if cfg.k_groups > cfg.num_expert_groups or cfg.k > per_group:
            raise ValueError(f"hierarchical routing needs moe.k_groups <= num_expert_groups "
                             f"({cfg.num_expert_groups}) and moe.k <= experts per group ({per_group}); "
                             f"got k_groups={cfg.k_groups}, k={cfg.k}")

    def choices_per_token(self, cfg) -> int:
        return cfg.k_groups * cfg.k

    def param_shapes(self, cfg, d_model: int) -> dict[str, tuple[int, ...]]:
        return {"kernel": (d_model, cfg.num_experts), "group_kernel": (d_model, cfg.num_expert_groups)}

    def route(self, router, x, *, capacity, train):
        cfg = router.cfg
        logits = base.logits(cfg, x, router.kernel[...])  # [G, S, E]
        G, S, E = logits.shape
        outer = base.logits(cfg, x, router.group_kernel[...])  # [G, S, E1]
        inner = logits.reshape(G, S, cfg.num_expert_groups, E // cfg.num_expert_groups)  # [G, S, E1, E2]
        return routing.hierarchical_choose(outer, inner, k_outer=cfg.k_groups, k_inner=cfg.k,
                                           capacity=capacity, renormalize=cfg.renormalize, order=cfg.order,
                                           batch_prioritized=cfg.batch_prioritized)
