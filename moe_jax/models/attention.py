"""Multi-head attention with grouped-query heads (GQA, Ainslie et al. 2023), an additive position
bias or rotary embeddings, boolean masks, and a key/value cache for incremental decoding.

Softmax in float32 whatever the activation dtype. Logits are scaled by 1/sqrt(head_dim) (Vaswani
et al. 2017); T5 folds that factor into its query initialisation instead, which changes neither
the function class nor the parameter count.

model.qk_norm (Qwen3, Yang et al. 2025): each head's query and key are RMS-normalised over Dh,
float32 inside, with one learned [Dh] scale for all query heads and one for all key heads, before
RoPE. It applies wherever this module runs, self- and cross-attention alike (the keys of a
cross-attention are normalised as its queries are); Qwen3 itself is decoder-only.

gpt-oss (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card"): model.attention_bias adds biases
to the four projections; model.attention_sinks gives each head a learned logit that joins every
query's softmax as one more key with no value, so a head can attend to nothing (Xiao et al.
2023's attention sinks, learned). Banded layers get their mask from the caller (models.blocks).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.models.config import ModelConfig
from moe_jax.models.norm import rms_norm
from moe_jax.models.position import apply_rope, rope_for

NEG_INF = -1e30


def make_mask(q_segment: jax.Array, k_segment: jax.Array, *, causal: bool, q_pos: jax.Array | None = None,
              k_pos: jax.Array | None = None) -> jax.Array:
    """Who may attend to whom: bool [B, 1, Lq, Lk].

    q_segment [B, Lq], k_segment [B, Lk]: segment ids of packed sequences, 0 for padding; a query
    sees keys of its own segment. causal: also only keys at positions <= the query's.
    """
    mask = (q_segment[:, :, None] == k_segment[:, None, :]) & (k_segment[:, None, :] != 0)  # [B, Lq, Lk]
    if causal:
        mask &= k_pos[:, None, :] <= q_pos[:, :, None]
    return mask[:, None]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, KVH, Dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
        self.num_heads, self.kv_heads, self.head_dim = H, KVH, Dh
        self.rope = rope_for(cfg, Dh) if cfg.position == "rope" else None
        self.dtype = cfg.activation_dtype
        s = cfg.init_scale
        proj_in = nnx.initializers.variance_scaling(s, "fan_in", "truncated_normal", in_axis=0,
                                                    out_axis=(1, 2))
        proj_out = nnx.initializers.variance_scaling(s, "fan_in", "truncated_normal", in_axis=(0, 1),
                                                     out_axis=2)
        self.query = nnx.Param(proj_in(rngs.params(), (D, H, Dh)), out_sharding=("embed", "heads", "kv"))
        self.key = nnx.Param(proj_in(rngs.params(), (D, KVH, Dh)), out_sharding=("embed", "kv_heads", "kv"))
        self.value = nnx.Param(proj_in(rngs.params(), (D, KVH, Dh)), out_sharding=("embed", "kv_heads", "kv"))
        self.out = nnx.Param(proj_out(rngs.params(), (H, Dh, D)), out_sharding=("heads", "kv", "embed"))
        self.norm_eps = cfg.norm_eps

        def zeros(shape, names):  # biases and sinks start at 0
            return nnx.Param(jnp.zeros(shape, jnp.float32), out_sharding=names)
        bias = cfg.attention_bias
        self.query_bias = zeros((H, Dh), ("heads", "kv")) if bias else None
        self.key_bias = zeros((KVH, Dh), ("kv_heads", "kv")) if bias else None
        self.value_bias = zeros((KVH, Dh), ("kv_heads", "kv")) if bias else None
        self.out_bias = zeros((D,), ("embed",)) if bias else None
        self.sinks = zeros((H,), ("heads",)) if cfg.attention_sinks else None

        def head_scale():  # [Dh] of ones, qk_norm only
            return nnx.Param(jnp.ones((Dh,), jnp.float32), out_sharding=("kv",)) if cfg.qk_norm else None
        self.query_norm, self.key_norm = head_scale(), head_scale()

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, mask: jax.Array,
                 bias: jax.Array | None = None, q_pos: jax.Array | None = None,
                 k_pos: jax.Array | None = None, cache: dict | None = None,
                 cache_index: jax.Array | None = None):
        """x [B, Lq, D]; context [B, Lk, D] for cross-attention (None: self-attention).

        mask bool [B, 1, Lq, Lk]; bias float [B, H, Lq, Lk]; q_pos [B, Lq], k_pos [B, Lk] for RoPE.
        cache {'k', 'v': [B, M, KVH, Dh]}: this call's keys and values are written at cache_index
        and the queries attend over all M cached positions (mask is then [B, 1, Lq, M]).
        Returns (y [B, Lq, D], the updated cache or None).
        """
        dt = self.dtype
        x = x.astype(dt)
        source = x if context is None else context.astype(dt)
        q = jnp.einsum("bld,dhk->blhk", x, self.query[...].astype(dt))  # [B, Lq, H, Dh]
        k = jnp.einsum("bmd,dhk->bmhk", source, self.key[...].astype(dt))  # [B, Lk, KVH, Dh]
        v = jnp.einsum("bmd,dhk->bmhk", source, self.value[...].astype(dt))  # [B, Lk, KVH, Dh]
        if self.query_bias is not None:
            q, k, v = (a + b[...].astype(dt) for a, b in ((q, self.query_bias), (k, self.key_bias),
                                                         (v, self.value_bias)))
        if self.query_norm is not None:
            q = rms_norm(q, self.query_norm[...], self.norm_eps, q.dtype)  # [B, Lq, H, Dh] over Dh
            k = rms_norm(k, self.key_norm[...], self.norm_eps, k.dtype)  # [B, Lk, KVH, Dh] over Dh
        if self.rope is not None and context is None:
            q = apply_rope(q, q_pos, self.rope)
            k = apply_rope(k, q_pos, self.rope)  # self-attention: keys sit at the queries' positions
        if cache is not None:
            # [B, M, KVH, Dh] <- [B, Lq, KVH, Dh] at positions cache_index ... cache_index + Lq - 1
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index,
                                                    axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index,
                                                    axis=1)
            cache = {"k": k, "v": v}
        B, Lq = q.shape[:2]
        group = self.num_heads // self.kv_heads
        q = q.reshape(B, Lq, self.kv_heads, group, self.head_dim)  # [B, Lq, KVH, G, Dh]
        logits = jnp.einsum("blhgk,bmhk->bhglm", q, k.astype(dt)).astype(jnp.float32)  # [B, KVH, G, Lq, Lk]
        logits = logits / jnp.sqrt(jnp.float32(self.head_dim))
        if bias is not None:
            logits = logits + bias.reshape(B, self.kv_heads, group, Lq, -1).astype(jnp.float32)
        logits = jnp.where(mask[:, :, None], logits, NEG_INF)  # [B, 1, 1, Lq, Lk] broadcast
        probs = self._softmax(logits).astype(dt)
        y = jnp.einsum("bhglm,bmhk->blhgk", probs, v.astype(dt)).reshape(B, Lq, self.num_heads, self.head_dim)
        y = jnp.einsum("blhk,hkd->bld", y, self.out[...].astype(dt))  # [B, Lq, D]
        return (y if self.out_bias is None else y + self.out_bias[...].astype(dt)), cache

    def _softmax(self, logits: jax.Array) -> jax.Array:
        """float32 [B, KVH, G, Lq, Lk] -> probabilities over Lk; with sinks, each head's sink logit
        takes its share of the denominator and is dropped."""
        if self.sinks is None:
            return jax.nn.softmax(logits, axis=-1)
        B, KVH, G, Lq, _ = logits.shape
        sink = jnp.broadcast_to(self.sinks[...].reshape(1, KVH, G, 1, 1), (B, KVH, G, Lq, 1))
        return jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]  # [.., Lk + 1]
