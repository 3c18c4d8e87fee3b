"""Every router x every dispatch strategy: the MoE layer's output and gradients equal the plain
loop-over-experts reference (tests/reference.py), which shares no routing or dispatch code."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoEConfig, MoELayer, grouped, routers
from tests import reference

B, L, D, F, E = 2, 8, 8, 16, 4

CASES = {
    "switch_top1_drops": dict(router="top_k", k=1, train_capacity_factor=1.0),
    "top2_rank_major": dict(router="top_k", k=2, train_capacity_factor=0.75, activation="swiglu"),
    "top2_token_major_renorm": dict(router="top_k", k=2, train_capacity_factor=0.75, order="token_major",
                                    renormalize=True, activation="gelu"),
    "top2_bpr": dict(router="top_k", k=2, train_capacity_factor=0.75, batch_prioritized=True),
    "top2_dropless": dict(router="top_k", k=2, train_capacity_factor=0.0),
    "top1_tokens_formula_groups": dict(router="top_k", k=1, train_capacity_factor=1.0,
                                       capacity_formula="tokens", capacity_rounding="round", group_size=4),
    "shared_experts": dict(router="top_k", k=2, train_capacity_factor=1.0, num_shared_experts=1,
                           activation="geglu", order="token_major"),
    "expert_choice": dict(router="expert_choice", train_capacity_factor=1.0),
    "soft": dict(router="soft", soft_slots_per_expert=2),
    "dense": dict(router="dense"),
    "hierarchical": dict(router="hierarchical", num_expert_groups=2, k_groups=2, k=1,
                         train_capacity_factor=0.75),
    "noisy_top_k_eval": dict(router="noisy_top_k", k=2, train_capacity_factor=1.0, eval_capacity_factor=0.75),
    "noisy_top_k_train": dict(router="noisy_top_k", k=2, train_capacity_factor=0.75, order="token_major"),
}
NOISE_KEY = jax.random.PRNGKey(5)  # the noisy router's training draw, given to the layer and the reference
DROPPING = ("switch_top1_drops", "top2_rank_major", "top2_token_major_renorm", "top2_bpr",
            "top1_tokens_formula_groups", "hierarchical", "noisy_top_k_eval", "noisy_top_k_train",
            "shared_experts")
# Every dispatch strategy the router supports, 'dropless' with every grouped matmul backend; a router
# with its own path (soft MoE) runs it under 'auto'.
PARAMS = [(name, d, b) for name, opts in CASES.items()
          for d in (routers.get(opts["router"]).dispatches or ("auto",))
          for b in (grouped.BACKENDS if d == "dropless" else ("auto",))]


def reference_params(layer: MoELayer) -> dict:
    p = {"kernel": layer.router.kernel[...], "wi": [w[...] for w in layer.experts.wi],
         "wo": layer.experts.wo[...]}
    if hasattr(layer.router, "group_kernel"):
        p["group_kernel"] = layer.router.group_kernel[...]
    if hasattr(layer.router, "scale"):
        p["scale"] = layer.router.scale[...]
    if hasattr(layer.router, "noise_kernel") and not layer.deterministic:
        p["noise_kernel"] = layer.router.noise_kernel[...]
    if layer.shared is not None:
        p["shared_wi"] = [w[...] for w in layer.shared.wi]
        p["shared_wo"] = layer.shared.wo[...]
    return p


def reference_forward(p, x, cfg, decision):
    y = reference.apply(p, x, cfg, decision)
    if "shared_wi" in p:
        y = y + reference.ffn(x.reshape(-1, D), p["shared_wi"], p["shared_wo"],
                              cfg.activation).reshape(x.shape)
    return y


def layer_params_as_reference(grads: nnx.State, layer: MoELayer) -> dict:
    """Map the layer's gradient state onto the reference's parameter dict."""
    g = nnx.merge(nnx.graphdef(layer), grads, nnx.state(layer, nnx.Not(nnx.Param)), copy=True)
    return reference_params(g)


@pytest.mark.parametrize("name,strategy,backend", PARAMS)
def test_layer_equals_reference(name, strategy, backend):
    cfg = MoEConfig(num_experts=E, d_ff=F, dispatch=strategy, grouped_matmul=backend, **CASES[name])
    layer = MoELayer(cfg, D, rngs=nnx.Rngs(0))
    if name.endswith("_eval"):
        layer.eval()
    if name == "noisy_top_k_train":  # the router draws its noise from this key
        layer.router.rng = lambda: NOISE_KEY
    x = jax.random.normal(jax.random.PRNGKey(1), (B, L, D))
    probe = jax.random.normal(jax.random.PRNGKey(2), (B, L, D))  # random cotangent

    S = cfg.group_size or L
    capacity = layer.capacity(S)
    params = reference_params(layer)
    if "noise_kernel" in params:
        params["noise"] = jax.random.normal(NOISE_KEY, (B * L // S, S, E))
    decision = reference.decide(params, x, cfg, capacity)
    graphdef, state, rest = nnx.split(layer, nnx.Param, ...)

    def layer_loss(state, x):
        y, aux = nnx.merge(graphdef, state, rest, copy=True)(x)
        return jnp.sum(y * probe), (y, aux)

    def reference_loss(p, x):
        y = reference_forward(p, x, cfg, decision)
        return jnp.sum(y * probe), y

    # One compilation each for the layer's and the reference's forward and gradients.
    (_, (y, aux)), (g_state, g_x) = jax.jit(jax.value_and_grad(layer_loss, (0, 1), has_aux=True))(state, x)
    (_, y_ref), (g_ref, g_x_ref) = jax.jit(jax.value_and_grad(reference_loss, (0, 1), has_aux=True))(
        params, x)

    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    if "kept" in decision:
        np.testing.assert_allclose(aux.stats["dropped_fraction"], 1 - decision["kept"].mean(), rtol=1e-6)
    # Each case exercises what it claims: the dropping cases drop, the dropless ones never do.
    if name in DROPPING:
        assert float(aux.stats["dropped_fraction"]) > 0
    elif cfg.router != "expert_choice":
        assert float(aux.stats["dropped_fraction"]) == 0
    np.testing.assert_allclose(g_x, g_x_ref, rtol=1e-4, atol=1e-5)
    flat_layer = jax.tree.leaves(layer_params_as_reference(g_state, layer))
    g_ref.pop("noise", None)  # the drawn noise is an input, not a parameter
    flat_ref = jax.tree.leaves(g_ref)
    assert len(flat_layer) == len(flat_ref)
    for a, b in zip(flat_layer, flat_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
