"""config.init_from and sparse upcycling (moe_jax/upcycle.py, Komatsuzaki et al. 2022): a Switch model
upcycled from its dense twin computes the dense model at step 0 (renormalised top-1 weights, nothing
dropped) or the dense FFN times the router probability (Switch's unrenormalised weights, the
default); refusals name the field; noise moves only the experts; the CLI upcycles and trains."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import configuration, upcycle
from moe_jax.experts import FeedForward
from moe_jax.models import build_model
from moe_jax.moe_layer import MoELayer
from tests import test_cli
from tests.faults import cli

SHAPES = {k: v for k, v in cli.TINY_MODEL.items() if k.startswith(("model.", "moe."))}


def tiny(path, **changes):
    config = configuration.load(path)
    for key, value in {**SHAPES, "model.vocab_size": 256, **changes}.items():
        *parents, field = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[field] = value
    return config, configuration.model_config(config)


def params_of(mc, seed):
    def make():
        model = build_model(mc, rngs=nnx.Rngs(params=seed, dropout=seed + 1, router=seed + 2))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(np.asarray, jax.jit(make)())


def logits(mc, params, ids):
    @jax.jit
    def forward(params, ids):
        graphdef, state, rest = nnx.split(build_model(mc, rngs=nnx.Rngs(0)), nnx.Param, ...)
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state, rest)
        model.eval()
        return model(ids, ids)[0]  # [B, L, V]
    return np.asarray(forward(params, ids))


def load(module, tree):
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, tree))
    nnx.update(module, state)


def upcycled(config, mc, dense_mc, dense, noise=0.0, seed=0):
    config.upcycle_noise = noise
    upcycle.check_compatible(config, mc, dense_mc, "dense")
    counts = {"copied": 0, "upcycled": 0, "fresh": 0}
    return upcycle.compose(params_of(mc, seed=7), dense, mc, dense_mc, counts, noise=noise, seed=seed), counts


@pytest.fixture(scope="module")
def dense():
    config, mc = tiny("configs/dense_tiny.py")
    return mc, params_of(mc, seed=3)


def test_renormalised_top1_without_drops_computes_the_dense_model(dense):
    dense_mc, dense_params = dense
    # eval capacity factor E: every token fits its expert (no drop)
    config, mc = tiny("configs/switch_tiny.py", **{"moe.renormalize": True, "moe.eval_capacity_factor": 8.0})
    params, counts = upcycled(config, mc, dense_mc, dense_params)
    assert counts["upcycled"] == 4 and counts["fresh"] == 2  # wi, wo in 2 stacks; 2 routers
    ids = np.random.default_rng(0).integers(3, 256, (2, 16)).astype(np.int32)  # [B, L]
    want, got = logits(dense_mc, dense_params, ids), logits(mc, params, ids)
    error = np.max(np.abs(got - want))
    print(f"max |upcycled - dense| logits: {error:.3g} (max |dense| {np.max(np.abs(want)):.3g})")
    assert error < 1e-5 * np.max(np.abs(want))


def test_switch_weights_scale_the_dense_ffn_by_the_router_probability(dense):
    dense_mc, dense_params = dense
    config, mc = tiny("configs/switch_tiny.py")  # moe.renormalize=False: Switch's and the paper's choice
    params, _ = upcycled(config, mc, dense_mc, dense_params)
    sparse = jax.tree.map(lambda a: a[0], params["encoder"]["units"]["layers"][1]["ffn"])  # unit 0, layer 1
    ffn_params = jax.tree.map(lambda a: a[1], dense_params["encoder"]["units"]["layers"][0]["ffn"])  # layer 1
    layer = MoELayer(mc.moe, mc.d_model, rngs=nnx.Rngs(0))
    load(layer, sparse)
    layer.deterministic = True
    ffn = FeedForward(mc.d_model, dense_mc.d_ff, activation=dense_mc.activation, rngs=nnx.Rngs(0))
    load(ffn, ffn_params)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, mc.d_model))  # [B, L, D]
    got, _ = layer(x, dropless=True)
    # [B, L, D] x [D, E] -> [B, L]: the chosen (top-1) expert's probability
    prob = jnp.max(jax.nn.softmax(x @ sparse["router"]["kernel"], axis=-1), axis=-1)
    want = prob[..., None] * ffn(x)  # [B, L, D]
    assert float(jnp.min(prob)) < 0.5  # a fresh router over 8 experts: far from weight 1
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_noise_changes_the_experts_only(dense):
    dense_mc, dense_params = dense
    config, mc = tiny("configs/switch_tiny.py")
    plain, _ = upcycled(config, mc, dense_mc, dense_params)
    noisy, _ = upcycled(config, mc, dense_mc, dense_params, noise=0.1)
    flat_plain = dict(jax.tree_util.tree_flatten_with_path(plain)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(noisy)[0]:
        name = jax.tree_util.keystr(path)
        if "experts" in name:
            experts = value[0]  # [E, D, F] of unit 0
            assert not np.allclose(experts[0], experts[1]), name  # the copies differ
            ratio = np.std(experts - flat_plain[path][0]) / np.std(flat_plain[path][0])
            assert 0.08 < ratio < 0.12, (name, ratio)
        else:
            np.testing.assert_array_equal(value, flat_plain[path], err_msg=name)


@pytest.mark.parametrize("change, field", [({"model.d_model": 48}, "model.d_model"),
                                           ({"model.num_encoder_layers": 4}, "model.num_encoder_layers"),
                                           ({"moe.d_ff": 128}, "moe.d_ff")])
def test_mismatches_are_refused_naming_the_field(dense, change, field):
    dense_mc, _ = dense
    config, mc = tiny("configs/switch_tiny.py", **change)
    with pytest.raises(configuration.ConfigError, match=rf"config\.{re.escape(field)}=.*--config\.{field}="):
        upcycle.check_compatible(config, mc, dense_mc, "dense")


def test_a_sparse_source_layer_is_not_merged_into_a_dense_one(dense):
    dense_mc, _ = dense
    config, _ = tiny("configs/dense_tiny.py")
    _, sparse_mc = tiny("configs/switch_tiny.py")
    with pytest.raises(configuration.ConfigError, match=r"config\.model\.encoder_moe_every=0"):
        upcycle.check_compatible(config, dense_mc, sparse_mc, "sparse")


def test_noise_without_init_from_is_refused():
    config = configuration.load("configs/switch_tiny.py")
    config.upcycle_noise = 0.1
    with pytest.raises(configuration.ConfigError, match=r"config\.upcycle_noise=0\.1 .*config\.init_from"):
        configuration.validate(config)


def test_cli_upcycles_a_dense_workdir_and_trains(tmp_path):
    setup = test_cli.Setup(tmp_path)
    dense_wd, sparse_wd = tmp_path / "dense", tmp_path / "sparse"
    steps = {"num_train_steps": 2, "eval_every_steps": 2, "checkpoint_every_steps": 2}
    cli.run(setup.args(dense_wd, config="configs/dense_tiny.py", num_train_steps=1, eval_every_steps=100,
                       checkpoint_every_steps=1), setup.env, setup.logs, "dense")
    job = cli.run(setup.args(sparse_wd, **steps, init_from=dense_wd, upcycle_noise=0.01), setup.env,
                  setup.logs, "upcycled")
    assert re.search(r"^initialised from config\.init_from=.*: \d+ parameters copied, 4 expert weights "
                     r"upcycled .* same vocabulary", job.stderr, re.M), job.report()
    assert re.search(r"^done: step 2$", job.stdout, re.M), job.report()
    assert cli.checkpoints(sparse_wd)[0] == [2]
    records = cli.metrics(sparse_wd)
    assert [r["step"] for r in records] == [1, 2] and np.isfinite(records[-1]["eval/loss"])
    again = cli.run(setup.args(sparse_wd, **{**steps, "num_train_steps": 3}, init_from=dense_wd,
                               upcycle_noise=0.01), setup.env, setup.logs, "resumed")
    assert re.search(r"^the workdir has a checkpoint \(step 2\): config\.init_from is not read again",
                     again.stderr, re.M), again.report()
