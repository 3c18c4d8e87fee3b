"""Multi-head latent attention (MLA; DeepSeek-AI 2024, "DeepSeek-V2", Sec. 2.1; kept by DeepSeek-V3).

Queries come through a low-rank bottleneck (down-projection, RMSNorm, up-projection; or one direct
projection when model.q_lora_rank=0, as DeepSeek-V2-Lite). Keys and values share one compressed
vector c [R] per token (RMSNorm'd), up-projected per head to a content key k_nope and a value; a
single decoupled RoPE key k_rope, shared by every head, carries the position. Each head's query is
split the same way: RoPE applies to the rope parts only. Logits are scaled by
1/sqrt(qk_nope_head_dim + qk_rope_head_dim), times YaRN's m^2 under model.rope_scaling='yarn'
(position.yarn_logit_scale). The decoding cache holds only c and the rotated
k_rope. RoPE here is rotate-half (position.apply_rope); checkpoints whose rope features are
interleaved pairs are permuted when converted.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.models.attention import NEG_INF
from moe_jax.models.config import ModelConfig
from moe_jax.models.norm import rms_norm
from moe_jax.models.position import apply_rope, rope_for, yarn_logit_scale


class LatentAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, R, Rq = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank, cfg.q_lora_rank
        Dn, Dr, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.dims, self.rope, self.eps = (Dn, Dr, Dv), rope_for(cfg, Dr), cfg.norm_eps
        self.logit_scale = yarn_logit_scale(cfg) / math.sqrt(Dn + Dr)
        self.dtype = cfg.activation_dtype
        init = nnx.initializers.variance_scaling(cfg.init_scale, "fan_in", "truncated_normal", in_axis=0,
                                                 out_axis=(1, 2))
        down = nnx.initializers.variance_scaling(cfg.init_scale, "fan_in", "truncated_normal")
        self.q_down = nnx.Param(down(rngs.params(), (D, Rq)), out_sharding=("embed", "kv")) if Rq else None
        self.q_norm = nnx.Param(jnp.ones((Rq,), jnp.float32), out_sharding=("kv",)) if Rq else None
        # [Rq, H, Dn + Dr] from the query latent, or [D, H, Dn + Dr] straight from the model width
        self.query = nnx.Param(init(rngs.params(), (Rq or D, H, Dn + Dr)),
                               out_sharding=("kv" if Rq else "embed", "heads", None))
        self.kv_down = nnx.Param(down(rngs.params(), (D, R + Dr)), out_sharding=("embed", "kv"))
        self.kv_norm = nnx.Param(jnp.ones((R,), jnp.float32), out_sharding=("kv",))
        self.kv_up = nnx.Param(init(rngs.params(), (R, H, Dn + Dv)), out_sharding=("kv", "heads", None))
        out = nnx.initializers.variance_scaling(cfg.init_scale, "fan_in", "truncated_normal", in_axis=(0, 1),
                                                out_axis=2)
        self.out = nnx.Param(out(rngs.params(), (H, Dv, D)), out_sharding=("heads", "kv", "embed"))

    def _queries(self, x, q_pos):
        """x [B, L, D] -> (q_nope [B, L, H, Dn], q_rope [B, L, H, Dr] rotated)."""
        dt, Dn = self.dtype, self.dims[0]
        if self.q_down is not None:
            x = jnp.einsum("bld,dr->blr", x, self.q_down[...].astype(dt))  # [B, L, Rq]
            x = rms_norm(x, self.q_norm[...], self.eps, dt)
        q = jnp.einsum("blr,rhk->blhk", x, self.query[...].astype(dt))  # [B, L, H, Dn + Dr]
        return q[..., :Dn], apply_rope(q[..., Dn:], q_pos, self.rope)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, mask: jax.Array,
                 bias: jax.Array | None = None, q_pos: jax.Array | None = None,
                 k_pos: jax.Array | None = None, cache: dict | None = None,
                 cache_index: jax.Array | None = None):
        """Self-attention only (context must be None); arguments and result as attention.Attention's.

        cache {'latent': [B, M, R], 'k_rope': [B, M, Dr]}, written at cache_index.
        """
        if context is not None:
            raise ValueError("model.attention='mla' is self-attention only (no cross-attention)")
        dt, (Dn, Dr, _) = self.dtype, self.dims
        x = x.astype(dt)
        q_nope, q_rope = self._queries(x, q_pos)
        kv = jnp.einsum("bld,dr->blr", x, self.kv_down[...].astype(dt))  # [B, L, R + Dr]
        latent = rms_norm(kv[..., :-Dr], self.kv_norm[...], self.eps, dt)  # [B, L, R]
        k_rope = apply_rope(kv[..., None, -Dr:], q_pos, self.rope)[:, :, 0]  # [B, L, Dr]
        if cache is not None:
            # [B, M, R] and [B, M, Dr] <- this call's rows at cache_index ... cache_index + L - 1
            cache = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], new.astype(cache[name].dtype),
                                                               cache_index, axis=1)
                     for name, new in (("latent", latent), ("k_rope", k_rope))}
            latent, k_rope = cache["latent"], cache["k_rope"]
        kv = jnp.einsum("bmr,rhk->bmhk", latent.astype(dt), self.kv_up[...].astype(dt))  # [B, M, H, Dn + Dv]
        k_nope, v = kv[..., :Dn], kv[..., Dn:]
        logits = (jnp.einsum("blhk,bmhk->bhlm", q_nope, k_nope)  # [B, H, L, M]
                  + jnp.einsum("blhk,bmk->bhlm", q_rope, k_rope.astype(dt))).astype(jnp.float32)
        logits = logits * jnp.float32(self.logit_scale)
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        probs = jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1).astype(dt)  # [B, H, L, M]
        y = jnp.einsum("bhlm,bmhk->blhk", probs, v)  # [B, L, H, Dv]
        return jnp.einsum("blhk,hkd->bld", y, self.out[...].astype(dt)), cache  # [B, L, D]
