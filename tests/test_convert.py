"""moe_jax.convert against transformers: tiny random-weight T5 v1.0, T5.1.1, Switch, Mixtral,
Qwen3-MoE, DeepSeek-V3 (with and without a query bottleneck) and gpt-oss models saved by transformers with
the logits it computed (tests/fixtures/hf, made by tests/fixtures/hf/make_fixtures.py; see its
docstring to refresh them). No torch needed here.

Imported models must give transformers' logits to 1e-4 relative (max |diff| / max |logit|, float32),
Switch with token dropping (its fixture's expert_capacity=2) and without; export must write back
the very tensors it read (bit for bit) and a config.json that agrees in every field that matters;
bad input is refused with the file or field named. The CLI test imports the Switch fixture into a
workdir and evaluates it with `python -m moe_jax.main --mode=eval` on the offline corpus.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moe_jax import convert
from moe_jax.convert import __main__ as convert_cli
from moe_jax.convert import hf_io, workdir
from tests.faults import cli

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
NAMES = ("t5_v1_0", "t5_v1_1", "switch", "mixtral", "qwen3_moe", "deepseek_v3", "deepseek_v3_direct_q",
         "gpt_oss")
# config.json fields whose values change what the model computes, per model_type.
T5_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
             "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
             "model_type", "architectures", "is_encoder_decoder")
MATTERS = {"t5": T5_FIELDS + ("feed_forward_proj",),
           "switch_transformers": T5_FIELDS + ("dense_act_fn", "num_experts", "expert_capacity",
                                               "router_bias", "router_dtype", "num_sparse_encoder_layers",
                                               "num_sparse_decoder_layers", "router_jitter_noise",
                                               "tie_word_embeddings"),
           "mixtral": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                       "num_experts_per_tok", "hidden_act", "rms_norm_eps", "sliding_window",
                       "rope_parameters", "tie_word_embeddings", "model_type", "architectures"),
           "qwen3_moe": ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                         "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                         "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
                         "hidden_act", "rms_norm_eps", "sliding_window", "attention_bias",
                         "rope_parameters", "tie_word_embeddings", "model_type", "architectures"),
           "deepseek_v3": ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                           "num_hidden_layers", "first_k_dense_replace", "num_attention_heads",
                           "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                           "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
                           "n_shared_experts", "n_group", "topk_group", "norm_topk_prob",
                           "routed_scaling_factor", "hidden_act", "rms_norm_eps", "rope_interleave",
                           "rope_parameters", "attention_bias", "tie_word_embeddings", "model_type",
                           "architectures"),
           "gpt_oss": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                       "num_experts_per_tok", "sliding_window", "layer_types", "attention_bias",
                       "rms_norm_eps", "rope_parameters", "swiglu_alpha", "swiglu_limit", "hidden_act",
                       "tie_word_embeddings", "model_type", "architectures")}


def fixture(name):
    return os.path.join(FIXTURES, name)


def data(name):
    return dict(np.load(os.path.join(fixture(name), "logits.npz")))


def run(model, arrays):
    if "decoder_input_ids" in arrays:
        return model(arrays["input_ids"], arrays["decoder_input_ids"])
    return model(arrays["input_ids"])


def relative_error(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def imported():
    return {name: convert.from_hf(fixture(name)) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers(imported, name):
    _, model = imported[name]
    arrays = data(name)
    logits, aux = run(model, arrays)
    assert logits.shape == arrays["logits"].shape
    assert relative_error(logits, arrays["logits"]) < 1e-4
    if name == "switch":  # expert_capacity=2 for rows of 12 tokens over 4 experts: tokens are dropped
        assert float(aux["moe"]["encoder"].stats["dropped_fraction"][0]) > 0.3


def test_switch_without_dropping_equals_transformers(tmp_path):
    shutil.copytree(fixture("switch"), tmp_path / "switch")
    path = tmp_path / "switch" / "config.json"
    hf = json.loads(path.read_text())
    path.write_text(json.dumps({**hf, "expert_capacity": 64}))
    config, model = convert.from_hf(str(tmp_path / "switch"))
    assert config.moe.expert_capacity == 64
    arrays = data("switch")
    logits, aux = run(model, arrays)
    assert float(aux["moe"]["encoder"].stats["dropped_fraction"][0]) == 0.0
    assert relative_error(logits, arrays["logits_no_drop"]) < 1e-4
    assert relative_error(logits, arrays["logits"]) > 1e-2  # the two fixtures do differ


def test_switch_capacity_is_transformers_absolute_count_per_row(imported):
    config, model = imported["switch"]
    moe = config.moe
    routing = (moe.group_size, moe.order, moe.k, moe.renormalize, moe.router)
    assert routing == (0, "rank_major", 1, False, "top_k")
    layer = model.encoder.units.layers[1].ffn
    assert layer.group_shape(3, 12) == (3, 12)  # one routing group per batch row
    for length in (1, 2, 5, 12, 4096, 10 ** 6):
        assert layer.capacity(length) == min(2, length)


def test_configs_state_the_checkpoints_choices(imported):
    assert imported["t5_v1_0"][0].model.tie_embeddings and imported["t5_v1_0"][0].model.activation == "relu"
    t511 = imported["t5_v1_1"][0].model
    assert not t511.tie_embeddings and t511.activation == "geglu"
    mixtral = imported["mixtral"][0]
    assert (mixtral.model.num_kv_heads, mixtral.model.position, mixtral.moe.k, mixtral.moe.renormalize) == (
        2, "rope", 2, True)
    assert mixtral.moe.train_capacity_factor == mixtral.moe.eval_capacity_factor == 0.0
    qwen = imported["qwen3_moe"][0]  # mlp_only_layers=[0], norm_topk_prob=False, experts 16 wide
    assert (qwen.model.qk_norm, qwen.model.first_dense_layers, qwen.model.d_ff, qwen.moe.d_ff,
            qwen.moe.num_experts, qwen.moe.renormalize) == (True, 1, 48, 16, 4, False)
    v3 = imported["deepseek_v3"][0]
    assert (v3.model.attention, v3.model.q_lora_rank, v3.model.first_dense_layers, v3.moe.router,
            v3.moe.num_expert_groups, v3.moe.k_groups, v3.moe.num_shared_experts,
            v3.moe.routed_scaling_factor, v3.moe.selection_bias, v3.moe.bias_update_rate) == (
        "mla", 16, 1, "sigmoid", 4, 2, 1, 2.5, True, 0.0)
    assert imported["deepseek_v3_direct_q"][0].model.q_lora_rank == 0
    oss = imported["gpt_oss"][0]
    assert (oss.model.attention_sinks, oss.model.attention_bias, oss.model.sliding_window,
            oss.model.full_attention_every, oss.model.rope_scaling, oss.model.yarn_truncate,
            oss.moe.activation, oss.moe.router_bias, oss.moe.expert_bias, oss.moe.renormalize) == (
        True, True, 4, 2, "yarn", False, "clamped_swiglu", True, True, True)


def test_gpt_oss_window_sinks_and_clamp_matter(imported, tmp_path):
    """Every layer full instead of alternating, zero sinks, or biases small enough that the clamp
    at 7 never acts: each moves the logits away from transformers'."""
    hf = load_file(os.path.join(fixture("gpt_oss"), "model.safetensors"))
    gate_up = [k for k in hf if k.endswith("gate_up_proj_bias")]
    assert max(np.abs(hf[k]).max() for k in gate_up) > 7  # the fixture's clamp does act
    cases = [({"layer_types": ["full_attention"] * 4}, None),
             ({}, {k: np.zeros_like(v) if k.endswith("sinks") else v for k, v in hf.items()}),
             ({}, {k: v / 10 if k in gate_up else v for k, v in hf.items()})]
    for i, (changes, tensors) in enumerate(cases):
        _, other = convert.from_hf(edited(tmp_path / str(i), "gpt_oss", changes, tensors))
        assert relative_error(run(other, data("gpt_oss"))[0], data("gpt_oss")["logits"]) > 1e-3, i


