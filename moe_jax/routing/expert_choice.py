"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens of a group.

Probabilities are a softmax over experts per token; expert e takes the C tokens with the highest
probability of e, weighted by that probability. A token can be taken by 0..E experts, nothing
needs balancing, but the choice looks at the whole group: never use it in a causal layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax.routing import losses, stats
from moe_jax.routing.stats import SlotMaps
from moe_jax.routing.token_choice import check_capacity, check_logits


@struct.dataclass
class ExpertChoice:
    """An expert-choice routing decision for G groups of S tokens, C slots per expert."""

    token_index: jax.Array  # int32 [G, E, C]: token taken into each slot
    weight: jax.Array  # float32 [G, E, C]: its router probability for that expert
    probs: jax.Array  # float32 [G, S, E]
    z_loss: jax.Array  # float32 []
    capacity: int = struct.field(pytree_node=False)

    dropless_ok = False  # each expert takes exactly C tokens: there is nothing to sort by expert

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def balance_loss(self) -> jax.Array:
        return jnp.zeros((), jnp.float32)  # every expert takes C tokens: nothing to balance

    def stats(self) -> dict[str, jax.Array]:
        G, S, E = self.probs.shape
        taken = jnp.zeros((G, S), jnp.float32).at[jnp.arange(G)[:, None, None], self.token_index].add(1.0)
        per_expert = jnp.full((E,), G * self.capacity, jnp.float32)
        return {
            "tokens_per_expert": per_expert,
            "routed_per_expert": per_expert,
            "max_mean_load": stats.max_over_mean(per_expert),
            "dropped_fraction": jnp.mean((taken == 0).astype(jnp.float32)),
            "experts_per_token": jnp.mean(taken),
            "router_entropy": stats.entropy(self.probs),
        }

    def masks(self, capacity: int) -> tuple[jax.Array, jax.Array]:
        """The einsum dispatch's one-hot dispatch mask and combine weights, both float32 [G, S, E, C]."""
        S = self.probs.shape[1]
        # [G, E, C] token ids -> [G, E, C, S] one-hot -> [G, S, E, C]
        dispatch = jnp.transpose(jax.nn.one_hot(self.token_index, S, dtype=jnp.float32), (0, 3, 1, 2))
        return dispatch, dispatch * self.weight[:, None, :, :]

    def slots(self, capacity: int) -> SlotMaps:
        G, E, C = self.token_index.shape
        # [G, E, C] -> [G, E*C]; every slot is filled, and a token can sit in several.
        return SlotMaps(None, self.token_index.reshape(G, E * C), None, self.weight.reshape(G, E * C))


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
