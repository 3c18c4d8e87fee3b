"""Parameter, FLOP and memory accounting: a hand computation, the formula against the abstractly
built model (nnx.eval_shape, no memory) and against optax's optimizer state, published model sizes,
the FLOP conventions, and the command line."""
import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from moe_jax import MoEConfig, accounting, accounting_report, configuration, optim
from moe_jax.models import ModelConfig, build_model

ROOT = __file__.rsplit("/tests/", 1)[0]


def load(name: str):
    return configuration.load(f"{ROOT}/configs/{name}")


def small(**overrides) -> ModelConfig:
    moe = MoEConfig(num_experts=4, k=1, d_ff=24, activation="relu")
    base = dict(kind="encoder_decoder", vocab_size=100, d_model=16, num_heads=4, num_kv_heads=2, head_dim=8,
                d_ff=32, activation="relu", num_encoder_layers=2, num_decoder_layers=2, encoder_moe_every=2,
                decoder_moe_every=2, relative_buckets=8, tie_embeddings=False, moe=moe)
    moe_overrides = overrides.pop("moe", {})
    cfg = ModelConfig(**{**base, **overrides})
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe_overrides))


def test_hand_computed_small_config():
    """Encoder-decoder, D=16, V=100, H=4 query / 2 key-value heads of 8, dense FFN 32, 2+2 layers with
    the second of each stack an MoE layer of 4 ReLU experts of width 24, top-1; 12 input and 5 target
    tokens."""
    acc = accounting.account(small(), inputs_length=12, targets_length=5)
    attention_block = 16 * 4 * 8 + 16 * 2 * 8 + 16 * 2 * 8 + 4 * 8 * 16  # q, k, v, out = 1536
    expert = 2 * 16 * 24  # wi, wo = 768
    expected = {
        "embeddings/logits": 100 * 16 + 16 * 100,  # untied: table and logits kernel
        "attention": (2 + 2 * 2) * attention_block,  # encoder: self; decoder: self and cross
        "dense FFN": 2 * (2 * 16 * 32),  # layer 0 of each stack
        "experts": 2 * 4 * expert,
        "shared experts": 0,
        "router": 2 * 16 * 4,
        "norms": (2 * 2 + 1) * 16 + (2 * 3 + 1) * 16,  # per layer (+ cross norm in the decoder), + final norm
        "position biases": 2 * 8 * 4,  # encoder and decoder buckets x heads
    }
    assert acc.params == expected
    total = 3200 + 9216 + 2048 + 6144 + 128 + 192 + 64
    assert acc.total_params == total == 20992
    assert acc.total_active_params == total - 6144 + 2 * 1 * expert == 16384  # one of 4 experts per MoE layer

    per_input = {
        # 2 encoder layers x 2 x (q, k, v, out) + 2 decoder layers x 2 x (cross k, v) on the encoded tokens
        "attention projections": 2 * 2 * attention_block + 2 * 2 * (256 + 256),
        "attention scores": 2 * 4 * (4 * 8) * 12,  # layers x 4 x H*Dh x keys
        "dense FFN": 2 * (2 * 16 * 32),
        "experts": 2 * expert,
        "router": 2 * 16 * 4,
    }
    per_target = {
        "attention projections": 2 * 2 * (attention_block + 512 + 512),  # self q,k,v,out + cross q,out
        "attention scores": 2 * 4 * (4 * 8) * (5 + 12),  # self keys + cross keys
        "dense FFN": 2 * (2 * 16 * 32),
        "experts": 2 * expert,
        "router": 2 * 16 * 4,
        "logits": 2 * 16 * 100,
    }
    assert acc.forward_flops_per_input_token == per_input
    assert acc.forward_flops_per_target_token == per_target
    assert sum(per_input.values()) == 14976 and sum(per_target.values()) == 21504
    assert acc.forward_flops_per_example() == 12 * 14976 + 5 * 21504 == 287232
    assert acc.forward_flops_per_token == 287232 / 17
    assert acc.training_flops_per_example == 3 * 287232

    # Every array here has fewer than 128 entries on its second-largest axis: Adafactor keeps full
    # second moments plus two 1-element placeholders per array; 50 arrays (2 embedding, 2 position
    # bias, encoder 8 + 9 + final norm, decoder 13 + 14 + final norm).
    assert acc.adafactor_state_bytes == 4 * (total + 2 * 50)
    assert acc.adamw_state_bytes == 2 * 4 * total
    assert acc.param_bytes == 4 * total


