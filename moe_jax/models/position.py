"""Position information: T5's relative position bias (Raffel et al. 2020, Sec. 2.1) and rotary
embeddings (RoPE, Su et al. 2021; used by Mixtral).

T5 buckets the distance query - key: the nearest distances get a bucket each, farther ones share
logarithmically wider buckets up to max_distance; a bidirectional (encoder) bias spends half the
buckets on each direction, a causal (decoder) one only looks back. One learned scalar per bucket
and head, shared by every layer of the stack.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
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


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate feature pairs (i, i + Dh/2) by position * theta^(-2i/Dh): x [B, L, H, Dh],
    positions int [B, L]."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [Dh/2]
    angle = positions.astype(jnp.float32)[:, :, None, None] * freq  # [B, L, 1, Dh/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
