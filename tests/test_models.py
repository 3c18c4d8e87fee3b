"""Transformers: shapes, cached decoding equals full recomputation, causality, masks, scan equals
unrolled, generation, and bad configs refused before anything is built."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoEConfig, routing
from moe_jax.experts import FeedForward
from moe_jax.models import ModelConfig, build_model, generate, position

V = 37


def tiny(**overrides) -> ModelConfig:
    moe = MoEConfig(num_experts=4, k=2, d_ff=16, order="token_major", activation="swiglu",
                    train_capacity_factor=1.0, eval_capacity_factor=1.0)
    base = dict(kind="decoder", vocab_size=V, d_model=16, num_heads=4, num_kv_heads=2, head_dim=4, d_ff=24,
                num_encoder_layers=2, num_decoder_layers=4, encoder_moe_every=2, decoder_moe_every=2,
                activation="geglu", moe=moe)
    moe_overrides = overrides.pop("moe", {})
    cfg = ModelConfig(**{**base, **overrides})
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe_overrides))


def tokens(B=2, L=8, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, L), 1, V)


def forward(model, x, **kw):
    return model(x, **kw) if model.cfg.kind == "decoder" else model(x, x, **kw)


# One compilation per model and shape instead of one per operation in eager mode.
jit_call = nnx.jit(lambda model, *args, **kw: model(*args, **kw), static_argnames=("dropless",))
jit_decode = nnx.jit(lambda model, *args, **kw: model.decode(*args, **kw))
jit_encode = nnx.jit(lambda model, x: model.encode(x))


KINDS = [
    dict(kind="decoder", position="rope"),
    dict(kind="decoder", position="relative", tie_embeddings=True),
    dict(kind="encoder_decoder", position="relative"),
    dict(kind="encoder_decoder", position="rope", moe_extra_dense_ffn=True, num_kv_heads=0),
    dict(kind="decoder", position="rope", qk_norm=True),
    dict(kind="decoder", position="rope", first_dense_layers=2, decoder_moe_every=1),
    dict(kind="decoder", position="rope", decoder_moe_every=1, attention_bias=True, attention_sinks=True,
         sliding_window=3, full_attention_every=2,  # gpt-oss
         moe=dict(activation="clamped_swiglu", router_bias=True, expert_bias=True, renormalize=True)),
]


@pytest.mark.parametrize("opts", KINDS)
def test_shapes_and_aux(opts):
    cfg = tiny(**opts)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    logits, aux = jit_call(model, *([tokens()] * (1 if cfg.kind == "decoder" else 2)))
    assert logits.shape == (2, 8, V) and logits.dtype == jnp.float32
    assert aux["balance_loss"].shape == () and float(aux["balance_loss"]) > 0
    units = (cfg.num_decoder_layers - cfg.first_dense_layers) // cfg.decoder_moe_every
    assert aux["moe"]["decoder"].stats["tokens_per_expert"].shape == (units, 4)
    if cfg.first_dense_layers:  # DeepSeek's first_k_dense_replace: dense FFNs of width d_ff first
        wi = model.dense_prefix.units.layers[0].ffn.wi[0][...]
        assert wi.shape == (cfg.first_dense_layers, cfg.d_model, cfg.d_ff)


@pytest.mark.parametrize("opts", KINDS)
def test_cached_decoding_equals_full_recomputation(opts):
    """Prefill a prompt, then one token per step: every step's logits equal the full forward pass
    (both routed dropless, as decoding always is)."""
    model = build_model(tiny(**opts), rngs=nnx.Rngs(0))
    model.eval()
    B, L, P = 2, 9, 4
    seq = tokens(B, L, seed=3)
    if model.cfg.kind == "decoder":
        full, _ = jit_call(model, seq, dropless=True)
        extra = {}
    else:
        inputs = tokens(B, 6, seed=4)
        full, _ = jit_call(model, inputs, seq, dropless=True)
        encoded, _ = jit_encode(model, inputs)
        extra = {"encoded": encoded, "input_valid": inputs != 0}
    cache = model.init_cache(B, L)
    key_valid = jnp.zeros((B, L), bool).at[:, :P].set(True)
    logits, cache = jit_decode(model, seq[:, :P], cache, index=jnp.int32(0), key_valid=key_valid, **extra)
    np.testing.assert_allclose(logits, full[:, :P], rtol=1e-4, atol=1e-4)
    for t in range(P, L):
        key_valid = key_valid.at[:, t].set(True)
        logits, cache = jit_decode(model, seq[:, t:t + 1], cache, index=jnp.int32(t), key_valid=key_valid,
                                   **extra)
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4)


def test_left_padded_prompts_decode_like_unpadded_ones():
    model = build_model(tiny(position="relative"), rngs=nnx.Rngs(0))
    model.eval()
    prompt = tokens(1, 5, seed=5)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), prompt], axis=1)
    alone = generate(model, prompt, max_new_tokens=6)
    with_pad = generate(model, padded, max_new_tokens=6)
    np.testing.assert_array_equal(alone, with_pad)


@pytest.mark.parametrize("opts", [KINDS[0], KINDS[2]])
def test_greedy_generation_matches_a_loop_of_full_forward_passes(opts):
    model = build_model(tiny(**opts), rngs=nnx.Rngs(0))
    model.eval()
    prompt = tokens(2, 4, seed=6)
    out = generate(model, prompt, max_new_tokens=5)
    # Causal and dropless: a fixed-length pass with the future zero-filled gives each step's logits
    # (one compilation instead of one per length).
    if model.cfg.kind == "decoder":
        seq = jnp.zeros((2, 9), jnp.int32).at[:, :4].set(prompt)
        for t in range(4, 9):
            logits, _ = jit_call(model, seq, dropless=True)
            seq = seq.at[:, t].set(jnp.argmax(logits[:, t - 1], -1))
        expected = seq[:, 4:]
    else:
        dec = jnp.zeros((2, 6), jnp.int32)
        for t in range(1, 6):
            logits, _ = jit_call(model, prompt, dec, dropless=True)
            dec = dec.at[:, t].set(jnp.argmax(logits[:, t - 1], -1))
        expected = dec[:, 1:]
    np.testing.assert_array_equal(out, expected)


def test_sampling_options():
    model = build_model(tiny(), rngs=nnx.Rngs(0))
    model.eval()
    prompt = tokens(2, 4)
    greedy = generate(model, prompt, max_new_tokens=6)
    # A nucleus this small keeps only the most likely token: sampling is then greedy.
    np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=6, temperature=1.0, top_p=1e-6,
                                           rng=jax.random.PRNGKey(1)), greedy)
    a = generate(model, prompt, max_new_tokens=6, temperature=2.0, rng=jax.random.PRNGKey(1))
    b = generate(model, prompt, max_new_tokens=6, temperature=2.0, rng=jax.random.PRNGKey(1))
    c = generate(model, prompt, max_new_tokens=6, temperature=2.0, rng=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kind", ["decoder", "encoder_decoder"])
def test_changing_a_future_token_never_changes_an_earlier_output(kind):
    """In training mode, with capacity dropping and top-2 token-major routing."""
    model = build_model(tiny(kind=kind, moe={"train_capacity_factor": 0.5}), rngs=nnx.Rngs(0))
    x = tokens(2, 10, seed=7)
    run = (lambda dec: jit_call(model, dec)) if kind == "decoder" else (lambda dec: jit_call(model, x, dec))
    base, aux = run(x)
    assert float(aux["moe"]["decoder"].stats["dropped_fraction"].mean()) > 0  # dropping happens
    for t in (3, 6, 9):
        out, _ = run(x.at[:, t].set((x[:, t] % (V - 1)) + 1))
        np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=1e-5, atol=1e-5)
        assert not np.allclose(out[:, t:], base[:, t:])


def test_rank_major_order_would_break_causality():
    """Why causal layers refuse rank-major top-2 with dropping: token 1 changes token 0's fate."""
    # 2 tokens, 2 experts, 1 slot each. Token 0 prefers (e0, e1).
    before = jnp.log(jnp.array([[[0.7, 0.3], [0.2, 0.8]]]))  # token 1 prefers e1
    after = jnp.log(jnp.array([[[0.7, 0.3], [0.8, 0.2]]]))  # token 1 now prefers e0
    for order, changes in (("rank_major", True), ("token_major", False)):
        p0 = [routing.tokens_choose(lg, k=2, capacity=1, order=order).position[0, 0]
              for lg in (before, after)]
        assert (not np.array_equal(p0[0], p0[1])) == changes, order


