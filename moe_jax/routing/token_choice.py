"""Token-choice top-k routing: Switch (k=1, Fedus et al. 2021), GShard (k=2, Lepikhin et al. 2020),
Mixtral (k=2 of 8, renormalized; Jiang et al. 2024).

Each token picks its k most probable experts; the experts' buffers are filled in a priority
order and assignments beyond the capacity are dropped. Options that differ between papers:
- renormalize: divide the k chosen probabilities by their sum (GShard, Mixtral) or not
  (Flaxformer, V-MoE: for k=2, p1 + p2 < 1).
- order / batch_prioritized: see capacity.fill_rank; BPR is V-MoE's Batch Prioritized Routing.
- second_choice='random': GShard's stochastic second expert, dispatched only when
  2 * p2 / (p1 + p2) > u, u ~ U[0, 1).
- choice_bias: auxiliary-loss-free balancing (DeepSeek-V3, Wang et al. 2024): a per-expert bias
  added to the scores that choose experts, never to the combine weights.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax.routing import capacity as capacity_lib
from moe_jax.routing import losses

SECOND_CHOICE_POLICIES = ("all", "random")


@struct.dataclass
class TokenChoice:
    """A token-choice routing decision for G groups of S tokens, K choices each."""

    expert_index: jax.Array  # int32 [G, S, K]: chosen experts, by descending score
    position: jax.Array  # int32 [G, S, K]: slot in that expert's buffer, -1 when dropped
    weight: jax.Array  # float32 [G, S, K]: combine weight, exactly 0 when dropped
    probs: jax.Array  # float32 [G, S, E]: router probabilities (for statistics)
    balance_loss: jax.Array  # float32 []: the router's balancing loss
    z_loss: jax.Array  # float32 []: router z-loss
    capacity: int | None = struct.field(pytree_node=False)  # slots per expert and group; None: dropless

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]


def check_logits(logits: jax.Array, name: str = "logits") -> None:
    if logits.ndim != 3:
        raise ValueError(f"{name} must have shape [G, S, E] (groups, tokens, experts), got shape {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {logits.dtype}")


def check_capacity(capacity: int | None) -> None:
    if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
        raise ValueError(
            f"capacity must be an int >= 1 (slots per expert and group), or None for dropless routing; got {capacity!r}")


def bpr_token_order(top1: jax.Array) -> jax.Array:
    """Batch Prioritized Routing: rank of each token by descending top-1 score, ties by position.

    top1: float [G, S] -> int32 [G, S] (0 = served first).
    """
    by_priority = jnp.argsort(-top1, axis=-1, stable=True)  # [G, S] token ids, highest first
    return jnp.argsort(by_priority, axis=-1, stable=True).astype(jnp.int32)  # inverse permutation


def route_choices(
    expert_index: jax.Array,
    weight: jax.Array,
    *,
    num_experts: int,
    capacity: int | None,
    order: capacity_lib.FillOrder,
    token_order: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Assign slots to chosen experts and zero the weights of dropped assignments.

    expert_index int [G, S, K] (num_experts marks "not dispatched"), weight float [G, S, K],
    token_order int [G, S] or None. Returns (position int32 [G, S, K], weight float32 [G, S, K]).
    """
    G, S, K = expert_index.shape
    if token_order is None:
        rank = capacity_lib.fill_rank(S, K, order)  # [S, K]
    else:
        rank = jax.vmap(lambda t: capacity_lib.fill_rank(S, K, order, t))(token_order)  # [G, S, K]
    position = capacity_lib.assign_slots(expert_index, rank, num_experts, capacity)  # [G, S, K]
    return position, jnp.where(position >= 0, weight, 0.0).astype(jnp.float32)


def tokens_choose(
    logits: jax.Array,
    *,
    k: int,
    capacity: int | None,
    batch_prioritized: bool = False,
    renormalize: bool = False,
    order: capacity_lib.FillOrder = "rank_major",
    second_choice: Literal["all", "random"] = "all",
    choice_bias: jax.Array | None = None,
    rng: jax.Array | None = None,
) -> TokenChoice:
    """Route every token of every group to its top-k experts.

    logits: float [G, S, E], cast to float32. capacity: slots per expert and group (see
    capacity.compute_capacity), or None to drop nothing. Returns a TokenChoice.
    """
    check_logits(logits)
    num_experts = logits.shape[-1]
    if not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an int in [1, num_experts={num_experts}], got {k!r}")
    check_capacity(capacity)
    if order not in capacity_lib.FILL_ORDERS:
        raise ValueError(f"order must be one of {capacity_lib.FILL_ORDERS}, got {order!r}")
    if second_choice not in SECOND_CHOICE_POLICIES:
        raise ValueError(f"second_choice must be one of {SECOND_CHOICE_POLICIES}, got {second_choice!r}")
    if second_choice == "random" and (k != 2 or rng is None):
        raise ValueError("second_choice='random' (GShard) needs k=2 and an rng key; "
                         f"got k={k}, rng={'set' if rng is not None else 'None'}")

    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)  # [G, S, E]
    scores = probs if choice_bias is None else probs + choice_bias.astype(jnp.float32)  # [G, S, E]
    top_scores, expert_index = jax.lax.top_k(scores, k)  # [G, S, E] -> [G, S, K] x2
    weight = jnp.take_along_axis(probs, expert_index, axis=-1)  # [G, S, K]
    if renormalize:
        weight = weight / jnp.sum(weight, axis=-1, keepdims=True)  # [G, S, K]

    dispatched = expert_index
    if second_choice == "random":
        gate2 = weight[..., 1] / (weight[..., 0] + weight[..., 1])  # [G, S]
        keep2 = 2.0 * gate2 > jax.random.uniform(rng, gate2.shape)  # [G, S]
        dispatched = expert_index.at[..., 1].set(jnp.where(keep2, expert_index[..., 1], num_experts))

    token_order = bpr_token_order(top_scores[..., 0]) if batch_prioritized else None
    position, weight = route_choices(
        dispatched, weight, num_experts=num_experts, capacity=capacity, order=order, token_order=token_order)
    return TokenChoice(
        expert_index=expert_index.astype(jnp.int32),
        position=position,
        weight=weight,
        probs=probs,
        balance_loss=losses.load_balancing_loss(probs, expert_index),
        z_loss=losses.router_z_loss(logits),
        capacity=capacity,
    )


def dense_choose(logits: jax.Array) -> TokenChoice:
    """Dense mixture of experts (Jacobs et al. 1991): every token goes to every expert, weighted by
    the softmax gate. Nothing is dropped and there is nothing to balance (balance_loss is 0)."""
    check_logits(logits)
    decision = tokens_choose(logits, k=logits.shape[-1], capacity=None)
    return decision.replace(balance_loss=jnp.zeros((), jnp.float32))
