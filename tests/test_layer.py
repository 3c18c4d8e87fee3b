"""MoE layer behaviour beyond the reference equality: precision, modes, options, statistics."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoEConfig, MoELayer, dispatch
from moe_jax.experts import FeedForward

D = 8


def make(**opts):
    dtype = opts.pop("dtype", jnp.float32)
    return MoELayer(MoEConfig(**{"num_experts": 4, "d_ff": 16, **opts}), D, dtype=dtype, rngs=nnx.Rngs(0))


def x_batch(B=2, L=8, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, L, D))


def router_dots(fn, *args):
    """The dot_general equations whose right operand is a router kernel [D, E]."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    eqns = []

    def walk(jp):
        eqns.extend(eqn for eqn in jp.eqns
                    if eqn.primitive.name == "dot_general" and tuple(eqn.invars[1].aval.shape) == (D, 4))
        for sub in jax.extend.core.subjaxprs(jp):
            walk(sub)
    walk(jaxpr.jaxpr)
    return eqns


def test_router_runs_in_float32_inside_a_bfloat16_layer():
    layer = make(dtype=jnp.bfloat16, k=2)
    assert layer.router.kernel[...].dtype == jnp.float32
    assert layer.experts.wo[...].dtype == jnp.float32  # float32 parameters, bfloat16 compute
    x = x_batch().astype(jnp.bfloat16)
    y, aux = layer(x)
    assert y.dtype == jnp.bfloat16
    dots = router_dots(lambda x: layer(x)[0], x)
    assert dots, "no router matmul found"
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.float32, jnp.float32]
        assert eqn.outvars[0].aval.dtype == jnp.float32


def test_bfloat16_router_option_rounds_the_router_matmul():
    """moe.router_dtype='bfloat16' is Switch Table 2's ablation: only then is the router matmul bfloat16."""
    layer = make(k=1, router_dtype="bfloat16")
    assert layer.router.kernel[...].dtype == jnp.float32  # the parameter stays float32
    dots = router_dots(lambda x: layer(x)[0], x_batch())
    assert dots and all(eqn.outvars[0].aval.dtype == jnp.bfloat16 for eqn in dots)
    with pytest.raises(ValueError, match="moe.router_dtype must be one of"):
        make(router_dtype="float16")


def test_train_and_eval_capacity_factors():
    layer = make(train_capacity_factor=1.0, eval_capacity_factor=2.0, k=1)
    assert layer.capacity(16) == 4
    layer.eval()
    assert layer.capacity(16) == 8
    layer.train()
    assert layer.capacity(16) == 4


def test_a_fixed_expert_capacity_replaces_the_factors():
    """moe.expert_capacity (HF Switch's absolute count): the same C in training and evaluation, at any
    group size, capped at S; 3 slots per expert keep at most 3 of a group's tokens per expert."""
    layer = make(k=1, expert_capacity=3)
    assert [layer.capacity(s) for s in (2, 8, 64)] == [2, 3, 3]
    layer.eval()
    assert layer.capacity(64) == 3
    layer.train()
    decision = layer.router(x_batch().reshape(2, 8, D), capacity=layer.capacity(8), train=True)
    kept = np.asarray(decision.position >= 0)  # [G, S, K]
    experts = np.asarray(decision.expert_index)
    per_expert = [np.sum(kept[g] & (experts[g] == e)) for g in range(2) for e in range(4)]
    assert max(per_expert) == 3 and np.asarray(decision.position).max() == 2, per_expert


def test_token_dropped_everywhere_leaves_the_layer_as_zero():
    layer = make(k=1, train_capacity_factor=0.25)  # one slot per expert per group of 8
    x = x_batch()
    y, aux = layer(x)
    decision = layer.router(x.reshape(2, 8, D), capacity=layer.capacity(8), train=True)
    dropped = np.asarray((decision.position < 0).all(-1)).reshape(2, 8)
    assert dropped.any()
    np.testing.assert_array_equal(np.asarray(y)[dropped], 0.0)
    assert (np.abs(np.asarray(y)[~dropped]).sum(-1) > 0).all()


def test_statistics():
    layer = make(k=2, train_capacity_factor=0.75)
    _, aux = layer(x_batch())
    s = {k: np.asarray(v) for k, v in aux.stats.items()}
    decision = layer.router(x_batch().reshape(2, 8, D), capacity=layer.capacity(8), train=True)
    kept = np.asarray(decision.position >= 0)
    assert s["tokens_per_expert"].sum() == kept.sum()
    assert s["routed_per_expert"].sum() == 2 * 8 * 2
    np.testing.assert_allclose(s["dropped_fraction_per_rank"], 1 - kept.mean((0, 1)), rtol=1e-6)
    assert s["dropped_fraction_per_rank"][0] <= s["dropped_fraction_per_rank"][1]  # first choices outrank
    np.testing.assert_allclose(s["max_mean_load"],
                               s["routed_per_expert"].max() / s["routed_per_expert"].mean())
    assert 0 < s["router_entropy"] <= np.log(4) + 1e-6