def test_padding_and_packed_segments_are_masked():
    cfg = tiny(kind="encoder_decoder", moe={"train_capacity_factor": 0.0, "eval_capacity_factor": 0.0})
    model = build_model(cfg, rngs=nnx.Rngs(0))
    inputs = tokens(1, 8, seed=8).at[:, 6:].set(0)
    enc, _ = jit_encode(model, inputs)
    enc2, _ = jit_encode(model, inputs.at[:, 7].set(0).at[:, 6].set(0))
    other_pad = jit_encode(model, jnp.concatenate([inputs[:, :6], jnp.zeros((1, 5), inputs.dtype)], 1))[0]
    np.testing.assert_allclose(enc[:, :6], enc2[:, :6], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(enc[:, :6], other_pad[:, :6], rtol=1e-5, atol=1e-5)
    # Two sequences packed in one row behave as if each were alone (dense-equivalent routing).
    dec = build_model(tiny(moe={"train_capacity_factor": 0.0, "eval_capacity_factor": 0.0}), rngs=nnx.Rngs(0))
    a, b = tokens(1, 5, seed=9), tokens(1, 3, seed=10)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[1] * 5 + [2] * 3])
    pos = jnp.array([list(range(5)) + list(range(3))])
    out, _ = jit_call(dec, packed, segment_ids=seg, positions=pos)
    np.testing.assert_allclose(out[:, :5], jit_call(dec, a)[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], jit_call(dec, b)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["decoder", "encoder_decoder"])
