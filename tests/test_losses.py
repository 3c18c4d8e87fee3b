"""Auxiliary losses: Switch balancing loss, ST-MoE z-loss, noisy top-k losses."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routing
from moe_jax.routing import losses


@pytest.mark.parametrize("k", [1, 2, 4])
def test_balance_loss_is_k_under_uniform_routing(k):
    E, S = 8, 64
    # Near-uniform probabilities; token s prefers experts s, s+1, ... (mod E), so every expert is
    # chosen equally often at every rank.
    s = jnp.arange(S)[:, None]
    e = jnp.arange(E)[None, :]
    logits = 1e-4 * (E - (e - s) % E).astype(jnp.float32)[None]  # [1, S, E]
    d = routing.tokens_choose(logits, k=k, capacity=None)
    np.testing.assert_allclose(d.balance_loss, k, rtol=1e-3)


def test_balance_loss_matches_a_hand_computation():
    # One group, 2 tokens, 2 experts, top-1. probs: t0 = (0.8, 0.2), t1 = (0.6, 0.4): both choose
    # expert 0, f = (1, 0), P = (0.7, 0.3); loss = E * sum f * P = 2 * 0.7 = 1.4.
    probs = jnp.array([[[0.8, 0.2], [0.6, 0.4]]])
    d = routing.tokens_choose(jnp.log(probs), k=1, capacity=None)
    np.testing.assert_allclose(d.balance_loss, 1.4, rtol=1e-6)
    # Two groups average: the second group, t = (0.1, 0.9), (0.3, 0.7): f = (0, 1), P = (0.2, 0.8)
    # -> 1.6; mean 1.5.
    probs2 = jnp.concatenate([probs, jnp.array([[[0.1, 0.9], [0.3, 0.7]]])])
    np.testing.assert_allclose(routing.tokens_choose(jnp.log(probs2), k=1, capacity=None).balance_loss, 1.5,
                               rtol=1e-6)


def test_balance_loss_counts_choices_before_capacity_drops():
    logits = jnp.log(jnp.array([[[0.8, 0.2], [0.6, 0.4]]]))
    dropped = routing.tokens_choose(logits, k=1, capacity=1)
    assert int(dropped.position[0, 1, 0]) == -1
    np.testing.assert_allclose(dropped.balance_loss, 1.4, rtol=1e-6)


def test_z_loss_is_taken_on_logits_not_probabilities():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 4))
    expected = jnp.mean(jax.nn.logsumexp(logits, -1) ** 2)
    d = routing.tokens_choose(logits, k=1, capacity=None)
    np.testing.assert_allclose(d.z_loss, expected, rtol=1e-6)
    # Shifting every logit by c leaves probabilities unchanged but moves logsumexp by c.
    shifted = routing.tokens_choose(logits + 3.0, k=1, capacity=None)
    np.testing.assert_allclose(shifted.z_loss, jnp.mean((jax.nn.logsumexp(logits, -1) + 3.0) ** 2), rtol=1e-6)
    np.testing.assert_array_equal(shifted.expert_index, d.expert_index)
    ec = routing.experts_choose(logits, capacity=2)
    np.testing.assert_allclose(ec.z_loss, expected, rtol=1e-6)


def test_losses_are_float32_for_bfloat16_logits():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 4)).astype(jnp.bfloat16)
    d = routing.tokens_choose(logits, k=2, capacity=3)
    assert d.balance_loss.dtype == d.z_loss.dtype == d.weight.dtype == d.probs.dtype == jnp.float32


def test_noisy_top_k_losses():
    key = jax.random.PRNGKey(0)
    clean = jax.random.normal(key, (2, 16, 4))
    noise = jnp.zeros_like(clean)
    train = routing.noisy_tokens_choose(clean, noise, k=2, capacity=None, rng=jax.random.PRNGKey(1))
    # The gate is a softmax over the k kept noisy logits: the k weights sum to 1.
    np.testing.assert_allclose(jnp.sum(train.weight, -1), 1.0, rtol=1e-6)
    # The smooth load is differentiable in the noise and in the clean logits.
    def balance(clean, noise):
        return routing.noisy_tokens_choose(clean, noise, k=2, capacity=None,
                                           rng=jax.random.PRNGKey(1)).balance_loss
    g_clean, g_noise = jax.grad(balance, argnums=(0, 1))(clean, noise)
    assert float(jnp.abs(g_clean).sum()) > 0 and float(jnp.abs(g_noise).sum()) > 0
    # Without rng there is no noise: the decision is plain renormalized top-k of the clean logits.
    evaluation = routing.noisy_tokens_choose(clean, noise, k=2, capacity=None, rng=None)
    plain = routing.tokens_choose(clean, k=2, capacity=None, renormalize=True)
    np.testing.assert_array_equal(evaluation.expert_index, plain.expert_index)
    np.testing.assert_allclose(evaluation.weight, plain.weight, rtol=1e-6)


def test_cv_squared():
    np.testing.assert_allclose(losses.cv_squared(jnp.array([1.0, 1.0, 1.0])), 0.0, atol=1e-7)
    np.testing.assert_allclose(losses.cv_squared(jnp.array([0.0, 2.0])), 1.0, rtol=1e-6)  # var 1, mean 1


def test_noisy_top_k_balance_loss_is_shazeers_estimator():
    """Shazeer et al. 2017 (App. A), by loops: importance_e = sum of the gates (softmax over the k
    largest noisy logits), load_e = sum over tokens of Phi((clean_e - kth_excluding_e) / std_e), where
    kth_excluding_e is the k-th largest noisy logit among the other experts; loss = CV^2 + CV^2."""
    G, S, E, k = 2, 6, 5, 2
    clean = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (G, S, E)), np.float64)
    noise_logits = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (G, S, E)), np.float64)
    rng = jax.random.PRNGKey(2)
    d = routing.noisy_tokens_choose(jnp.asarray(clean, jnp.float32), jnp.asarray(noise_logits, jnp.float32),
                                    k=k, capacity=None, rng=rng)
    std = np.log1p(np.exp(noise_logits)) + 1e-2  # softplus + the noise floor
    noisy = clean + std * np.asarray(jax.random.normal(rng, (G, S, E)), np.float64)

    def cv2(x):
        return np.var(x) / np.mean(x) ** 2

    total = 0.0
    for g in range(G):
        importance, load = np.zeros(E), np.zeros(E)
        for s in range(S):
            top = sorted(range(E), key=lambda e: -noisy[g, s, e])[:k]
            z = np.exp(noisy[g, s, top] - noisy[g, s, top].max())
            importance[top] += z / z.sum()
            for e in range(E):
                kth_other = sorted((noisy[g, s, o] for o in range(E) if o != e), reverse=True)[k - 1]
                load[e] += 0.5 * (1 + math.erf((clean[g, s, e] - kth_other) / std[g, s, e] / math.sqrt(2)))
        total += cv2(importance) + cv2(load)
    np.testing.assert_allclose(d.balance_loss, total / G, rtol=2e-4)
