"""Position information: T5's relative position bias (Raffel et al. 2020, Sec. 2.1) and rotary
embeddings (RoPE, Su et al. 2021; used by Mixtral), optionally YaRN-scaled (Peng et al. 2023,
"YaRN: Efficient Context Window Extension of Large Language Models"; DeepSeek-V3, gpt-oss).

T5 buckets the distance query - key: the nearest distances get a bucket each, farther ones share
logarithmically wider buckets up to max_distance; a bidirectional (encoder) bias spends half the
buckets on each direction, a causal (decoder) one only looks back. One learned scalar per bucket
and head, shared by every layer of the stack.

YaRN (model.rope_scaling='yarn') stretches a context of yarn_original_length by yarn_factor s:
pair i keeps its frequency where its wavelength fits more than beta_fast times in the original
context, is divided by s where it fits fewer than beta_slow times, and is blended linearly in
between (the ramp's ends floored and ceiled when yarn_truncate). cos and sin are multiplied by
m(s, mscale) / m(s, mscale_all_dim), or m(s) when either is 0, with m(s, a) = 0.1 a ln(s) + 1;
latent attention also multiplies its logits by m(s, mscale_all_dim)^2 (yarn_logit_scale), as
DeepSeek's code and transformers do.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def relative_bucket(distance: jax.Array, *, bidirectional: bool, num_buckets: int,
                    max_distance: int) -> jax.Array:
    """distance = query position - key position, int [...] -> bucket int32 [...]."""
    bucket = jnp.zeros_like(distance)
    if bidirectional:
        num_buckets //= 2
        bucket = jnp.where(distance < 0, num_buckets, 0)  # keys after the query: the upper half
        distance = jnp.abs(distance)
    else:
        distance = jnp.maximum(distance, 0)
    exact = num_buckets // 2
    # Log-spaced buckets for distances in [exact, max_distance), the last bucket beyond.
    scaled = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
    far = exact + (scaled * (num_buckets - exact)).astype(jnp.int32)
    far = jnp.minimum(far, num_buckets - 1)
    return (bucket + jnp.where(distance < exact, distance, far)).astype(jnp.int32)


class RelativePositionBias(nnx.Module):
    def __init__(self, num_buckets: int, max_distance: int, num_heads: int, *, bidirectional: bool,
                 rngs: nnx.Rngs):
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.embedding = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (num_buckets, num_heads)),
                                   out_sharding=("relpos_buckets", "heads"))

    def __call__(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        """q_pos int [B, Lq], k_pos int [B, Lk] -> bias float32 [B, H, Lq, Lk]."""
        bucket = relative_bucket(q_pos[:, :, None] - k_pos[:, None, :], bidirectional=self.bidirectional,
                                 num_buckets=self.num_buckets, max_distance=self.max_distance)  # [B, Lq, Lk]
        return jnp.transpose(self.embedding[...][bucket], (0, 3, 1, 2))  # [B, Lq, Lk, H] -> [B, H, Lq, Lk]


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding of one rotated width: per-pair angular frequencies, the factor on cos and sin."""
    freq: tuple[float, ...]
    scale: float = 1.0


def rope_for(cfg, dim: int) -> Rope:
    """The RoPE of `dim` rotated features under model config `cfg` (theta, rope_scaling, yarn_*)."""
    freq = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)  # [dim/2]
    if cfg.rope_scaling == "none":
        return Rope(tuple(freq.tolist()))

    def pair(rotations):  # the pair whose wavelength fits `rotations` times in the original context
        turns = cfg.yarn_original_length / (rotations * 2 * math.pi)
        return dim * math.log(turns) / (2 * math.log(cfg.rope_theta))
    low, high = pair(cfg.yarn_beta_fast), pair(cfg.yarn_beta_slow)
    if cfg.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / max(high - low, 1e-3), 0, 1)  # [dim/2]
    kept = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate (divided by s)
    freq = freq / cfg.yarn_factor * (1 - kept) + freq * kept
    s, a, b = cfg.yarn_factor, cfg.yarn_mscale, cfg.yarn_mscale_all_dim
    scale = yarn_mscale(s, a) / yarn_mscale(s, b) if a and b else yarn_mscale(s)
    return Rope(tuple(freq.astype(np.float32).tolist()), float(scale))


def yarn_logit_scale(cfg) -> float:
    """Latent attention's extra logit factor under YaRN: m(s, mscale_all_dim)^2 (1 without)."""
    if cfg.rope_scaling != "yarn" or not cfg.yarn_mscale_all_dim:
        return 1.0
    return yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim) ** 2


def apply_rope(x: jax.Array, positions: jax.Array, rope: Rope) -> jax.Array:
    """Rotate feature pairs (i, i + Dh/2) by position * rope.freq[i], times rope.scale: x [B, L, H, Dh],
    positions int [B, L]."""
    half = x.shape[-1] // 2
    freq = jnp.asarray(rope.freq, jnp.float32)  # [Dh/2]
    angle = positions.astype(jnp.float32)[:, :, None, None] * freq  # [B, L, 1, Dh/2]
    cos, sin = jnp.cos(angle) * rope.scale, jnp.sin(angle) * rope.scale
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