def test_deepseek_selection_bias_and_interleaved_rope_matter(imported, tmp_path):
    """The imported e_score_correction_bias is the router's selection bias; zeroing it, or reading
    the rope rows as already rotate-half, moves the logits away from transformers'. So does
    dropping YaRN from the fixtures that have it (DeepSeek's latent attention, Qwen3's)."""
    config, model = imported["deepseek_v3"]
    hf = load_file(os.path.join(fixture("deepseek_v3"), "model.safetensors"))
    bias = np.asarray(model.decoder.units.layers[0].ffn.router.balance_bias[...])  # [U, E]
    np.testing.assert_array_equal(bias[1], hf["model.layers.2.mlp.gate.e_score_correction_bias"])
    unbiased = {k: np.zeros_like(v) if k.endswith("e_score_correction_bias") else v for k, v in hf.items()}
    for changes, tensors in (({}, unbiased), ({"rope_interleave": False}, None)):
        _, other = convert.from_hf(edited(tmp_path / str(len(changes)), "deepseek_v3", changes, tensors))
        assert relative_error(run(other, data("deepseek_v3"))[0], data("deepseek_v3")["logits"]) > 1e-3
    plain = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    for name in ("deepseek_v3_direct_q", "qwen3_moe"):
        assert imported[name][0].model.rope_scaling == "yarn"
        _, other = convert.from_hf(edited(tmp_path / "plain", name, plain))
        assert relative_error(run(other, data(name))[0], data(name)["logits"]) > 1e-3


