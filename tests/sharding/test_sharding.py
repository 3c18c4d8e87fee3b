"""Expert parallelism on 8 emulated devices: sharded equals unsharded (training, evaluation and
generation), experts split evenly, checkpoints restore across meshes, all-to-all in the compiled step, and bad
meshes refused."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoEConfig, MoELayer, aot, configuration, expert_parallel, sharding
from moe_jax.checkpoints import Checkpointer
from moe_jax.models import generate
from moe_jax.trainer import Trainer
from tests.test_train import small_config, synthetic_batch

MESHES = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]
ROUTERS = {"top1": dict(router="top_k", k=1), "top2": dict(router="top_k", k=2, order="token_major"),
           "expert_choice": dict(router="expert_choice"),
           # capacity factor 0: the dropless dispatch, expert-parallel (moe_jax.expert_parallel)
           "dropless_top2": dict(router="top_k", k=2, order="token_major", train_capacity_factor=0.0,
                                 eval_capacity_factor=0.0)}


def config_for(router: str, num_experts: int, mesh_shape=(1, 1, 1)):
    """A minimal MoE model: one sparse layer (in the encoder for group-wide expert choice)."""
    config = small_config(batch_size=8)
    config.moe.update(dict(num_experts=num_experts, **ROUTERS[router]))
    if router == "expert_choice":
        config.model.update(dict(num_encoder_layers=1, encoder_moe_every=1, num_decoder_layers=1,
                                 decoder_moe_every=0))
    else:
        config.model.update(dict(kind="decoder", num_decoder_layers=1, decoder_moe_every=1))
        config.data.objective = "lm"
        config.seq_len, config.target_seq_len = config.target_seq_len, 0  # the same 8 decoder positions
    config.mesh_shape = mesh_shape
    return config


def loss_and_grads(config, mesh_shape):
    n = int(np.prod(mesh_shape))
    trainer = Trainer(config, configuration.validate(config),
                      mesh=sharding.make_mesh(mesh_shape, jax.devices()[:n]))
    loss, grads = trainer.jit_loss_and_grads()(trainer.create_state(0),
                                               trainer.shard_batch(synthetic_batch(config)))
    return float(loss), jax.device_get(grads)


@pytest.fixture(scope="module")
def single_device():
    cache = {}

    def get(router, num_experts):
        if (router, num_experts) not in cache:
            cache[router, num_experts] = loss_and_grads(config_for(router, num_experts), (1, 1, 1))
        return cache[router, num_experts]
    return get


# Every router on every mesh with 8 experts (8, 1, 2, 4 and 2 experts per device), and for the
# token-choice routers 4 experts on 4 expert shards and 16 on 8 (1 and 2 per device, other expert
# counts). Meshes whose expert axis does not divide E are refused: see the last test.
OTHER_COUNTS = ((4, (1, 4, 2)), (16, (1, 8, 1)))
CASES = ([(router, 8, mesh) for router in ROUTERS for mesh in MESHES]
         + [(router, E, mesh) for router in ("top1", "top2", "dropless_top2") for E, mesh in OTHER_COUNTS])


@pytest.mark.parametrize("router,num_experts,mesh_shape", CASES)
def test_sharded_loss_and_gradients_equal_single_device(router, num_experts, mesh_shape, single_device):
    loss, grads = single_device(router, num_experts)
    s_loss, s_grads = loss_and_grads(config_for(router, num_experts, mesh_shape), mesh_shape)
    np.testing.assert_allclose(s_loss, loss, rtol=1e-5)
    flat, s_flat = jax.tree.leaves(grads), jax.tree.leaves(s_grads)
    assert len(flat) == len(s_flat)
    for a, b in zip(s_flat, flat):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def one_step(config, mesh_shape):
    """A full train step on a mesh: (trainer, new state)."""
    trainer = Trainer(config, configuration.validate(config), mesh=sharding.make_mesh(mesh_shape))
    state, _ = trainer.jit_train_step()(trainer.create_state(0), trainer.shard_batch(synthetic_batch(config)))
    return trainer, state


def test_expert_weights_are_split_over_the_expert_axis():
    for mesh_shape, shards in (((1, 8, 1), 8), ((2, 4, 1), 4), ((1, 4, 2), 8)):
        config = config_for("top1", 16, mesh_shape)
        mesh = sharding.make_mesh(mesh_shape)
        trainer = Trainer(config, configuration.validate(config), mesh=mesh)
        state = trainer.create_state(0)
        for name in ("wi", "wo"):
            w = state.params["decoder"]["units"]["layers"][0]["ffn"]["experts"][name]
            w = w[0] if name == "wi" else w
            per_device = {d: s.data.nbytes for s in w.addressable_shards for d in [s.device]}
            assert len(per_device) == 8
            assert set(per_device.values()) == {w.nbytes // shards}, (mesh_shape, name)
        # Adafactor's statistics of the experts are sharded with them, not replicated.
        v_row = state.opt_state[1][0].v_row["decoder"]["units"]["layers"][0]["ffn"]["experts"]["wo"]
        assert v_row.addressable_shards[0].data.size < v_row.size


def test_expert_parallel_step_moves_tokens_with_all_to_all():
    config = config_for("top1", 8, (1, 8, 1))
    trainer = Trainer(config, configuration.validate(config), mesh=sharding.make_mesh((1, 8, 1)))
    hlo = trainer.jit_train_step().lower(trainer.abstract_sharded_state(),
                                         trainer.shard_batch(synthetic_batch(config))).compile().as_text()
    assert aot.collective_counts(hlo).get("all-to-all", 0) >= 2  # to the experts and back


def test_expert_parallel_dropless_step_exchanges_rows_with_all_to_all():
    """On CPU the rows go as zero-padded [n, N, D] blocks: one all-to-all each way in the forward pass
    and in the backward, plus the per-expert counts."""
    config = config_for("dropless_top2", 8, (1, 8, 1))
    trainer = Trainer(config, configuration.validate(config), mesh=sharding.make_mesh((1, 8, 1)))
    hlo = trainer.jit_train_step().lower(trainer.abstract_sharded_state(),
                                         trainer.shard_batch(synthetic_batch(config))).compile().as_text()
    counts = aot.collective_counts(hlo)
    assert counts.get("all-to-all", 0) >= 5, counts  # counts; rows there and back, forward and backward


def perturbed_layer(cfg):
    """A dropless MoE layer with every parameter moved off its init (biases start at zero)."""
    layer = MoELayer(cfg, 16, rngs=nnx.Rngs(0))
    params = nnx.state(layer, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(params))))
    nnx.update(layer, jax.tree.map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape), params))
    return layer


# (batch, mesh): 8 groups split over the devices, F over 'model' too on (1, 4, 2); 2 groups stay
# whole on every device (as in decoding): each device runs its own experts, a sum combines.
@pytest.mark.parametrize("batch,mesh_shape", [(8, (1, 4, 2)), (2, (1, 8, 1)), (2, (2, 2, 2))])
def test_expert_parallel_dropless_layer_equals_one_device(batch, mesh_shape):
    """gpt-oss-style experts (biases, clamped SwiGLU): forward and gradients as on one device."""
    cfg = MoEConfig(num_experts=8, k=2, d_ff=32, activation="clamped_swiglu", expert_bias=True,
                    train_capacity_factor=0.0, eval_capacity_factor=0.0)
    x = jax.random.normal(jax.random.key(1), (batch, 16, 16))

    def loss(layer, x):
        y, _ = layer(x)
        return jnp.sum(y * jnp.cos(y)), y
    grad = nnx.value_and_grad(loss, has_aux=True, argnums=(0, 1))
    (_, y), g = grad(perturbed_layer(cfg), x)
    mesh = sharding.make_mesh(mesh_shape)

    @nnx.jit
    def on_mesh(layer, x):
        with sharding.use_mesh(mesh, sharding.rules_dict(sharding.DEFAULT_RULES)):
            return grad(layer, x)
    (_, y_mesh), g_mesh = on_mesh(perturbed_layer(cfg), x)
    np.testing.assert_allclose(y_mesh, y, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_mesh), jax.tree.leaves(g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("factor", [8.0, 1.0])
def test_receive_buffer_factor_drops_what_overflows_and_counts_it(factor):
    """moe.ep_buffer_factor on (1, 8, 1), one group per device: with room for 8x a device's own rows
    nothing is dropped and the layer equals one device; with 1x the overflow of each device's buffer
    is dropped, and ep_dropped_fraction is that overflow, counted here from the routing itself."""
    cfg = MoEConfig(num_experts=8, k=2, d_ff=32, activation="swiglu", train_capacity_factor=0.0,
                    eval_capacity_factor=0.0, ep_buffer_factor=factor)
    x = jax.random.normal(jax.random.key(1), (8, 16, 16))
    layer = perturbed_layer(cfg)
    y, _ = layer(x)
    mesh = sharding.make_mesh((1, 8, 1))

    @nnx.jit
    def on_mesh(layer, x):
        with sharding.use_mesh(mesh, sharding.rules_dict(sharding.DEFAULT_RULES)):
            return layer(x)
    y_mesh, aux = on_mesh(perturbed_layer(cfg), x)
    choice = np.asarray(layer.router(x, capacity=None, train=True).expert_index)  # [G, S, K]
    received = np.bincount(choice.reshape(-1), minlength=8)  # one expert per device
    buffer = expert_parallel.receive_rows(16 * 2, 8, factor)
    expected = np.maximum(received - buffer, 0).sum() / choice.size
    np.testing.assert_allclose(float(aux.stats["ep_dropped_fraction"]), expected, rtol=1e-6)
    if factor == 8.0:
        assert expected == 0
        np.testing.assert_allclose(y_mesh, y, rtol=1e-5, atol=1e-5)
    else:
        assert expected > 0
        # a token none of whose choices was dropped comes out as on one device
        assert np.isclose(np.asarray(y_mesh), np.asarray(y), rtol=1e-5, atol=1e-5).all(-1).mean() > 0.5


@pytest.mark.parametrize("name,mesh_shape,fsdp", [("deepseek_v3.py:tiny", (1, 4, 2), False),
                                                   ("deepseek_v3.py:tiny", (2, 2, 2), True),
                                                   ("gpt_oss_20b.py:tiny", (1, 4, 2), False)])
def test_frontier_tiny_configs_on_the_mesh_equal_one_device(name, mesh_shape, fsdp):
    """Latent attention, sigmoid group-limited routing and shared experts (V3); sinks, banded layers,
    biased clamped experts (gpt-oss): dropless and expert-parallel, with FSDP too, as on one device."""
    config = configuration.load(f"configs/{name}")
    config.batch_size, config.seq_len = 8, 8
    config.mesh_shape, config.fsdp = mesh_shape, fsdp
    loss, grads = loss_and_grads(config, (1, 1, 1))
    s_loss, s_grads = loss_and_grads(config, mesh_shape)
    np.testing.assert_allclose(s_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fsdp_step_equals_one_device(single_device):
    """Weights split over data x expert (x model) are gathered where used: the same loss and gradients
    (dropless with FSDP: the tiny DeepSeek-V3 case above)."""
    loss, grads = single_device("top2", 8)
    config = config_for("top2", 8, (2, 2, 2))
    config.fsdp = True
    s_loss, s_grads = loss_and_grads(config, (2, 2, 2))
    np.testing.assert_allclose(s_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fsdp_splits_the_weights_outside_the_experts_over_every_device():
    def per_device(fsdp):
        config = config_for("top2", 8, (2, 2, 2))
        config.fsdp, config.optimizer = fsdp, "adamw"
        trainer = Trainer(config, configuration.validate(config), mesh=sharding.make_mesh((2, 2, 2)))
        state = trainer.create_state(0)
        layer = state.params["decoder"]["units"]["layers"][0]
        arrays = {"query": layer["attn"]["query"], "norm": layer["attn_norm"]["scale"],
                  "table": state.params["embed"]["table"], "wo": layer["ffn"]["experts"]["wo"]}
        sizes = {k: (a.addressable_shards[0].data.nbytes, a.nbytes) for k, a in arrays.items()}
        for name, tree in (("params", state.params), ("opt_state", state.opt_state)):
            sizes[name] = sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(tree))
        return sizes

    plain, fsdp = per_device(False), per_device(True)
    assert plain["query"][0] == plain["query"][1] // 2  # heads over 'model' only: copied 4 times
    assert fsdp["query"][0] == fsdp["query"][1] // 8  # and d_model over data x expert
    assert fsdp["norm"][0] == fsdp["norm"][1] // 4 and plain["norm"][0] == plain["norm"][1]
    assert fsdp["table"][0] == fsdp["table"][1] // 8
    # experts: E over 'expert', F over 'model', and now D over 'data'
    assert plain["wo"][0] == plain["wo"][1] // 4 and fsdp["wo"][0] == fsdp["wo"][1] // 8
    assert fsdp["params"] < plain["params"] / 2
    # Adam's two moments follow their parameters (plus the step count)
    for sizes in (plain, fsdp):
        assert 0 <= sizes["opt_state"] - 2 * sizes["params"] <= 16, sizes


def test_fsdp_refuses_a_conflicting_embed_rule():
    config = config_for("top1", 8, (2, 2, 2))
    config.fsdp = True
    config.logical_axis_rules = tuple(r for r in config.logical_axis_rules if r[0] != "embed") + (
        ("embed", "model"),)
    with pytest.raises(sharding.ShardingError, match="config.fsdp=True .* already maps 'embed' to 'model'"):
        Trainer(config, configuration.validate(config), mesh=sharding.make_mesh((2, 2, 2)))


def test_checkpoint_restores_on_another_mesh(tmp_path):
    """Written with experts over 8 devices, read back with them over 2 (and data over 4)."""
    config = config_for("top1", 8, (1, 8, 1))
    trainer, state = one_step(config, (1, 8, 1))
    saved = jax.device_get(state)
    ck = Checkpointer(str(tmp_path), keep=1)
    ck.save(1, state, {"position": 3}, config)
    ck.wait()
    other = config_for("top1", 8, (4, 2, 1))
    target = Trainer(other, configuration.validate(other), mesh=sharding.make_mesh((4, 2, 1)))
    restored, data_state = ck.restore(1, target.abstract_sharded_state())
    assert data_state == {"position": 3}
    w = restored.params["decoder"]["units"]["layers"][0]["ffn"]["experts"]["wo"]
    assert w.sharding.spec[1] == "expert" and w.addressable_shards[0].data.shape[1] == 4  # 8 experts / 2
    for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(saved)):
        a, b = (jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x for x in (a, b))
        np.testing.assert_array_equal(a, b)
    ck.close()


def test_bad_meshes_are_refused_before_compiling():
    with pytest.raises(sharding.ShardingError, match="needs 16 devices, but 8 are available"):
        sharding.make_mesh((4, 4, 1))
    with pytest.raises(sharding.ShardingError, match="not divisible"):
        sharding.make_mesh((3, -1, 1))
    config = config_for("top1", 4, (1, 8, 1))
    with pytest.raises(sharding.ShardingError, match="moe.num_experts divisible by the expert mesh axis"):
        Trainer(config, configuration.validate(config), mesh=sharding.make_mesh((1, 8, 1)))
    config = config_for("top1", 8, (1, 8, 1))
    config.batch_size = 4
    with pytest.raises(sharding.ShardingError,
                       match="batch_size=4 .* must be divisible by the 8 batch shards"):
        Trainer(config, configuration.validate(config), mesh=sharding.make_mesh((1, 8, 1)))
    config = config_for("top1", 8)
    config.logical_axis_rules = config.logical_axis_rules[:-1] + (("lenght", None),)
    with pytest.raises(sharding.ShardingError, match="unknown logical axis"):
        sharding.mesh_spec(("length",), (8,), sharding.make_mesh((8, 1, 1)),
                           sharding.rules_dict(config.logical_axis_rules))
    with pytest.raises(sharding.ShardingError, match="unknown mesh axis 'tensor'"):
        sharding.rules_dict((("mlp", "tensor"),))


@pytest.mark.parametrize("router, mesh_shape", [("top1", (2, 4, 1)), ("top2", (1, 8, 1))])
def test_generation_on_the_mesh_equals_generation_on_one_device(router, mesh_shape):
    """Trainer.jit_generate (what --mode=infer runs) decodes expert-parallel on the mesh: the expert
    weights stay in their shards (no collective moves more than the prompt's k routed activations
    [B, P, k, D]: each device runs its experts, an all-reduce sums their outputs), with the
    single-device model's greedy tokens."""
    config = config_for(router, 8, mesh_shape)
    trainer = Trainer(config, configuration.validate(config), mesh=sharding.make_mesh(mesh_shape))
    state = trainer.create_state(0)
    prompts = np.array([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]], np.int32)  # left-padded
    valid, rng = prompts != 0, jax.random.PRNGKey(0)
    decode = trainer.jit_generate(max_new_tokens=6)
    hlo = decode.lower(state.params, state.rest, prompts, valid, rng).compile().as_text()
    moved = [(op, np.prod([int(n) for n in dims.split(",") if n])) for dims, op in re.findall(
        r"= (?:f32|bf16|s32)\[([\d,]*)\]\S* (all-gather|all-reduce|all-to-all|collective-permute)\(", hlo)]
    assert any(op == "all-reduce" for op, _ in moved), hlo
    assert max(n for _, n in moved) <= prompts.size * config.moe.k * config.model.d_model, moved
    tokens = np.asarray(decode(state.params, state.rest, prompts, valid, rng))
    one = Trainer(config, configuration.validate(config),
                  mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    model = nnx.merge(one.eval_graphdef, *jax.device_get((state.params, state.rest)))
    expected = generate(model, jnp.asarray(prompts), jnp.asarray(valid), max_new_tokens=6, rng=rng)
    np.testing.assert_array_equal(tokens, np.asarray(expected))


@pytest.mark.parametrize("router, mesh_shape", [("top1", (2, 4, 1)), ("top2", (1, 8, 1))])
def test_evaluation_on_the_mesh_equals_evaluation_on_one_device(router, mesh_shape):
    """Trainer.jit_eval_step (what --mode=eval and the evaluations during training run) on the mesh,
    the expert weights split over the expert axis, gives the single-device model's eval metrics."""
    config = config_for(router, 8, mesh_shape)
    trainer = Trainer(config, configuration.validate(config), mesh=sharding.make_mesh(mesh_shape))
    state = trainer.create_state(0)
    experts = [x for path, x in jax.tree_util.tree_leaves_with_path(state.params) if "experts" in str(path)]
    # each device holds its E / (expert shards) experts, not all of them
    assert experts and all(x.addressable_shards[0].data.nbytes == x.nbytes // mesh_shape[1] for x in experts)
    batch = synthetic_batch(config)
    sharded = jax.device_get(trainer.jit_eval_step()(state, trainer.shard_batch(batch)))
    one = Trainer(config, configuration.validate(config),
                  mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    alone = jax.device_put(jax.device_get(state), one.state_sharding)
    expected = jax.device_get(one.jit_eval_step()(alone, one.shard_batch(batch)))
    assert jax.tree.structure(sharded) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
