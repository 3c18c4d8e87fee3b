"""Routing statistics a researcher reads to catch expert collapse and over-dropping, and the slot
maps every token-to-slot decision hands to the dispatch.

Each routing decision's `stats()` returns float32 figures computed without touching activations:
- tokens_per_expert [E]: assignments kept per expert, summed over groups;
- routed_per_expert [E]: assignments that chose each expert, before capacity drops;
- max_mean_load []: max over mean of routed_per_expert (1.0 is perfect balance);
- dropped_fraction []: fraction of assignments dropped (token choice), or of tokens that no
  expert took (expert choice);
- dropped_fraction_per_rank [K]: the same per choice rank (token choice only);
- experts_per_token []: mean experts that took a token (expert choice only);
- router_entropy []: mean entropy of the router distribution over experts, in nats.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SlotMaps(NamedTuple):
    """Who sits in which expert slot of a group, for the index dispatch (C slots per expert)."""

    # int32 [G, S, K]: slot e*C + c of each choice (E*C: dropped); None: expert choice
    token_slot: jax.Array | None
    slot_token: jax.Array  # int32 [G, E*C]: token of the group held by each slot (S: empty)
    slot_choice: jax.Array | None  # int32 [G, E*C]: choice index k*S + s in each slot (S*K: empty)
    weight: jax.Array  # float32 [G, S, K] (token choice) or [G, E*C] (expert choice)


def entropy(probs: jax.Array) -> jax.Array:
    """Mean entropy in nats of distributions over the last axis: [..., E] -> []."""
    p = probs.astype(jnp.float32)  # [..., E]
    return jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1))


def max_over_mean(routed: jax.Array) -> jax.Array:
    """[E] -> []: 1.0 when every expert has the same load."""
    return jnp.max(routed) / jnp.maximum(jnp.mean(routed), 1e-30)