def test_deepseek_multi_token_prediction_layers_are_left_out(imported, tmp_path):
    hf = load_file(os.path.join(fixture("deepseek_v3"), "model.safetensors"))
    mtp = {k.replace("layers.2.", "layers.3."): v for k, v in hf.items() if ".layers.2." in k}
    _, model = convert.from_hf(edited(tmp_path, "deepseek_v3", tensors={**hf, **mtp}))
    np.testing.assert_array_equal(run(model, data("deepseek_v3"))[0],
                                  run(imported["deepseek_v3"][1], data("deepseek_v3"))[0])


def test_t5_query_weights_carry_sqrt_d_kv(imported):
    _, model = imported["t5_v1_0"]
    hf = load_file(os.path.join(fixture("t5_v1_0"), "model.safetensors"))
    q = np.asarray(model.encoder.units.layers[0].attn.query[...])[0]  # [D, H, Dh] of layer 0
    want = hf["encoder.block.0.layer.0.SelfAttention.q.weight"].T.reshape(32, 2, 16) * 4.0  # sqrt(16)
    np.testing.assert_array_equal(q, want)


def assert_same_checkpoint(exported, name):
    want = load_file(os.path.join(fixture(name), "model.safetensors"))
    got = hf_io.read_tensors(str(exported))
    assert sorted(got) == sorted(want)
    for key, array in want.items():
        assert got[key].dtype == array.dtype and got[key].tobytes() == array.tobytes(), key
    hf_want = json.loads(open(os.path.join(fixture(name), "config.json")).read())
    hf_got = json.loads((exported / "config.json").read_text())
    for key in MATTERS[hf_want["model_type"]]:
        assert hf_got.get(key) == hf_want.get(key), key
    family = convert.FAMILIES[hf_want["model_type"]]
    if hasattr(family, "scaled"):
        assert family.scaled(hf_got) == family.scaled(hf_want)


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trips_bit_exactly(imported, tmp_path, name):
    config, model = imported[name]
    convert.to_hf(config, model, str(tmp_path))
    assert_same_checkpoint(tmp_path, name)


def test_sharded_checkpoints_read_and_write(imported, tmp_path):
    config, model = imported["mixtral"]
    convert.to_hf(config, model, str(tmp_path), max_shard_bytes=40_000)
    assert not (tmp_path / "model.safetensors").exists()
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 20
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    _, again = convert.from_hf(str(tmp_path))
    np.testing.assert_array_equal(run(again, data("mixtral"))[0], run(model, data("mixtral"))[0])


