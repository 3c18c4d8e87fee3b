"""Two-level hierarchical gating (Jordan & Jacobs 1994; the sparse form of Shazeer et al. 2017, App. B).

E = E1 * E2 experts in E1 groups of E2. An outer gate picks the k_outer most probable groups; an
inner gate per group (softmax over its E2 experts) picks k_inner experts inside each chosen group.
A token's K = k_outer * k_inner assignments, ordered (outer rank, inner rank), carry weight
p_outer * p_inner and fill expert buffers like any token-choice decision. The balancing loss is
Switch's, taken over the flat distribution p_outer(group) * p_inner(expert | group).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import capacity as capacity_lib
from moe_jax.routing import losses
from moe_jax.routing.token_choice import (TokenChoice, bpr_token_order, check_capacity, check_logits,
                                         one_hot_take, route_choices)


def hierarchical_choose(
    outer_logits: jax.Array,
    inner_logits: jax.Array,
    *,
    k_outer: int,
    k_inner: int,
    capacity: int | None,
    renormalize: bool = False,
    order: capacity_lib.FillOrder = "rank_major",
    batch_prioritized: bool = False,
) -> TokenChoice:
    """outer_logits float [G, S, E1]; inner_logits float [G, S, E1, E2]. Experts are numbered g * E2 + e."""
    check_logits(outer_logits, "outer_logits")
    check_capacity(capacity)
    if inner_logits.ndim != 4 or inner_logits.shape[:3] != outer_logits.shape:
        raise ValueError(f"inner_logits must have shape [G, S, E1, E2] matching outer_logits "
                         f"{outer_logits.shape}, "
                         f"got {inner_logits.shape}")
    G, S, E1, E2 = inner_logits.shape
    if not 1 <= k_outer <= E1 or not 1 <= k_inner <= E2:
        raise ValueError(f"hierarchical k_outer must be in [1, {E1}] and k_inner in [1, {E2}], "
                         f"got {k_outer}, {k_inner}")
    outer_logits = outer_logits.astype(jnp.float32)
    inner_logits = inner_logits.astype(jnp.float32)
    p_outer = jax.nn.softmax(outer_logits, axis=-1)  # [G, S, E1]
    p_inner = jax.nn.softmax(inner_logits, axis=-1)  # [G, S, E1, E2]
    # Choices by top_k on stopped gradients, their values by one-hot selects: no scatter in the backward.
    group = jax.lax.top_k(jax.lax.stop_gradient(p_outer), k_outer)[1]  # [G, S, K1]
    w_outer = one_hot_take(p_outer, group)  # [G, S, K1]
    chosen = group[..., None] == jnp.arange(E1, dtype=group.dtype)  # [G, S, K1, E1]
    # [G, S, K1, E1, E2] -> [G, S, K1, E2]: each chosen group's inner probabilities
    p_inner_chosen = jnp.sum(jnp.where(chosen[..., None], p_inner[:, :, None], 0), axis=3)
    inner = jax.lax.top_k(jax.lax.stop_gradient(p_inner_chosen), k_inner)[1]  # [G, S, K1, K2]
    w_inner = one_hot_take(p_inner_chosen, inner)  # [G, S, K1, K2]
    expert_index = (group[..., None] * E2 + inner).reshape(G, S, k_outer * k_inner)  # [G, S, K]
    weight = (w_outer[..., None] * w_inner).reshape(G, S, k_outer * k_inner)  # [G, S, K]
    if renormalize:
        weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
    probs = (p_outer[..., None] * p_inner).reshape(G, S, E1 * E2)  # [G, S, E]
    token_order = bpr_token_order(weight[..., 0]) if batch_prioritized else None
    position, weight = route_choices(expert_index, weight, num_experts=E1 * E2, capacity=capacity,
                                     order=order, token_order=token_order)
    return TokenChoice(
        expert_index=expert_index.astype(jnp.int32),
        position=position,
        weight=weight,
        probs=probs,
        balance_loss=losses.load_balancing_loss(probs, expert_index),
        z_loss=losses.router_z_loss(outer_logits) + losses.router_z_loss(inner_logits),
        capacity=capacity,
    )