def test_scan_equals_unrolled(kind):
    scanned = build_model(tiny(kind=kind), rngs=nnx.Rngs(0))
    unrolled = build_model(tiny(kind=kind, scan_layers=False), rngs=nnx.Rngs(1))
    # Copy the scanned parameters, unit by unit, into the unrolled model.
    for stack in (["decoder"] if kind == "decoder" else ["encoder", "decoder"]):
        s_stack, u_stack = getattr(scanned, stack), getattr(unrolled, stack)
        stacked = nnx.state(s_stack.units)
        for u, unit in enumerate(u_stack.units):
            nnx.update(unit, jax.tree.map(lambda v: v[u], stacked))
        nnx.update(u_stack.final_norm, nnx.state(s_stack.final_norm))
    for name in ("embed", "position_bias", "encoder_bias", "decoder_bias"):
        if getattr(scanned, name, None) is not None:
            nnx.update(getattr(unrolled, name), nnx.state(getattr(scanned, name)))
    x = tokens(2, 8)
    loss_and_grad = nnx.jit(nnx.value_and_grad(lambda m: (jnp.mean(forward(m, x)[0] ** 2), forward(m, x)),
                                               has_aux=True))
    ((_, (ls, aux_s)), gs), ((_, (lu, aux_u)), gu) = loss_and_grad(scanned), loss_and_grad(unrolled)
    np.testing.assert_allclose(ls, lu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux_s["balance_loss"], aux_u["balance_loss"], rtol=1e-6)
    np.testing.assert_allclose(gs["embed"]["table"][...], gu["embed"]["table"][...], rtol=1e-4, atol=1e-6)
    g_units = jax.tree.leaves(gs["decoder"]["units"])
    g_unrolled = [jax.tree.leaves(gu["decoder"]["units"][u]) for u in range(len(unrolled.decoder.units))]
    for i, leaf in enumerate(g_units):
        for u in range(leaf.shape[0]):
            np.testing.assert_allclose(leaf[u], g_unrolled[u][i], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("policy", ["minimal", "full"])
def test_remat_changes_nothing_but_memory(policy):
    a = build_model(tiny(), rngs=nnx.Rngs(0))
    b = build_model(tiny(remat=policy), rngs=nnx.Rngs(0))
    x = tokens()
    grad = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x)[0] ** 2)))
    ga, gb = grad(a), grad(b)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