def test_jitter_noise_random_second_choice_and_expert_dropout_only_in_training():
    x = x_batch()
    for opts in ({"jitter_eps": 0.5, "train_capacity_factor": 0.5}, {"router": "noisy_top_k", "k": 2},
                 {"expert_dropout": 0.5}, {"k": 2, "second_choice": "random", "order": "token_major"}):
        layer = make(**opts)
        a, b = layer(x)[0], layer(x)[0]
        assert not np.allclose(a, b), opts  # a fresh draw each training call
        layer.eval()
        np.testing.assert_array_equal(layer(x)[0], layer(x)[0])


def test_random_second_choice_dispatches_every_choice_in_evaluation():
    """GShard's random second expert is a training-time option: in eval mode the layer equals the
    same layer with second_choice='all'."""
    x = x_batch()
    opts = {"k": 2, "order": "token_major", "eval_capacity_factor": 4.0}
    random_layer, all_layer = make(second_choice="random", **opts), make(**opts)
    random_layer.eval()
    all_layer.eval()
    np.testing.assert_array_equal(random_layer(x)[0], all_layer(x)[0])


def test_auxiliary_loss_free_bias_moves_toward_balance():
    layer = make(k=1, bias_update_rate=0.01, train_capacity_factor=0.0)
    # Inputs that all prefer one expert.
    x = jnp.ones((2, 8, D))
    _, aux = layer(x)
    load = np.asarray(aux.stats["routed_per_expert"])
    bias = np.asarray(layer.router.balance_bias[...])
    np.testing.assert_allclose(bias, 0.01 * np.sign(load.mean() - load))
    assert bias[load.argmax()] < 0 < bias[load.argmin()]
    layer.eval()
    layer(x)
    np.testing.assert_array_equal(layer.router.balance_bias[...], bias)  # frozen in eval
    grads = nnx.grad(lambda m: jnp.sum(m(x)[0]))(layer)
    assert "balance_bias" not in str(jax.tree_util.tree_structure(grads))  # not a trained parameter


@pytest.mark.parametrize("router", ["top_k", "sigmoid"])
def test_a_fixed_selection_bias_chooses_but_never_moves(router):
    """moe.selection_bias without updates (an imported e_score_correction_bias): it changes which
    experts are chosen, not their weights, and training leaves it where it is."""
    layer = make(router=router, k=1, selection_bias=True, train_capacity_factor=0.0)
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 8, D))
    layer.eval()
    _, plain = layer(x)
    layer.router.balance_bias[...] = jnp.zeros(layer.cfg.num_experts).at[0].set(10.0)  # everyone picks 0
    layer.train()
    _, aux = layer(x)
    np.testing.assert_array_equal(np.asarray(aux.stats["routed_per_expert"])[0], 16)
    assert np.asarray(plain.stats["routed_per_expert"])[0] < 16
    assert float(layer.router.balance_bias[...][0]) == 10.0  # bias_update_rate=0: never nudged


def test_index_dispatch_never_builds_a_dispatch_mask():
    """[G, S, E, C] masks are the einsum's; the index and dropless strategies' largest arrays are the
    router's [G, S, K, E] one-hot choice masks (its top-k without scatters), with no capacity axis."""
    G, S, E, C, K = 2, 64, 16, 8, 2
    sizes = {}
    for strategy in ("einsum", "index", "dropless"):
        layer = MoELayer(MoEConfig(num_experts=E, d_ff=8, k=K, train_capacity_factor=1.0, dispatch=strategy),
                         8, rngs=nnx.Rngs(0))
        assert layer.capacity(S) == C
        x = jax.random.normal(jax.random.PRNGKey(0), (G, S, 8))
        graphdef, state = nnx.split(layer)
        jaxpr = jax.make_jaxpr(jax.grad(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x)[0]), argnums=1))(
            state, x)
        sizes[strategy] = max(int(np.prod(v.aval.shape)) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars)
    assert sizes["einsum"] >= G * S * E * C
    assert sizes["index"] <= G * S * K * E and sizes["dropless"] <= G * S * K * E < G * S * E * C // 2


