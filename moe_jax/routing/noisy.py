"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks").

In training, H = clean + eps * softplus(noise_logits), eps ~ N(0, 1); the gate is a softmax over
the k largest H (equal to renormalizing the softmax of H over the chosen k). The balancing loss is
Shazeer's two terms: CV^2 of each expert's summed gates (importance) plus CV^2 of its smooth load
estimate (the probability, under the noise, that it stays in the top k). Without noise (eval) the
load is the plain count of assignments.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routing import capacity as capacity_lib
from moe_jax.routing import losses
from moe_jax.routing.token_choice import TokenChoice, check_logits, one_hot_take, tokens_choose

NOISE_EPSILON = 1e-2  # floor of the noise std, as in Shazeer et al.'s implementation


def noisy_tokens_choose(
    clean_logits: jax.Array,
    noise_logits: jax.Array,
    *,
    k: int,
    capacity: int | None,
    rng: jax.Array | None,
    order: capacity_lib.FillOrder = "rank_major",
    batch_prioritized: bool = False,
) -> TokenChoice:
    """clean_logits, noise_logits: float [G, S, E]; rng None means no noise (evaluation)."""
    check_logits(clean_logits, "clean_logits")
    check_logits(noise_logits, "noise_logits")
    clean = clean_logits.astype(jnp.float32)
    std = jax.nn.softplus(noise_logits.astype(jnp.float32)) + NOISE_EPSILON  # [G, S, E]
    noisy = clean if rng is None else clean + std * jax.random.normal(rng, clean.shape)  # [G, S, E]
    decision = tokens_choose(noisy, k=k, capacity=capacity, renormalize=True, order=order,
                             batch_prioritized=batch_prioritized)
    num_experts = clean.shape[-1]
    # Gates before capacity drops, scattered to [G, S, E], summed over tokens: importance [G, E].
    # [G, S, K+1]: the k + 1 largest noisy logits, by one-hot selects (no scatter in the backward pass)
    top_noisy = one_hot_take(noisy, jax.lax.top_k(jax.lax.stop_gradient(noisy), min(k + 1, num_experts))[1])
    gates = jax.nn.softmax(top_noisy[..., :k], axis=-1)  # [G, S, K]
    importance = jnp.einsum("gsk,gske->ge", gates, jax.nn.one_hot(decision.expert_index, num_experts))
    if rng is None:
        load = losses.expert_counts(decision.expert_index, num_experts)  # [G, E]
    else:
        load = losses.noisy_load(clean, noisy, std, top_noisy, k)  # [G, E]
    return decision.replace(balance_loss=losses.cv_squared(importance) + losses.cv_squared(load),
                            z_loss=losses.router_z_loss(clean))