def test_remat_policies_keep_less_for_the_backward_pass():
    """'minimal' keeps the matmul outputs only and 'full' each unit's input only: the compiled
    gradient's temporary memory must shrink in that order (a policy that did nothing would not)."""
    x = tokens(B=4, L=32)

    def temp_bytes(policy):
        graphdef, params, rest = nnx.split(build_model(tiny(remat=policy), rngs=nnx.Rngs(0)), nnx.Param, ...)
        loss = lambda p, r: jnp.mean(nnx.merge(graphdef, p, r, copy=True)(x)[0] ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(params, rest).compile().memory_analysis().temp_size_in_bytes

    none, minimal, full = map(temp_bytes, ("none", "minimal", "full"))
    assert none > minimal > full, (none, minimal, full)


@pytest.mark.parametrize("opts,message", [
    (dict(d_model=18, head_dim=0, num_heads=4), "model.num_heads=4 must divide model.d_model=18"),
    (dict(num_decoder_layers=3), "model.decoder_moe_every=2 must divide model.num_decoder_layers=3"),
    (dict(kind="encoder_decoder", num_encoder_layers=3), "model.encoder_moe_every=2 must divide"),
    (dict(num_kv_heads=3), "model.num_kv_heads=3 must divide model.num_heads=4"),
    (dict(kind="transformer"), "model.kind must be one of"),
    (dict(position="alibi"), "model.position must be one of"),
    (dict(position="rope", head_dim=5), "model.head_dim must be even"),
    (dict(dtype="float16"), "model.dtype must be one of"),
    (dict(remat=True), "model.remat must be one of"),
    (dict(moe={"router": "expert_choice", "k": 1, "order": "rank_major"}),
     "moe.router='expert_choice'.*decoder_moe_every=0"),
    (dict(moe={"order": "rank_major"}), "moe.order='rank_major'"),
    (dict(position="rope", yarn_factor=4.0), r"model.yarn_factor=4.0 applies to model.rope_scaling='yarn'"),
    (dict(rope_scaling="yarn", yarn_factor=4.0), "model.rope_scaling='yarn'.*needs model.position='rope'"),
    (dict(position="rope", rope_scaling="yarn", yarn_mscale=-1.0), "model.yarn_mscale must be >= 0"),
    (dict(rope_scaling="ntk"), "model.rope_scaling must be one of"),
])
def test_bad_configs_are_refused(opts, message):
    with pytest.raises(ValueError, match=message):
        tiny(**opts)


def test_group_wide_routers_are_allowed_in_the_encoder():
    cfg = tiny(kind="encoder_decoder", decoder_moe_every=0,
               moe={"router": "expert_choice", "k": 1, "order": "rank_major"})
    model = build_model(cfg, rngs=nnx.Rngs(0))
    logits, aux = model(tokens(), tokens())
    assert logits.shape == (2, 8, V) and aux["moe"]["decoder"] is None


def test_unknown_model_field():
    with pytest.raises(ValueError, match="unknown field.*model.num_layer"):
        ModelConfig.from_dict({"num_layer": 3})


def test_init_scale_scales_every_weight_matrix_but_embeddings_and_router():
    """model.init_scale s (Switch Sec. 2.4): every fan-in-initialised matrix has std sqrt(s / fan_in),
    so at s = 0.1 its std is sqrt(0.1) of the s = 1 model's; embedding tables and the router
    (moe.router_init_scale) and the norms keep theirs."""
    def stds(scale):
        model = build_model(tiny(init_scale=scale, d_model=64, d_ff=96, moe=dict(d_ff=96)), rngs=nnx.Rngs(0))
        params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        return {"/".join(map(str, k)): float(jnp.std(v[...])) for k, v in params.items() if v[...].ndim >= 2}

    full, small = stds(1.0), stds(0.1)
    fixed = [k for k in full if any(s in k for s in ("table", "router", "position_bias", "norm"))]
    scaled = [k for k in full if k not in fixed]
    assert any("experts" in k for k in scaled) and any("attn" in k for k in scaled) and fixed
    for k in scaled:
        assert small[k] / full[k] == pytest.approx(0.1 ** 0.5, rel=0.02), k
    for k in fixed:
        assert small[k] == pytest.approx(full[k], rel=1e-6), k


def test_init_scale_refuses_non_positive():
    with pytest.raises(ValueError, match="model.init_scale"):
        tiny(init_scale=0.0)


def test_dense_ffn_drops_its_hidden_activations_at_the_model_rate():
    """T5's FFN applies dropout between its two matmuls (wi -> act -> dropout -> wo) at the model's
    dropout_rate, in training only; experts use moe.expert_dropout instead."""
    model = build_model(tiny(dropout_rate=0.3, moe=dict(expert_dropout=0.1)), rngs=nnx.Rngs(0))
    layers = model.decoder.units.layers
    assert layers[0].ffn.dropout.rate == 0.3  # the dense FFN of each unit
    assert layers[1].ffn.experts.dropout.rate == 0.1
    ffn = FeedForward(16, 24, dropout_rate=0.3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16))
    assert not np.allclose(ffn(x), ffn(x))  # a fresh mask each training call
    ffn.eval()
    np.testing.assert_array_equal(ffn(x), ffn(x))