BAD_CONFIGS = [
    (dict(k=5), "moe.k"),
    (dict(router="switch"), "moe.router must be one of"),
    (dict(dispatch="scatter"), "moe.dispatch must be one of"),
    (dict(order="random"), "moe.order must be one of"),
    (dict(capacity_formula="gshard"), "moe.capacity_formula"),
    (dict(num_experts=0), "moe.num_experts"),
    (dict(k=1.5), "moe.k must be an int"),
    (dict(expert_dropout=1.0), "moe.expert_dropout"),
    (dict(second_choice="random", k=1), "moe.second_choice"),
    (dict(router="hierarchical", num_expert_groups=3), "moe.num_expert_groups"),
    (dict(router="expert_choice", train_capacity_factor=0.0), "expert_choice"),
    (dict(router="soft", dispatch="dropless"), "moe.dispatch='dropless'"),
    (dict(activation="tanh"), "activation must be one of"),
]
# Options a router does not read are refused, naming the option and the router (never ignored).
NOT_READ = [
    (dict(router="noisy_top_k", bias_update_rate=0.01),
     "moe.bias_update_rate=0.01 does not apply to moe.router='noisy_top_k'"),
    (dict(router="hierarchical", bias_update_rate=0.01), "moe.bias_update_rate=0.01 does not apply"),
    (dict(router="noisy_top_k", k=2, renormalize=True), "moe.renormalize=True does not apply"),
    (dict(router="expert_choice", renormalize=True),
     "moe.renormalize=True does not apply to moe.router='expert_choice'"),
    (dict(router="soft", renormalize=True), "moe.renormalize=True does not apply to moe.router='soft'"),
    (dict(router="soft", router_dtype="bfloat16"), "moe.router_dtype='bfloat16' does not apply"),
    (dict(router="soft", router_init_scale=1.0), "moe.router_init_scale=1.0 does not apply"),
    (dict(router="expert_choice", k=2), "moe.k=2 does not apply to moe.router='expert_choice'"),
    (dict(router="soft", k=2), "moe.k=2 does not apply to moe.router='soft'"),
    (dict(router="expert_choice", order="token_major"), "moe.order='token_major' does not apply"),
    (dict(router="soft", batch_prioritized=True), "moe.batch_prioritized=True does not apply"),
    (dict(router="dense", k=2), "moe.k=2 does not apply to moe.router='dense'"),
    (dict(router="soft", expert_capacity=4), "moe.expert_capacity=4 does not apply to moe.router='soft'"),
    (dict(expert_capacity=4, train_capacity_factor=0.0), "moe.expert_capacity=4 fixes the capacity"),
    (dict(expert_capacity=-1), "expert_capacity"),
]


