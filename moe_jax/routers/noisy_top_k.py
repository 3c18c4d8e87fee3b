"""Noisy top-k gating (Shazeer et al. 2017): trained Gaussian noise on the logits in training, a
softmax over the k chosen, and the importance + load balancing loss."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moe_jax import routing
from moe_jax.routers import base


class NoisyTopK(base.RouterKind):
    name = "noisy_top_k"
    paper = "Shazeer et al. 2017"
    reads = base.TOKEN_ORDER + base.KERNEL

    def param_shapes(self, cfg, d_model: int) -> dict[str, tuple[int, ...]]:
        return {"kernel": (d_model, cfg.num_experts), "noise_kernel": (d_model, cfg.num_experts)}

    def init_params(self, cfg, d_model: int, rngs: nnx.Rngs) -> dict[str, nnx.Variable]:
        params = base.fan_in_params(cfg, {"kernel": (d_model, cfg.num_experts)}, rngs)
        # Shazeer et al. initialise the noise weights to zero.
        params["noise_kernel"] = nnx.Param(jnp.zeros((d_model, cfg.num_experts), jnp.float32),
                                           out_sharding=("embed", None))
        return params

    def route(self, router, x, *, capacity, train):
        cfg = router.cfg
        noise_logits = base.project(x, router.noise_kernel[...])  # [G, S, E]
        return routing.noisy_tokens_choose(base.logits(cfg, x, router.kernel[...]), noise_logits, k=cfg.k,
                                           capacity=capacity, rng=router.rng() if train else None,
                                           order=cfg.order, batch_prioritized=cfg.batch_prioritized)
