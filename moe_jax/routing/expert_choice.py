"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens of a group.

Probabilities are a softmax over experts per token; expert e takes the C tokens with the highest
probability of e, weighted by that probability. A token can be taken by 0..E experts, nothing
needs balancing, but the choice looks at the whole group: never use it in a causal layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax.routing import losses
from moe_jax.routing.token_choice import check_capacity, check_logits


@struct.dataclass
class ExpertChoice:
    """An expert-choice routing decision for G groups of S tokens, C slots per expert."""

    token_index: jax.Array  # int32 [G, E, C]: token taken into each slot
    weight: jax.Array  # float32 [G, E, C]: its router probability for that expert
    probs: jax.Array  # float32 [G, S, E]
    z_loss: jax.Array  # float32 []
    capacity: int = struct.field(pytree_node=False)

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]


def experts_choose(logits: jax.Array, *, capacity: int) -> ExpertChoice:
    """logits float [G, S, E] (cast to float32); capacity: tokens per expert, 1 <= C <= S."""
    check_logits(logits)
    check_capacity(capacity)
    if capacity is None or capacity > logits.shape[1]:
        raise ValueError(f"expert-choice capacity must be an int in [1, group size {logits.shape[1]}], "
                         f"got {capacity!r}")
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)  # [G, S, E]
    weight, token_index = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)  # [G, E, S] -> [G, E, C] x2
    return ExpertChoice(
        token_index=token_index.astype(jnp.int32),
        weight=weight,
        probs=probs,
        z_loss=losses.router_z_loss(logits),
        capacity=capacity,
    )
