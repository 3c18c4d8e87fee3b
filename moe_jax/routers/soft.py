"""Soft MoE (Puigcerver et al. 2023): every expert owns moe.soft_slots_per_expert slots, each a
convex combination of all tokens of a group. Its decision is not a token-to-slot map, so it mixes
the experts itself (`own_path`); it sees the whole group, so it is not causal-safe."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moe_jax import routing, sharding
from moe_jax.routers import base


class Soft(base.RouterKind):
    name = "soft"
    paper = "Puigcerver et al. 2023"
    reads = ("soft_slots_per_expert",)
    causal_safe = False
    dispatches = ()
    has_capacity = False
    own_path = True

    def choices_per_token(self, cfg) -> int:
        return 1

    def experts_per_token(self, cfg, group_tokens: int) -> float:
        return cfg.num_experts * cfg.soft_slots_per_expert / group_tokens

    def param_shapes(self, cfg, d_model: int) -> dict[str, tuple[int, ...]]:
        return {"kernel": (d_model, cfg.num_experts, cfg.soft_slots_per_expert), "scale": ()}

    def init_params(self, cfg, d_model: int, rngs: nnx.Rngs) -> dict[str, nnx.Variable]:
        E, P = cfg.num_experts, cfg.soft_slots_per_expert
        kernel = nnx.initializers.lecun_normal()(rngs.params(), (d_model, E * P), jnp.float32)
        return {"kernel": nnx.Param(kernel.reshape(d_model, E, P), out_sharding=("embed", None, None)),
                "scale": nnx.Param(jnp.ones((), jnp.float32))}  # the learned scale of normalized logits

    def flops_per_token(self, cfg, d_model: int) -> float:
        # Slot logits D x (E*P), then mixing tokens into slots and slots back into tokens.
        return float(3 * 2 * d_model * cfg.num_experts * cfg.soft_slots_per_expert)

    def route(self, router, x, *, capacity, train):
        # Soft MoE's normalization (Sec. 2.3): l2-normalized tokens and slot parameters.
        phi = router.kernel[...] / jnp.linalg.norm(router.kernel[...], axis=0, keepdims=True)  # [D, E, P]
        xn = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)  # [G, S, D]
        return routing.soft_route(router.scale[...] * jnp.einsum("gsd,dep->gsep", xn, phi))  # [G, S, E, P]

    def mix(self, groups, decision, experts):
        G, S, E, P = decision.dispatch.shape
        D = groups.shape[-1]
        slots = jnp.einsum("gsd,gsep->egpd", groups, decision.dispatch.astype(groups.dtype))  # [E, G, P, D]
        slots = sharding.constrain(slots.reshape(E, G * P, D), sharding.EXPERT_MAJOR)  # [E, G*P, D]
        outputs = sharding.constrain(experts(slots), sharding.EXPERT_MAJOR).reshape(E, G, P, D)
        return jnp.einsum("egpd,gsep->gsd", outputs, decision.combine.astype(outputs.dtype))  # [G, S, D]
