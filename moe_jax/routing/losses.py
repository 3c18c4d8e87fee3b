"""Auxiliary router losses, all computed in float32.

- load_balancing_loss: Switch Transformer eq. 4-6 (Fedus et al. 2021).
- router_z_loss: ST-MoE eq. 5 (Zoph et al. 2022), on logits, never on probabilities.
- cv_squared, noisy_load: importance and load losses of noisy top-k gating (Shazeer et al. 2017).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def expert_counts(expert_index: jax.Array, num_experts: int) -> jax.Array:
    """Assignments per expert and group: int [G, S, K] -> float32 [G, E].

    Entries equal to num_experts (undispatched) are not counted.
    """
    G = expert_index.shape[0]
    flat = expert_index.reshape(G, -1)  # [G, S*K]
    counts = jax.vmap(lambda e: jnp.bincount(e, length=num_experts + 1))(flat)  # [G, E+1]
    return counts[:, :num_experts].astype(jnp.float32)


def load_balancing_loss(probs: jax.Array, expert_index: jax.Array) -> jax.Array:
    """Switch balancing loss E * sum_e f_e * P_e per group, averaged over groups.

    probs: float [G, S, E] router probabilities; expert_index: int [G, S, K], the top-k choices
    before any capacity drop. f_e is the fraction of tokens that chose e (a token picks an expert
    at most once, so this is the sum over its k choices); P_e the mean probability of e.
    The minimum, under uniform routing, is k.
    """
    G, S, E = probs.shape
    f = expert_counts(expert_index, E) / S  # [G, E]
    p = jnp.mean(probs.astype(jnp.float32), axis=1)  # [G, S, E] -> [G, E]
    return jnp.mean(E * jnp.sum(f * p, axis=-1))  # [G] -> []


def router_z_loss(logits: jax.Array) -> jax.Array:
    """Mean over tokens of logsumexp(logits)^2: [..., E] -> []."""
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [..., E] -> [...]
    return jnp.mean(jnp.square(z))


def cv_squared(x: jax.Array) -> jax.Array:
    """Squared coefficient of variation over the last axis, averaged over the rest: [..., E] -> []."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1)
    var = jnp.var(x, axis=-1)
    return jnp.mean(var / (jnp.square(mean) + 1e-10))


def noisy_load(clean_logits: jax.Array, noisy_logits: jax.Array, noise_std: jax.Array, top: jax.Array,
               k: int) -> jax.Array:
    """Smooth estimate of tokens per expert for noisy top-k gating (Shazeer et al. 2017, App. A).

    P(token, e) = Phi((clean_e - threshold_e) / std_e), the probability that e stays in the top
    k when its noise is redrawn; threshold_e is the k-th largest noisy logit of the other experts
    (the k+1-th overall when e is in the top k, the k-th otherwise).
    Inputs [G, S, E], and top [G, S, min(K+1, E)]: the largest noisy logits, descending. Returns the
    expected load float32 [G, E].
    """
    kth = top[..., k - 1 : k]  # [G, S, 1], the k-th largest noisy logit
    kth_plus = top[..., -1:]  # [G, S, 1], the (k+1)-th (or the k-th when k == E)
    in_top = noisy_logits >= kth  # [G, S, E]
    threshold = jnp.where(in_top, kth_plus, kth)  # [G, S, E]
    prob = jax.scipy.stats.norm.cdf((clean_logits - threshold) / noise_std)  # [G, S, E]
    return jnp.sum(prob, axis=1)  # [G, S, E] -> [G, E]