def test_adafactor_state_size_by_hand():
    assert accounting.adafactor_state_size((768, 3072)) == 768 + 3072 + 1  # rows, columns, placeholder v
    assert accounting.adafactor_state_size((6, 128, 8, 512)) == 6 * 8 * 512 + 6 * 128 * 8 + 1
    # moe_jax factors when the second-largest axis is >= 32: T5-sized attention kernels [U, D, H, 64] are
    # factored over D (rows dropped) and Dh (columns dropped); a 16-wide second axis is not.
    assert accounting.adafactor_state_size((12, 768, 12, 64)) == 12 * 12 * 64 + 12 * 768 * 12 + 1
    assert accounting.adafactor_state_size((12, 768, 12, 16)) == 12 * 768 * 12 * 16 + 2
    assert accounting.adafactor_state_size((4096,)) == 4096 + 2
    assert accounting.adafactor_state_size(()) == 1 + 2


MODEL_CASES = {
    "switch_tiny (encoder-decoder, untied, relu)": lambda: configuration.model_config(load("switch_tiny.py")),
    "t5_base:tiny (dense, tied)": lambda: configuration.model_config(load("t5_base.py:tiny")),
    "mixtral:tiny (decoder, GQA, swiglu, rope)": lambda: configuration.model_config(
        load("mixtral_8x7b.py:tiny")),
    "qwen3:tiny (qk_norm)": lambda: configuration.model_config(load("qwen3_30b_a3b.py:tiny")),
    "deepseek_moe:tiny (shared experts)": lambda: configuration.model_config(load("deepseek_moe.py:tiny")),
    "deepseek_v3:tiny (MLA, expert groups, dense prefix)": lambda: configuration.model_config(
        load("deepseek_v3.py:tiny")),
    "gpt_oss_120b:tiny (sinks, biases, bands, clamped SwiGLU)": lambda: configuration.model_config(
        load("gpt_oss_120b.py:tiny")),
    "latent attention, query bottleneck": lambda: small(
        kind="decoder", position="rope", attention="mla", q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4,
        qk_rope_head_dim=2, v_head_dim=6),
    "latent attention, direct query": lambda: small(
        kind="decoder", position="rope", attention="mla", q_lora_rank=0, kv_lora_rank=8, qk_nope_head_dim=4,
        qk_rope_head_dim=2, v_head_dim=6),
    "expert_choice (encoder only)": lambda: configuration.model_config(load("expert_choice.py")),
    "ST-MoE extra dense FFN, geglu, unscanned": lambda: small(moe_extra_dense_ffn=True, activation="geglu",
                                                             scan_layers=False, num_encoder_layers=4),
    "hierarchical router": lambda: small(moe=dict(router="hierarchical", num_expert_groups=2, k=1)),
    "noisy top-k router": lambda: small(moe=dict(router="noisy_top_k")),
    "soft MoE (encoder only)": lambda: small(decoder_moe_every=0,
                                             moe=dict(router="soft", soft_slots_per_expert=2)),
    "dense mixture, gelu experts": lambda: small(moe=dict(router="dense", activation="gelu")),
    "decoder, relative bias, tied, bias balancing": lambda: small(
        kind="decoder", tie_embeddings=True, num_decoder_layers=4, moe=dict(bias_update_rate=1e-3)),
}


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_formula_equals_built_model(name):
    cfg = MODEL_CASES[name]()
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    counted = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert accounting.check_against_model(cfg) == counted == accounting.account(
        cfg, 0 if cfg.kind == "decoder" else 16, 8).total_params


