"""Train step, evaluation and checkpoints, on synthetic batches (the data pipeline has its own tests)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import configuration, optim
from moe_jax.checkpoints import CheckpointError, Checkpointer, config_differences
from moe_jax.trainer import Trainer, summarize_eval

V = 64


def small_config(name="switch_tiny", **top):
    config = configuration.load(f"configs/{name}.py")
    config.model.vocab_size = V
    config.model.d_model, config.model.d_ff, config.moe.d_ff = 32, 64, 64
    config.model.num_heads, config.model.head_dim = 2, 16
    config.batch_size, config.seq_len, config.target_seq_len = 4, 16, 8
    config.update(top)
    return config


def synthetic_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    B, Li = config.batch_size, config.seq_len
    # an LM's targets are seq_len long
    Lt = config.target_seq_len if config.data.objective == "span_corruption" else config.seq_len
    weights = np.ones((B, Lt), np.float32)
    weights[:, -2:] = 0  # some padding in the targets
    batch = dict(decoder_input_tokens=rng.integers(1, V, (B, Lt)),
                 decoder_target_tokens=rng.integers(1, V, (B, Lt)),
                 decoder_segment_ids=np.ones((B, Lt), np.int32),
                 decoder_positions=np.tile(np.arange(Lt), (B, 1)),
                 decoder_loss_weights=weights)
    if config.data.objective == "span_corruption":
        batch.update(encoder_input_tokens=rng.integers(1, V, (B, Li)),
                     encoder_segment_ids=np.ones((B, Li), np.int32),
                     encoder_positions=np.tile(np.arange(Li), (B, 1)))
    return batch


@pytest.fixture(scope="module")
def trained():
    """A switch_tiny-shaped model trained 12 steps on one batch, and its pieces."""
    config = small_config(warmup_steps=2, learning_rate=0.03)
    trainer = Trainer(config, configuration.validate(config))
    state = jax.jit(trainer.init_state, static_argnums=0)(0)
    batch = synthetic_batch(config)
    step = jax.jit(trainer.train_step)
    losses = []
    for _ in range(12):
        state, metrics = step(state, batch)
        losses.append(float(metrics["ce"]))
    return config, trainer, state, batch, losses, metrics


def test_training_reduces_the_loss(trained):
    _, _, state, _, losses, metrics = trained
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 12
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["learning_rate"]) > 0
    assert metrics["routing"]["encoder"]["dropped_fraction"].shape == (1,)  # one MoE layer per stack
    # loss = cross-entropy + 1e-2 x balance + 1e-3 x z
    np.testing.assert_allclose(metrics["loss"], metrics["ce"] + 1e-2 * metrics["balance_loss"]
                               + 1e-3 * metrics["z_loss"], rtol=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
    config = small_config(batch_size=4)
    config2 = small_config(batch_size=4, grad_accum_steps=2)
    for c in (config, config2):
        # Dropless routing: a micro-batch then routes exactly as the whole batch does. One sparse decoder
        # layer: accumulation does not depend on the model's depth, and each step compiles in seconds.
        c.moe.train_capacity_factor = 0.0
        c.model.update(dict(kind="decoder", num_encoder_layers=0, encoder_moe_every=0, num_decoder_layers=1,
                            decoder_moe_every=1))
        c.data.objective, c.target_seq_len = "lm", 0
    one, two = (Trainer(config, configuration.validate(config)),
                Trainer(config2, configuration.validate(config2)))
    state = jax.jit(one.init_state, static_argnums=0)(0)
    batch = synthetic_batch(config)
    s1, m1 = jax.jit(one.train_step)(state, batch)
    s2, m2 = jax.jit(two.train_step)(state, batch)
    np.testing.assert_allclose(m1["ce"], m2["ce"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_evaluation_metrics(trained):
    config, trainer, state, batch, _, _ = trained
    out = jax.device_get(jax.jit(trainer.eval_step)(state, batch))
    summary = summarize_eval(out, 1)
    assert float(out["target_tokens"]) == batch["decoder_loss_weights"].sum()
    np.testing.assert_allclose(summary["neg_log_perplexity"], -summary["loss"])
    assert 0 <= float(summary["accuracy"]) <= 1
    assert summary["routing"]["decoder"]["tokens_per_expert"].shape == (1, 8)


def test_schedules():
    config = small_config(warmup_steps=10, learning_rate=1.0, num_train_steps=100)
    rsqrt = optim.learning_rate_schedule(config)
    # sqrt(10 / 40) = 0.5
    np.testing.assert_allclose([rsqrt(0), rsqrt(9), rsqrt(39)], [0.1, 1.0, 0.5], rtol=1e-6)
    config.schedule = "cosine"
    cosine = optim.learning_rate_schedule(config)
    np.testing.assert_allclose([cosine(10), cosine(100)], [1.0, 0.1], rtol=1e-5)


def test_checkpoint_round_trip_and_compatibility(trained, tmp_path):
    config, trainer, state, _, _, _ = trained
    ck = Checkpointer(str(tmp_path), keep=2)
    ck.save(12, state, {"position": 7}, config)
    ck.wait()
    restored, data_state = ck.restore(12, trainer.abstract_state())
    assert data_state == {"position": 7}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert np.array_equal(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a,
                              jax.random.key_data(b) if jnp.issubdtype(b.dtype, jax.dtypes.prng_key) else b)
    # Run-control fields may change on resume; anything else is refused with the difference shown.
    longer = config.copy_and_resolve_references()
    longer.num_train_steps, longer.eval_every_steps = 10_000, 7
    ck.check_compatible(longer)
    other = config.copy_and_resolve_references()
    other.moe.num_experts = 16
    with pytest.raises(CheckpointError, match=r"moe\.num_experts: 8 -> 16"):
        ck.check_compatible(other)
    assert config_differences({"seed": 0}, config)  # a saved config missing fields differs too
    # ... unless the fields it lacks were added later and hold configs/base.py's default now
    older = json.loads(config.to_json())
    del older["init_from"], older["moe"]["expert_capacity"]
    assert config_differences(older, config) == []
    fixed = config.copy_and_resolve_references()
    fixed.moe.expert_capacity = 3
    assert config_differences(older, fixed) == ["moe.expert_capacity: 0 -> 3"]
    # The cosine schedule's horizon is num_train_steps: a resume may not re-stretch it.
    saved = json.loads(config.to_json())
    cosine = config.copy_and_resolve_references()
    cosine.schedule, saved["schedule"] = "cosine", "cosine"
    assert config_differences(saved, cosine) == []
    cosine.num_train_steps = config.num_train_steps + 100
    assert config_differences(saved, cosine) == [
        f"num_train_steps: {config.num_train_steps} -> {config.num_train_steps + 100}"]
    ck.close()


def test_interrupted_checkpoint_write_leaves_the_previous_one_loadable(trained, tmp_path):
    """A kill during a write leaves Orbax's temporary directory behind; it is never restored."""
    config, trainer, state, _, _, _ = trained
    ck = Checkpointer(str(tmp_path), keep=3)
    ck.save(5, state, {"position": 1}, config)
    ck.wait()
    ck.close()
    # What a write of step 6 cut short leaves: a partial temporary directory.
    partial = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "checkpoints" / "5", partial)
    os.remove(partial / "commit_success.txt")
    shutil.rmtree(partial / "state")
    ck = Checkpointer(str(tmp_path), keep=3)
    assert ck.latest_step() == 5
    restored, data_state = ck.restore(5, trainer.abstract_state())
    assert data_state == {"position": 1}
    assert int(restored.step) == int(state.step)
    ck.close()


def test_unwritable_workdir_is_a_clear_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a directory")
    with pytest.raises(CheckpointError, match="Choose a writable --workdir"):
        Checkpointer(str(target), keep=1)


def test_config_validation_names_the_field():
    config = small_config()
    config.num_train_step = 5
    with pytest.raises(configuration.ConfigError, match="did you mean num_train_steps"):
        configuration.validate(config)
    for field, value, message in (("batch_size", 0, "config.batch_size must be >= 1"),
                                  ("optimizer", "sgd", "config.optimizer must be one of"),
                                  ("learning_rate", -1.0, "config.learning_rate must be >= 0"),
                                  ("grad_accum_steps", 3, "divisible by config.grad_accum_steps=3")):
        config = small_config()
        config[field] = value
        with pytest.raises(configuration.ConfigError, match=message):
            configuration.validate(config)
    config = small_config()
    config.moe.k = 9
    with pytest.raises(ValueError, match="moe.k=9 must be <= moe.num_experts=8"):
        configuration.validate(config)
    with pytest.raises(configuration.ConfigError, match="does not exist"):
        configuration.load("configs/nope.py")
