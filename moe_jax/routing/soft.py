"""Soft MoE routing (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Every expert owns P slots. Slot inputs are convex combinations of all tokens of a group (softmax
over tokens); token outputs are convex combinations of all slot outputs (softmax over slots).
Nothing is dropped and everything is differentiable, but each slot sees the whole group: never
use it in a causal layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax.routing import losses, stats


@struct.dataclass
class SoftRouting:
    dispatch: jax.Array  # float32 [G, S, E, P]: sums to 1 over S for every slot
    combine: jax.Array  # float32 [G, S, E, P]: sums to 1 over (E, P) for every token
    z_loss: jax.Array  # float32 []

    dropless_ok = False

    @property
    def num_experts(self) -> int:
        return self.dispatch.shape[2]

    @property
    def balance_loss(self) -> jax.Array:
        return jnp.zeros((), jnp.float32)  # every slot mixes every token: nothing to balance

    def stats(self) -> dict[str, jax.Array]:
        G, S, E, P = self.combine.shape
        per_expert = jnp.sum(self.combine, axis=(0, 1, 3))  # [E], total combine mass
        return {
            "tokens_per_expert": per_expert,
            "routed_per_expert": per_expert,
            "max_mean_load": stats.max_over_mean(per_expert),
            "dropped_fraction": jnp.zeros((), jnp.float32),
            "router_entropy": stats.entropy(self.combine.reshape(G, S, E * P)),
        }


def soft_route(logits: jax.Array) -> SoftRouting:
    """logits float [G, S, E, P] (token-slot affinities), cast to float32."""
    if logits.ndim != 4:
        raise ValueError(f"soft MoE logits must have shape [G, S, E, P], got {logits.shape}")
    logits = logits.astype(jnp.float32)
    G, S, E, P = logits.shape
    dispatch = jax.nn.softmax(logits, axis=1)  # [G, S, E, P], over tokens
    combine = jax.nn.softmax(logits.reshape(G, S, E * P), axis=-1).reshape(G, S, E, P)  # over slots
    return SoftRouting(dispatch=dispatch, combine=combine,
                       z_loss=losses.router_z_loss(logits.reshape(G, S, E * P)))
