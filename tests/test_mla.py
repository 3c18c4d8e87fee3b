"""Multi-head latent attention (models.mla): equals a NumPy transcription of DeepSeek-V2's equations,
decodes incrementally like the full forward pass, and refuses what it cannot be."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.models import ModelConfig, build_model
from moe_jax.models.mla import LatentAttention

MLA = dict(kind="decoder", vocab_size=37, d_model=16, num_heads=4, head_dim=4, d_ff=24, num_decoder_layers=2,
           decoder_moe_every=0, position="rope", attention="mla", kv_lora_rank=6, qk_nope_head_dim=4,
           qk_rope_head_dim=4, v_head_dim=3)


def rope(x, pos, theta=10000.0):
    """Rotate-half RoPE over the last axis of x [L, ..., Dr] at positions pos [L]."""
    half = x.shape[-1] // 2
    angle = pos[:, None] * theta ** (-np.arange(half) / half)  # [L, Dr/2]
    angle = angle.reshape(angle.shape[:1] + (1,) * (x.ndim - 2) + angle.shape[1:])
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)], -1)


def reference(p, x, q_lora, eps=1e-6):
    """DeepSeek-V2 Eqs. 9-19 for one sequence x [L, D], causal."""
    def norm(v, s):
        return v / np.sqrt(np.mean(v ** 2, -1, keepdims=True) + eps) * s

    L, pos = x.shape[0], np.arange(x.shape[0], dtype=np.float64)
    cq = norm(x @ p["q_down"], p["q_norm"]) if q_lora else x
    q = np.einsum("lr,rhk->lhk", cq, p["query"])
    q_nope, q_pe = q[..., :4], rope(q[..., 4:], pos)
    ckv = x @ p["kv_down"]
    c, k_pe = norm(ckv[:, :6], p["kv_norm"]), rope(ckv[:, 6:], pos)
    kv = np.einsum("lr,rhk->lhk", c, p["kv_up"])
    k, v = kv[..., :4], kv[..., 4:]
    s = (np.einsum("lhk,mhk->hlm", q_nope, k) + np.einsum("lhk,mk->hlm", q_pe, k_pe)) / np.sqrt(8)
    s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("hkd,lhk->ld", p["out"], np.einsum("hlm,mhk->lhk", w, v))


@pytest.mark.parametrize("q_lora", [0, 5])
def test_latent_attention_equals_the_papers_equations(q_lora):
    cfg = ModelConfig(**MLA, q_lora_rank=q_lora)
    attn = LatentAttention(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for name in ("q_norm", "kv_norm"):  # non-trivial norm scales
        if (scale := getattr(attn, name)) is not None:
            scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, scale.shape), jnp.float32)
    x = rng.normal(size=(1, 7, 16)).astype(np.float32)
    pos = jnp.arange(7)[None]
    mask = jnp.tril(jnp.ones((7, 7), bool))[None, None]
    y, _ = attn(jnp.asarray(x), mask=mask, q_pos=pos)
    params = {k: np.asarray(v[...], np.float64) for k, v in nnx.state(attn, nnx.Param).items()}
    np.testing.assert_allclose(np.asarray(y[0]), reference(params, x[0].astype(np.float64), q_lora),
                               rtol=1e-4, atol=1e-5)


def test_incremental_decoding_equals_the_full_forward_pass():
    model = build_model(ModelConfig(**MLA, q_lora_rank=5), rngs=nnx.Rngs(1))
    seq = jax.random.randint(jax.random.PRNGKey(0), (2, 6), 1, 37)
    full, _ = model(seq)
    cache = model.init_cache(2, 6)
    layer = cache["decoder"][0]
    assert set(layer) == {"latent", "k_rope"} and layer["latent"].shape == (2, 2, 6, 6)
    key_valid = jnp.zeros((2, 6), bool).at[:, :3].set(True)
    logits, cache = model.decode(seq[:, :3], cache, index=jnp.int32(0), key_valid=key_valid)
    steps = [logits]
    for t in range(3, 6):
        key_valid = key_valid.at[:, t].set(True)
        logits, cache = model.decode(seq[:, t:t + 1], cache, index=jnp.int32(t), key_valid=key_valid)
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opts,message", [
    (dict(kind="encoder_decoder", num_encoder_layers=2, encoder_moe_every=0), "model.attention='mla' needs"),
    (dict(position="relative"), "model.position must be 'rope'"),
    (dict(qk_rope_head_dim=3), "model.qk_rope_head_dim must be even"),
    (dict(kv_lora_rank=0), "model.kv_lora_rank must be an int >= 1"),
    (dict(attention="gqa"), "model.attention must be one of"),
])
def test_bad_mla_configs_are_refused(opts, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**MLA, **opts})
