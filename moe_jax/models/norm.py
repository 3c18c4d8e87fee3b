"""RMSNorm (Zhang & Sennrich 2019), T5's layer norm: scale by the root mean square, no centring
and no bias, float32 inside. The layers' norms, Qwen3's per-head query/key norms and latent
attention's norms of its compressed vectors all use this one."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype) -> jax.Array:
    """x [..., D] (any dtype) -> [..., D] in `dtype`; float32 inside.

    Checkpointed: the backward pass recomputes the float32 internals from x instead of saving
    them, so a scanned stack stores no float32 copy of a bfloat16 activation per norm (less
    memory, and fewer stacked residuals for the compiler to handle).
    """
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)  # [..., D]
    return (y * scale).astype(dtype)


class RMSNorm(nnx.Module):
    """T5's layer norm: scale by the root mean square, no centring and no bias; float32 inside."""

    def __init__(self, d_model: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((d_model,), jnp.float32), out_sharding=("embed",))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps, self.dtype)
