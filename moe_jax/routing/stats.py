"""Routing statistics a researcher reads to catch expert collapse and over-dropping.

All are float32, computed from a routing decision without touching activations:
- tokens_per_expert [E]: assignments kept per expert, summed over groups;
- routed_per_expert [E]: assignments that chose each expert, before capacity drops;
- max_mean_load []: max over mean of routed_per_expert (1.0 is perfect balance);
- dropped_fraction []: fraction of assignments dropped (token choice), or of tokens that no
  expert took (expert choice);
- dropped_fraction_per_rank [K]: the same per choice rank (token choice only);
- router_entropy []: mean entropy of the router distribution over experts, in nats.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import losses
from moe_jax.routing.expert_choice import ExpertChoice
from moe_jax.routing.soft import SoftRouting
from moe_jax.routing.token_choice import TokenChoice


def _entropy(probs: jax.Array) -> jax.Array:
    p = probs.astype(jnp.float32)  # [..., E]
    return jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1))


def _balance(routed: jax.Array) -> jax.Array:
    return jnp.max(routed) / jnp.maximum(jnp.mean(routed), 1e-30)


def routing_stats(decision: TokenChoice | ExpertChoice | SoftRouting) -> dict[str, jax.Array]:
    if isinstance(decision, TokenChoice):
        E = decision.num_experts
        routed = jnp.sum(losses.expert_counts(decision.expert_index, E), axis=0)  # [G, E] -> [E]
        kept_index = jnp.where(decision.position >= 0, decision.expert_index, E)  # [G, S, K]
        kept = jnp.sum(losses.expert_counts(kept_index, E), axis=0)  # [E]
        dropped = (decision.position < 0).astype(jnp.float32)  # [G, S, K]
        return {
            "tokens_per_expert": kept,
            "routed_per_expert": routed,
            "max_mean_load": _balance(routed),
            "dropped_fraction": jnp.mean(dropped),
            "dropped_fraction_per_rank": jnp.mean(dropped, axis=(0, 1)),  # [K]
            "router_entropy": _entropy(decision.probs),
        }
    if isinstance(decision, ExpertChoice):
        G, S, E = decision.probs.shape
        taken = jnp.zeros((G, S), jnp.float32).at[jnp.arange(G)[:, None, None], decision.token_index].add(1.0)
        per_expert = jnp.full((E,), G * decision.capacity, jnp.float32)
        return {
            "tokens_per_expert": per_expert,
            "routed_per_expert": per_expert,
            "max_mean_load": _balance(per_expert),
            "dropped_fraction": jnp.mean((taken == 0).astype(jnp.float32)),
            "experts_per_token": jnp.mean(taken),
            "router_entropy": _entropy(decision.probs),
        }
    if isinstance(decision, SoftRouting):
        G, S, E, P = decision.combine.shape
        per_expert = jnp.sum(decision.combine, axis=(0, 1, 3))  # [E], total combine mass
        return {
            "tokens_per_expert": per_expert,
            "routed_per_expert": per_expert,
            "max_mean_load": _balance(per_expert),
            "dropped_fraction": jnp.zeros((), jnp.float32),
            "router_entropy": _entropy(decision.combine.reshape(G, S, E * P)),
        }
    raise TypeError(f"unknown routing decision type {type(decision).__name__}")
