"""moe.router='sigmoid' (DeepSeek-V3) against a plain loop reference: choices by sigmoid affinity
plus the selection bias, group-limited selection, weights renormalized over the chosen and scaled,
the sequence-wise balance loss; forward and gradients, under every dispatch strategy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoEConfig, MoELayer
from tests import reference

B, L, D, F, E = 2, 8, 8, 16, 8

CASES = {
    "top2_renorm_scaled_drops": dict(k=2, renormalize=True, routed_scaling_factor=2.5,
                                     train_capacity_factor=1.0, order="token_major"),
    "group_limited_biased": dict(k=2, renormalize=True, num_expert_groups=4, k_groups=2,
                                 bias_update_rate=0.01, train_capacity_factor=0.0),
    "top3_raw_weights_dropless": dict(k=3, train_capacity_factor=0.0),
}


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def choose(scores: np.ndarray, cfg) -> list[int]:
    """One token's experts by loops: group-limited when num_expert_groups > 1."""
    H = cfg.num_expert_groups
    allowed = list(range(E))
    if H > 1:
        size = E // H
        group_score = [sum(sorted(scores[h * size:(h + 1) * size])[-2:]) for h in range(H)]
        best = sorted(range(H), key=lambda h: -group_score[h])[:cfg.k_groups]
        allowed = [e for e in range(E) if e // size in best]
    return sorted(allowed, key=lambda e: -scores[e])[:cfg.k]


def reference_decide(kernel, bias, x, cfg, capacity):
    xg = np.asarray(x, np.float32).reshape(-1, L, D)
    s = sigmoid(xg @ np.asarray(kernel))  # [G, S, E]
    index = np.array([[choose(s[g, t] + bias, cfg) for t in range(L)] for g in range(len(s))])
    kept = np.stack([reference.fill_slots(index[g], capacity, E, order=cfg.order) >= 0
                     for g in range(len(s))])
    return index, kept


def reference_forward(params, x, cfg, index, kept):
    xg = x.reshape(-1, L, D)
    s = jax.nn.sigmoid(xg @ params["kernel"])  # [G, S, E]
    one_hot = np.eye(E)[index]  # [G, S, K, E]
    w = jnp.einsum("gse,gske->gsk", s, one_hot)
    if cfg.renormalize:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    gate = jnp.einsum("gsk,gske->gse", w * cfg.routed_scaling_factor * kept, one_hot)
    y = sum(gate[..., e:e + 1] * reference.ffn(xg.reshape(-1, D), [w_[e] for w_ in params["wi"]],
                                               params["wo"][e], cfg.activation).reshape(xg.shape)
            for e in range(E))
    return y.reshape(x.shape)


def reference_balance_loss(kernel, x, index):
    """DeepSeek-V3's sequence-wise loss, by loops: sum_e f_e P_e, f_e = E / (K S) count_e."""
    xg = np.asarray(x, np.float64).reshape(-1, L, D)
    s = sigmoid(xg @ np.asarray(kernel, np.float64))
    K = index.shape[-1]
    total = 0.0
    for g in range(len(s)):
        for e in range(E):
            f = E / (K * L) * np.sum(index[g] == e)
            total += f * np.mean(s[g, :, e] / s[g].sum(-1))
    return total / len(s)


@pytest.mark.parametrize("strategy", ["einsum", "index", "dropless"])
@pytest.mark.parametrize("name", list(CASES))
def test_sigmoid_router_equals_the_loop_reference(name, strategy):
    cfg = MoEConfig(router="sigmoid", num_experts=E, d_ff=F, dispatch=strategy, **CASES[name])
    layer = MoELayer(cfg, D, rngs=nnx.Rngs(0))
    bias = np.zeros(E, np.float32)
    if cfg.bias_update_rate > 0:  # a bias large enough to change choices
        bias = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (E,)) * 0.2, np.float32)
        layer.router.balance_bias[...] = jnp.asarray(bias)
    x = jax.random.normal(jax.random.PRNGKey(1), (B, L, D))
    probe = jax.random.normal(jax.random.PRNGKey(2), (B, L, D))
    params = {"kernel": layer.router.kernel[...], "wi": [w[...] for w in layer.experts.wi],
              "wo": layer.experts.wo[...]}
    index, kept = reference_decide(params["kernel"], bias, x, cfg, layer.capacity(L))
    if name == "group_limited_biased":  # the bias and the group limit both change some choice
        plain = reference_decide(params["kernel"], np.zeros(E), x,
                                 MoEConfig(router="sigmoid", num_experts=E, k=2), None)[0]
        assert (np.sort(index, -1) != np.sort(plain, -1)).any()
    graphdef, state, rest = nnx.split(layer, nnx.Param, ...)

    def layer_loss(state, x):
        y, aux = nnx.merge(graphdef, state, rest, copy=True)(x)
        return jnp.sum(y * probe), (y, aux)

    (_, (y, aux)), (g_state, g_x) = jax.jit(jax.value_and_grad(layer_loss, (0, 1), has_aux=True))(state, x)
    ref = lambda p, x: jnp.sum(reference_forward(p, x, cfg, index, kept) * probe)  # noqa: E731
    g_ref, g_x_ref = jax.jit(jax.grad(ref, (0, 1)))(params, x)

    np.testing.assert_allclose(y, reference_forward(params, x, cfg, index, kept), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux.stats["dropped_fraction"], 1 - kept.mean(), rtol=1e-6)
    assert (float(aux.stats["dropped_fraction"]) > 0) == (cfg.train_capacity_factor > 0)
    np.testing.assert_allclose(aux.balance_loss, reference_balance_loss(params["kernel"], x, index),
                               rtol=1e-5)
    np.testing.assert_allclose(g_x, g_x_ref, rtol=1e-4, atol=1e-5)
    grads = nnx.merge(graphdef, g_state, rest, copy=True)
    np.testing.assert_allclose(grads.router.kernel[...], g_ref["kernel"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads.experts.wo[...], g_ref["wo"], rtol=1e-4, atol=1e-5)
    for a, b in zip(grads.experts.wi, g_ref["wi"]):
        np.testing.assert_allclose(a[...], b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opts,message", [
    (dict(second_choice="random", k=2), "moe.second_choice='random' does not apply to moe.router='sigmoid'"),
    (dict(soft_slots_per_expert=2), "moe.soft_slots_per_expert=2 does not apply"),
    (dict(num_expert_groups=3), "group-limited sigmoid routing needs moe.num_experts=8 divisible"),
    (dict(num_expert_groups=4, k_groups=1, k=3), "moe.k <= k_groups \\* experts per group"),
])
def test_sigmoid_router_refuses_what_it_cannot_serve(opts, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(router="sigmoid", num_experts=E, **opts)
