"""Token-choice top-k routing: Switch (k=1, Fedus et al. 2021), GShard (k=2, Lepikhin et al. 2020),
Mixtral (k=2 of 8, renormalized; Jiang et al. 2024), with GShard's random second choice and
DeepSeek-V3's auxiliary-loss-free selection bias (Wang et al. 2024) and gpt-oss's learned logit
bias (moe.router_bias; OpenAI 2025: top-4, renormalized, which is the softmax over the chosen
logits) as options."""
from __future__ import annotations

from moe_jax import routing
from moe_jax.routers import base


class TopK(base.RouterKind):
    name = "top_k"
    paper = "Switch (Fedus et al. 2021), GShard (Lepikhin et al. 2020), Mixtral (Jiang et al. 2024)"
    reads = base.TOKEN_ORDER + base.KERNEL + base.BALANCE_BIAS + ("renormalize", "second_choice",
                                                                  "routed_scaling_factor", "router_bias")

    def param_shapes(self, cfg, d_model):
        bias = {"bias": (cfg.num_experts,)} if cfg.router_bias else {}
        return {**super().param_shapes(cfg, d_model), **bias}

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if cfg.second_choice == "random" and cfg.k != 2:
            raise ValueError(f"moe.second_choice='random' (GShard) needs moe.k=2, got k={cfg.k}")

    def route(self, router, x, *, capacity, train):
        cfg = router.cfg
        random_second = train and cfg.second_choice == "random"  # evaluation dispatches every choice
        logits = base.logits(cfg, x, router.kernel[...])  # [G, S, E]
        if cfg.router_bias:
            logits = logits + router.bias[...].astype(logits.dtype)
        return routing.tokens_choose(
            logits, k=cfg.k, capacity=capacity, renormalize=cfg.renormalize,
            order=cfg.order, batch_prioritized=cfg.batch_prioritized,
            second_choice="random" if random_second else "all", choice_bias=router.choice_bias(),
            rng=router.rng() if random_second else None, weight_scale=cfg.routed_scaling_factor)