def test_qk_norm_normalises_each_heads_query_and_key():
    """With model.qk_norm (Qwen3) the logits do not change when the query and key projections are
    scaled (each head is RMS-normalised over Dh), and do change when the norms' scales do; without
    it, scaling the projections changes them."""
    def logits(qk_norm, proj_scale=1.0, norm_scale=1.0):
        model = build_model(tiny(qk_norm=qk_norm, position="rope"), rngs=nnx.Rngs(0))
        attn = model.decoder.units.layers[0].attn
        attn.query[...] = attn.query[...] * proj_scale
        attn.key[...] = attn.key[...] * proj_scale
        if qk_norm:
            attn.query_norm[...] = attn.query_norm[...] * norm_scale
        return np.asarray(jit_call(model, tokens())[0])

    base = logits(True)
    np.testing.assert_allclose(logits(True, proj_scale=3.0), base, rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(logits(True, norm_scale=3.0) - base)) > 1e-3
    assert np.max(np.abs(logits(False, proj_scale=3.0) - logits(False))) > 1e-3


def test_yarn_keeps_fast_pairs_and_stretches_slow_ones():
    """YaRN (position.rope_for): pairs that turn more than beta_fast times within the original
    context keep their frequency, those under beta_slow are divided by the factor; cos and sin get
    0.1 ln(s) + 1 with no mscale given."""
    plain = position.rope_for(tiny(position="rope", rope_theta=10000.0), 64)
    yarn = position.rope_for(tiny(position="rope", rope_theta=10000.0, rope_scaling="yarn", yarn_factor=8.0,
                                  yarn_original_length=4096), 64)
    ratio = np.array(yarn.freq) / np.array(plain.freq)  # [32]
    turns = 4096 * np.array(plain.freq) / (2 * np.pi)  # rotations of each pair in the original context
    np.testing.assert_allclose(ratio[turns > 33], 1.0, rtol=1e-6)
    np.testing.assert_allclose(ratio[turns < 0.5], 1 / 8, rtol=1e-6)
    assert 0.1 < ratio[(turns > 2) & (turns < 20)].min() < ratio[(turns > 2) & (turns < 20)].max() < 1
    assert plain.scale == 1.0 and yarn.scale == pytest.approx(0.1 * np.log(8) + 1)


@pytest.mark.parametrize("full_every", [0, 4])
def test_banded_layers_see_only_their_window(full_every):
    """model.sliding_window=2 over 4 layers: a token reaches at most 4 positions ahead, unless a
    full-attention layer (the 4th, with full_attention_every=4) carries it the whole way."""
    cfg = tiny(position="rope", decoder_moe_every=1, sliding_window=2, full_attention_every=full_every,
               moe=dict(train_capacity_factor=0.0, eval_capacity_factor=0.0))
    model = build_model(cfg, rngs=nnx.Rngs(0))
    model.eval()
    x = tokens()
    changed = x.at[:, 0].set(x[:, 0] % (V - 1) + 1)  # a different first token
    moved = np.abs(np.asarray(jit_call(model, x)[0] - jit_call(model, changed)[0])).max(axis=(0, 2))  # [L]
    assert moved[4] > 1e-4
    if full_every:
        assert (moved[5:] > 1e-4).all()
    else:
        np.testing.assert_array_equal(moved[5:], 0.0)