def test_mixtral_fused_expert_layout_imports_alike(imported, tmp_path):
    """transformers 5.x's in-memory layout: gate_up_proj [E, 2F, D] with the gate rows first."""
    tensors = load_file(os.path.join(fixture("mixtral"), "model.safetensors"))
    for i in range(2):
        old = f"model.layers.{i}.block_sparse_moe"
        w = {n: [tensors.pop(f"{old}.experts.{e}.{n}.weight") for e in range(4)] for n in ("w1", "w2", "w3")}
        tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([g, u]) for g, u in zip(w["w1"], w["w3"])])  # E x [2F, D] -> [E, 2F, D]
        tensors[f"model.layers.{i}.mlp.experts.down_proj"] = np.stack(w["w2"])  # E x [D, F] -> [E, D, F]
        tensors[f"model.layers.{i}.mlp.gate.weight"] = tensors.pop(f"{old}.gate.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(fixture("mixtral"), "config.json"), tmp_path)
    _, fused = convert.from_hf(str(tmp_path))
    np.testing.assert_array_equal(run(fused, data("mixtral"))[0],
                                  run(imported["mixtral"][1], data("mixtral"))[0])


def edited(tmp_path, name, config_changes=None, tensors=None):
    """A copy of fixture `name` with config.json fields changed and/or other tensors."""
    out = tmp_path / name
    shutil.copytree(fixture(name), out)
    if config_changes:
        hf = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**hf, **config_changes}))
    if tensors is not None:
        save_file(tensors, str(out / "model.safetensors"))
    return str(out)