def test_full_size_formula_equals_built_model():
    for name in ("switch_base.py", "mixtral_8x7b.py"):
        cfg = configuration.model_config(load(name))
        assert accounting.check_against_model(cfg) == sum(g.size for g in accounting.parameter_groups(cfg))


def test_check_names_what_differs(monkeypatch):
    cfg = small()
    groups = accounting.parameter_groups(cfg)
    monkeypatch.setattr(accounting, "parameter_groups",
                        lambda c: [g for g in groups if g.category != "router"])
    with pytest.raises(accounting.AccountingError, match="only in the model.*router"):
        accounting.check_against_model(cfg)


@pytest.mark.parametrize("name", ["switch_tiny.py", "mixtral_8x7b.py:tiny"])
def test_optimizer_state_equals_optax(name):
    """Float32 leaves of optax's own state (eval_shape; the int32 step counters left out)."""
    config = load(name)
    cfg = configuration.model_config(config)
    params = nnx.state(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    acc = accounting.account_config(config)

    def state_bytes(optimizer):
        leaves = jax.tree.leaves(jax.eval_shape(optimizer.init, params))
        return sum(x.size * x.dtype.itemsize for x in leaves if x.dtype == jnp.float32)

    assert acc.adafactor_state_bytes == state_bytes(
        optax.adafactor(1e-2, min_dim_size_to_factor=optim.ADAFACTOR_MIN_DIM_TO_FACTOR))
    assert acc.adamw_state_bytes == state_bytes(optax.adamw(1e-3))
    assert acc.adafactor_state_bytes < acc.param_bytes / 4  # the wide matrices are factored


def test_published_sizes():
    """To the precision each was published with.

    T5-Base: "about 220 million parameters" (Raffel et al. 2020, Sec. 3.1; T5 v1.0: ReLU FFN 3072,
    tied embeddings). Switch paper (Fedus et al. 2021) Table 9: Switch-Base 7B and Switch-Large 26B
    (128 experts in every other FFN; T5-Base 0.2B, T5-Large 0.7B). Switch-Large here is switch_base
    at T5-Large's size: d_model 1024, 16 heads of 64, FFN and experts 4096 wide, 24+24 layers.
    T5.1.1-Base: 0.25B (gated GELU 2048, untied).
    Mixtral 8x7B: 46.7B parameters, 12.9B active per token (Jiang et al. 2024).
    Qwen3-30B-A3B: 30.5B parameters, 3.3B active (Qwen3 Technical Report, Yang et al. 2025).
    DeepSeekMoE 16B: 16.4B, 2.8B active (Dai et al. 2024). DeepSeek-V3: 671B, 37B active, without
    its multi-token-prediction module (DeepSeek-AI 2024). Kimi K2: 1.04T, 32.6B active (Kimi Team
    2025, Table 2). gpt-oss-120b: 116.8B, 5.1B active; gpt-oss-20b: 20.9B, 3.6B active (OpenAI 2025,
    model card; its active counts leave out the input embedding table, which ours include).
    """
    def billions(config):
        return accounting.account_config(config).total_params / 1e9

    assert round(billions(load("t5_base.py")), 2) == 0.22
    # T5.1.1-Base by hand: input and output embeddings 2 x 32128 x 768, 12 encoder layers of 4 x 768^2
    # attention + 3 x 768 x 2048 gated FFN + 2 norms, 12 decoder layers with cross-attention and 3 norms,
    # two 32 x 12 relative-bias tables and two final norms
    assert accounting.account_config(load("t5_1_1_base.py")).total_params == 247_577_856
    assert round(billions(load("switch_base.py"))) == 7
    large = load("switch_base.py")
    large.model.update(dict(d_model=1024, num_heads=16, head_dim=64, d_ff=4096, num_encoder_layers=24,
                            num_decoder_layers=24))
    large.moe.d_ff = 4096
    assert round(billions(large)) == 26
    mixtral = accounting.account_config(load("mixtral_8x7b.py"))
    assert round(mixtral.total_params / 1e9, 1) == 46.7
    assert round(mixtral.total_active_params / 1e9, 1) == 12.9
    qwen3 = accounting.account_config(load("qwen3_30b_a3b.py"))  # 30.53B, 3.35B active with qk_norm
    assert round(qwen3.total_params / 1e9, 1) == 30.5
    # Published "3.3B activated"; we count 3.353B (embedding and output projection included), 1.6% over.
    assert abs(qwen3.total_active_params / 3.3e9 - 1) < 0.02
    dsmoe = accounting.account_config(load("deepseek_moe.py"))
    assert (round(dsmoe.total_params / 1e9, 1), round(dsmoe.total_active_params / 1e9, 1)) == (16.4, 2.8)
    v3 = accounting.account_config(load("deepseek_v3.py"))
    assert (round(v3.total_params / 1e9), round(v3.total_active_params / 1e9)) == (671, 38)
    assert abs(v3.total_active_params / 37e9 - 1) < 0.02  # 37.55B: "37B activated" rounds down
    kimi = accounting.account_config(load("kimi_k2.py"))
    # We count 1.026T: 14B (1.3%) under the report, which does not itemize its total; one more
    # MoE layer of 385 experts is 17B. Active: 32.86B, 0.8% over the report's 32.6B.
    assert abs(kimi.total_params / 1.04e12 - 1) < 0.015
    assert abs(kimi.total_active_params / 32.6e9 - 1) < 0.01
    for name, total, active in (("gpt_oss_120b.py", 116.8, 5.1), ("gpt_oss_20b.py", 20.9, 3.6)):
        acc = accounting.account_config(load(name))
        lookup = acc.params["embeddings/logits"] / 2  # the input table; the output projection is active
        assert round(acc.total_params / 1e9, 1) == total, name
        assert round((acc.total_active_params - lookup) / 1e9, 1) == active, name


XLA_FLOP_CASES = {
    "t5 dense (relu, relative)": dict(encoder_moe_every=0, decoder_moe_every=0),
    "switch top-1 (encoder-decoder)": dict(),
    "mixtral-style decoder (top-2 swiglu, GQA, rope)": dict(
        kind="decoder", position="rope", activation="swiglu", num_kv_heads=2, decoder_moe_every=1,
        moe=dict(k=2, activation="swiglu", order="token_major")),
    "deepseek-style decoder (latent attention)": dict(
        kind="decoder", position="rope", attention="mla", q_lora_rank=96, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=48, decoder_moe_every=1,
        moe=dict(k=2, activation="swiglu", order="token_major")),
}


@pytest.mark.parametrize("opts", XLA_FLOP_CASES.values(), ids=XLA_FLOP_CASES.keys())
def test_forward_flops_equal_xlas_count_of_the_compiled_forward(opts):
    """The accounting's forward FLOPs per example against XLA's cost_analysis of the compiled
    forward pass, at a width where matmuls dominate (XLA also counts the elementwise work, about
    1-2% here). Capacity factor 1.0 with S divisible by E / K: the expert buffers hold exactly the
    routed tokens, so the compiled experts do the active work and nothing more."""
    opts = dict(opts)
    moe = dict(num_experts=4, d_ff=512, train_capacity_factor=1.0, eval_capacity_factor=1.0,
               **opts.pop("moe", {}))
    # Unrolled: XLA's cost analysis counts a while loop's body once, whatever its trip count.
    cfg = small(d_model=256, num_heads=4, head_dim=64, d_ff=512, vocab_size=256, scan_layers=False, moe=moe,
                **opts)
    B, Li, Lt = 2, (32 if cfg.kind == "encoder_decoder" else 0), 32
    model = build_model(cfg, rngs=nnx.Rngs(0))
    model.eval()
    ids = [jnp.ones((B, n), jnp.int32) for n in ((Li, Lt) if Li else (Lt,))]
    compiled = nnx.jit(lambda m, *x: m(*x)[0]).lower(model, *ids).compile()
    xla = compiled.cost_analysis()["flops"] / B
    ours = accounting.account(cfg, Li, Lt).forward_flops_per_example()
    assert ours == pytest.approx(xla, rel=0.03)
    assert ours <= xla  # ours counts the matmuls only


@pytest.mark.parametrize("name", ["switch_tiny.py", "mixtral_8x7b.py"])
def test_training_flops_are_three_forward(name):
    """The 2N (forward) + 4N (backward) convention, on top of the forward count checked above."""
    acc = accounting.account_config(load(name))
    assert acc.training_flops_per_example == 3 * acc.forward_flops_per_example()


def test_dense_twin_costs_the_same_up_to_the_router():
    """Top-1 over experts as wide as the dense FFN: the same FLOPs per token plus the router's D x E."""
    sparse, dense = (accounting.account_config(load("switch_tiny.py")),
                     accounting.account_config(load("dense_tiny.py")))
    assert (sparse.inputs_length, sparse.targets_length) == (dense.inputs_length, dense.targets_length)
    router = sparse.forward_flops_per_example("router")
    D, E = 128, 8
    assert router == (sparse.inputs_length + sparse.targets_length) * 2 * D * E  # one MoE layer per stack
    assert sparse.forward_flops_per_example() - router == dense.forward_flops_per_example()
    assert sparse.total_active_params - sparse.params["router"] == dense.total_active_params
    assert sparse.total_params > dense.total_params


def test_active_experts_per_router():
    S = 16  # encoder tokens per group (inputs_length)

    def expert_share(**moe):
        cfg = small(decoder_moe_every=0, moe=moe)
        acc = accounting.account(cfg, S, 8)
        # experts' worth, one MoE layer
        return acc.active_params["experts"] / (cfg.moe.d_ff * cfg.d_model * 2)

    assert expert_share(k=2) == 2
    assert expert_share(router="hierarchical", num_expert_groups=2, k_groups=2, k=1) == 2
    assert expert_share(router="expert_choice", train_capacity_factor=2.0) == 2  # c = 2
    assert expert_share(router="dense") == 4  # all of E
    assert expert_share(router="soft", soft_slots_per_expert=2) == 4 * 2 / S  # E*P slots per S tokens
    shared = accounting.account(small(moe=dict(num_shared_experts=2)), 12, 5)
    assert shared.active_params["shared experts"] == shared.params["shared experts"] == 2 * 2 * (16 * 48)


def test_sequence_lengths():
    assert accounting.sequence_lengths(load("t5_base.py")) == (512, 114)  # T5's 512 inputs / 114 targets
    assert accounting.sequence_lengths(load("mixtral_8x7b.py")) == (0, 4096)
    config = load("switch_tiny.py")
    config.data.objective = "lm"
    with pytest.raises(ValueError, match="data.objective='lm' needs model.kind='decoder'"):
        accounting.sequence_lengths(config)
    with pytest.raises(accounting.AccountingError, match="inputs_length"):
        accounting.account(small(), 0, 5)


def test_cli_prints_the_total(capsys):
    acc = accounting_report.main(["accounting", f"--config={ROOT}/configs/switch_tiny.py"])
    out = capsys.readouterr().out
    assert f"{acc.total_params:,}" in out and "4.85 M" in out
    bigger = accounting_report.main(["accounting", f"--config={ROOT}/configs/switch_tiny.py",
                              "--config.moe.num_experts=16"])
    assert bigger.params["experts"] == 2 * acc.params["experts"]
    with pytest.raises(accounting.AccountingError, match="--config"):
        accounting_report.main(["accounting"])
    with pytest.raises(configuration.ConfigError, match="does not exist"):
        accounting_report.main(["accounting", f"--config={ROOT}/configs/nope.py"])


def test_cli_as_a_module():
    result = subprocess.run([sys.executable, "-m", "moe_jax.accounting", "--config=configs/switch_tiny.py",
                             "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "4,853,504" in result.stdout and "checked against build_model" in result.stdout