@pytest.mark.parametrize("opts,message", BAD_CONFIGS + NOT_READ)
def test_bad_config_is_refused_with_the_field_name(opts, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        MoEConfig(**{"num_experts": 4, **opts})


def test_unknown_field_is_refused():
    with pytest.raises(ValueError, match="unknown field.*moe.num_expert"):
        MoEConfig.from_dict({"num_expert": 8})


@pytest.mark.parametrize("opts,message", [
    (dict(router="expert_choice"), "moe.router='expert_choice'"),
    (dict(router="soft"), "moe.router='soft'"),
    (dict(batch_prioritized=True), "moe.batch_prioritized"),
    (dict(k=2), "moe.order='rank_major'"),
])
def test_group_wide_routing_is_refused_in_a_causal_layer(opts, message):
    with pytest.raises(ValueError, match=message):
        MoELayer(MoEConfig(num_experts=4, **opts), D, causal=True, rngs=nnx.Rngs(0))


def test_causal_layer_accepts_causal_options():
    for opts in (dict(k=2, order="token_major"), dict(k=2, train_capacity_factor=0, eval_capacity_factor=0),
                 dict(k=1), dict(router="dense")):
        MoELayer(MoEConfig(num_experts=4, **opts), D, causal=True, rngs=nnx.Rngs(0))


def test_bad_routing_inputs():
    from moe_jax import routing
    logits = jnp.zeros((1, 4, 3))
    with pytest.raises(ValueError, match="k must be an int in"):
        routing.tokens_choose(logits, k=4, capacity=2)
    with pytest.raises(ValueError, match="capacity must be an int >= 1"):
        routing.tokens_choose(logits, k=1, capacity=0)
    with pytest.raises(ValueError, match=r"shape \[G, S, E\]"):
        routing.tokens_choose(jnp.zeros((4, 3)), k=1, capacity=2)
    with pytest.raises(ValueError, match="floating-point"):
        routing.tokens_choose(jnp.zeros((1, 4, 3), jnp.int32), k=1, capacity=2)
    with pytest.raises(ValueError, match="expert-choice capacity"):
        routing.experts_choose(logits, capacity=5)
    with pytest.raises(ValueError, match="capacity_factor=0.01 gives capacity 0"):
        routing.compute_capacity(16, 8, 1, 0.01, rounding="floor", min_capacity=0)
    with pytest.raises(ValueError, match="needs k=2 and an rng"):
        routing.tokens_choose(logits, k=2, capacity=2, second_choice="random")
    layer = make()
    with pytest.raises(ValueError, match=r"input must have shape \[B, L, 8\]"):
        layer(jnp.zeros((2, 8, 3)))
    with pytest.raises(ValueError, match="dispatch must be one of"):
        dispatch.get("scatter")


def test_group_size_is_a_maximum():
    """Flaxformer's max_group_size: the largest group that tiles the batch, never across a
    sequence boundary unless whole sequences fit."""
    assert make().group_shape(4, 10) == (4, 10)  # 0: one sequence per group
    assert make(group_size=512).group_shape(128, 114) == (32, 456)  # Switch-Base targets: 4 sequences a group
    assert make(group_size=512).group_shape(128, 512) == (128, 512)
    assert make(group_size=25).group_shape(4, 10) == (2, 20)  # two whole sequences
    assert make(group_size=30).group_shape(4, 10) == (2, 20)  # 3 does not divide the batch of 4
    assert make(group_size=4).group_shape(4, 10) == (20, 2)  # the largest divisor of 10 that is <= 4


@pytest.mark.parametrize("dispatch_name", ["index", "einsum"])
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_one_expert_without_drops_is_the_dense_ffn(dispatch_name, activation):
    """With one expert every gate is 1 and, at capacity factor >= 1, nothing is dropped: the layer
    must equal a dense FFN holding the same weights, in value and in every gradient. A scale, a
    lost token or a gate applied twice anywhere between router and combine would show here."""
    layer = make(num_experts=1, k=1, train_capacity_factor=1.0, dispatch=dispatch_name, activation=activation)
    dense = FeedForward(D, 16, activation=activation, rngs=nnx.Rngs(1))
    dense.wo[...] = layer.experts.wo[0]
    for w_dense, w_expert in zip(dense.wi, layer.experts.wi):
        w_dense[...] = w_expert[0]
    x = x_batch()

    def value_and_grads(module, fn):
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)

        def loss(params, x):
            return jnp.sum(jnp.sin(fn(nnx.merge(graphdef, params, rest, copy=True), x)))
        return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

    moe_value, (moe_g, moe_g_x) = value_and_grads(layer, lambda m, x: m(x)[0])
    dense_value, (dense_g_w, dense_g_x) = value_and_grads(dense, lambda m, x: m(x))
    moe_g_w = moe_g["experts"]
    np.testing.assert_allclose(moe_value, dense_value, rtol=1e-5)
    np.testing.assert_allclose(moe_g_x, dense_g_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(moe_g_w["wo"][...][0], dense_g_w["wo"][...], rtol=1e-5, atol=1e-6)
    assert len(moe_g_w["wi"]) == len(dense_g_w["wi"]) == (2 if activation == "swiglu" else 1)
    for g_expert, g_dense in zip(moe_g_w["wi"].values(), dense_g_w["wi"].values()):
        np.testing.assert_allclose(g_expert[...][0], g_dense[...], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_experts", [1, 8, 64])
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_each_expert_is_initialised_like_the_dense_ffn(num_experts, activation):
    """Every expert's [D, F] and [F, D] matrices have the dense FFN's init std sqrt(1 / fan_in),
    whatever E. Found by the science diagnosis (experiments/results/diagnosis): the expert axis
    counted into fan-in shrank each expert's std by sqrt(E), so a model with more experts started
    smaller and, under Adafactor's parameter-scaled updates, learned more slowly."""
    d_model, d_ff = 64, 256
    experts = FeedForward(d_model, d_ff, num_experts=num_experts, activation=activation, rngs=nnx.Rngs(0))
    dense = FeedForward(d_model, d_ff, activation=activation, rngs=nnx.Rngs(0))
    for w_experts, w_dense, fan_in in [(experts.wo, dense.wo, d_ff)] + [
            (we, wd, d_model) for we, wd in zip(experts.wi, dense.wi)]:
        per_expert = np.std(np.asarray(w_experts[...]), axis=(1, 2))  # [E]
        np.testing.assert_allclose(per_expert, fan_in ** -0.5, rtol=0.05)
        assert np.std(np.asarray(w_dense[...])) == pytest.approx(fan_in ** -0.5, rel=0.05)


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_router_init_scale_sets_the_router_std(scale):
    """moe.router_init_scale s: the router kernel [D, E] is drawn with std sqrt(s / D) (Switch Table 3)."""
    d_model = 256
    layer = MoELayer(MoEConfig(num_experts=64, d_ff=8, router_init_scale=scale), d_model, rngs=nnx.Rngs(0))
    kernel = np.asarray(layer.router.kernel[...])
    assert kernel.shape == (d_model, 64)
    assert np.std(kernel) == pytest.approx((scale / d_model) ** 0.5, rel=0.03)