def test_bad_input_is_refused_with_the_field_named(tmp_path):
    hf_tensors = load_file(os.path.join(fixture("switch"), "model.safetensors"))
    cases = [
        (str(tmp_path / "nowhere"), r"config\.json does not exist"),
        (edited(tmp_path, "t5_v1_0", {"model_type": "bert"}), r"model_type='bert'.*knows"),
        (edited(tmp_path, "switch", {"router_bias": True}), r"router_bias=True is not supported"),
        (edited(tmp_path, "mixtral", {"sliding_window": 4}), r"sliding_window=4 is not supported"),
        (edited(tmp_path, "t5_v1_1", {"feed_forward_proj": "gated-relu"}), r"feed_forward_proj='gated-relu'"),
        (edited(tmp_path, "qwen3_moe", {"mlp_only_layers": [1]}), r"mlp_only_layers=\[1\] is not supported"),
        (edited(tmp_path / "q", "qwen3_moe", {"use_sliding_window": True, "sliding_window": 4}),
         r"sliding_window=4 is not supported"),
        (edited(tmp_path, "deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}),
         r"quantization_config='fp8' is not supported: .*dequantize"),
        (edited(tmp_path / "k", "deepseek_v3", {"num_key_value_heads": 2}), r"num_key_value_heads=2"),
        (edited(tmp_path / "e", "deepseek_v3", {"rms_norm_eps": 1e-5}), r"rms_norm_eps=1e-05"),
        (edited(tmp_path, "gpt_oss", {"swiglu_limit": 5.0}), r"swiglu_limit=5.0 is not supported"),
        (edited(tmp_path / "t", "gpt_oss", {"layer_types": ["full_attention", "sliding_attention"] * 2}),
         r"layer_types=.* is not supported"),
        (edited(tmp_path / "y", "deepseek_v3", {"rope_parameters": {"rope_type": "linear", "factor": 4.0}}),
         r"rope_type='linear' is not supported"),
        (edited(tmp_path / "z", "deepseek_v3", {"rope_parameters": None, "rope_scaling": {  # 4.x's form
            "type": "yarn", "factor": 4.0, "attention_factor": 1.0}}),
         r"attention_factor=1.0 is not supported"),
    ]
    two = dict(hf_tensors)
    two.pop("encoder.block.1.layer.1.mlp.experts.expert_3.wo.weight")
    cases.append((edited(tmp_path / "a", "switch", tensors=two), r"lacks tensors.*expert_3\.wo"))
    extra = {**hf_tensors, "encoder.block.9.layer.0.SelfAttention.q.weight": np.zeros((2, 2), np.float32)}
    cases.append((edited(tmp_path / "b", "switch", tensors=extra), r"does not map.*block\.9"))
    untied = {**hf_tensors, "encoder.embed_tokens.weight": hf_tensors["shared.weight"] + 1,
              "decoder.embed_tokens.weight": hf_tensors["shared.weight"],
              "lm_head.weight": hf_tensors["shared.weight"]}
    cases.append((edited(tmp_path / "c", "switch", {"tie_word_embeddings": False}, untied),
                  r"decoder\.embed_tokens\.weight differs from encoder\.embed_tokens\.weight"))
    cases.append((edited(tmp_path / "d", "switch", {"num_layers": 4, "num_sparse_encoder_layers": 1}),
                  r"num_sparse_encoder_layers=1 is not supported: transformers makes layers \[1\]"))
    for path, pattern in cases:
        with pytest.raises(convert.ConversionError, match=pattern):
            convert.from_hf(path)
    os.remove(os.path.join(cases[1][0], "model.safetensors"))
    open(os.path.join(cases[1][0], "pytorch_model.bin"), "w").close()
    with pytest.raises(convert.ConversionError, match=r"has neither.*safe_serialization=True"):
        hf_io.read_tensors(cases[1][0])


def test_switch_export_of_a_capacity_factor_needs_the_row_length(imported, tmp_path):
    config, model = imported["switch"]
    factor = config.copy_and_resolve_references()
    factor.moe.update(dict(expert_capacity=0, capacity_rounding="ceil", train_capacity_factor=1.25,
                           eval_capacity_factor=2.0))
    with pytest.raises(convert.ConversionError, match="pass capacity_length"):
        convert.to_hf(factor, model, str(tmp_path))
    hf = convert.to_hf(factor, model, str(tmp_path), capacity_length=12)
    assert hf["expert_capacity"] == 6  # ceil(2.0 * 12 / 4)


def test_cli_import_eval_export(tmp_path):
    """Import into a workdir, `python -m moe_jax.main --mode=eval` on it, export bit-exactly back."""
    wd = tmp_path / "wd"
    overrides = {"data.spm_vocab_size": 400, "data.extra_ids": 8, "data.corpus_max_files": 30,
                 "data.data_dir": str(tmp_path / "tfds"), "batch_size": 2, "seq_len": 32, "num_eval_steps": 1}
    config_path = workdir.import_checkpoint(fixture("switch"), str(wd),
                                            [f"{k}={v}" for k, v in overrides.items()])
    assert re.search(r"expert_capacity': 2", open(config_path).read())
    env = cli.environment(tmp_path / "jax_cache")
    job = subprocess.run([sys.executable, "-m", "moe_jax.main", f"--config={config_path}", f"--workdir={wd}",
                          "--mode=eval"], cwd=cli.ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    loss = float(re.search(r"^loss +(\S+)$", job.stdout, re.M).group(1))
    assert np.isfinite(loss) and loss > 0
    assert re.search(r"^step +0$", job.stdout, re.M)
    assert convert_cli.main(["export", f"--workdir={wd}", f"--hf_dir={tmp_path / 'out'}"]) == 0
    assert_same_checkpoint(tmp_path / "out", "switch")


def test_bfloat16_checkpoints_import_as_bfloat16_and_export_bit_exactly(tmp_path):
    import ml_dtypes  # noqa: PLC0415 (JAX's numpy dtypes)

    tensors = load_file(os.path.join(fixture("mixtral"), "model.safetensors"))
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}  # [...] f32 -> bf16
    source = edited(tmp_path, "mixtral", {"dtype": "bfloat16"}, bf16)
    config, model = convert.from_hf(source)
    assert config.model.dtype == "bfloat16"
    convert.to_hf(config, model, str(tmp_path / "out"))
    got = hf_io.read_tensors(str(tmp_path / "out"))
    assert sorted(got) == sorted(bf16)
    for key, array in bf16.items():
        assert got[key].dtype == array.dtype and got[key].tobytes() == array.tobytes(), key
