"""Feed-forward blocks: the dense FFN (T5 / Transformer) and a batch of E expert FFNs.

Experts hold weights [E, D, F] and [E, F, D] (GShard's layout; the leading axis is the one
expert parallelism shards). Activations: 'relu', 'gelu', and the gated 'swiglu' / 'geglu'
(Shazeer 2020, "GLU Variants Improve Transformer"; T5.1.1 uses gated GELU, Mixtral SwiGLU).
Expert dropout (Switch, fine-tuning) is its own rate, separate from the model's dropout.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

ACTIVATIONS = ("relu", "gelu", "swiglu", "geglu")
EXPERT_MATMUL = "expert_matmul"  # name of the experts' matmul outputs, which remat 'minimal' keeps
_ACT: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu, "gelu": jax.nn.gelu, "swiglu": jax.nn.silu, "geglu": jax.nn.gelu}


def is_gated(activation: str) -> bool:
    return activation in ("swiglu", "geglu")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def fan_in_init(scale: float = 1.0):
    """Truncated normal with std sqrt(scale / fan_in), fan_in = the size of axis -2 (T5 / Switch init).

    Axes before the last two (the experts of [E, D, F]) are batch axes: each expert is initialised
    as its own [D, F] matrix. Counted as receptive field instead, they would shrink every expert's
    std by sqrt(E) and, under Adafactor's parameter-scaled updates, its learning rate with it.
    """
    def init(key, shape, dtype=jnp.float32):
        batch = tuple(range(len(shape) - 2))
        return nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                                 batch_axis=batch)(key, shape, dtype)
    return init


class FeedForward(nnx.Module):
    """One FFN or a batch of E of them; `num_experts=None` is the dense FFN.

    Dense: x [..., D] -> [..., D]. Experts: x [E, N, D] -> [E, N, D], or, with group_sizes
    int32 [E], rows [N, D] sorted by expert -> [N, D] through jax.lax.ragged_dot.
    """

    def __init__(self, d_model: int, d_ff: int, *, num_experts: int | None = None, activation: str = "relu",
                 dropout_rate: float = 0.0, init_scale: float = 1.0, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_activation(activation)
        self.activation, self.dtype, self.num_experts = activation, dtype, num_experts
        lead = () if num_experts is None else (num_experts,)
        lead_name = () if num_experts is None else ("expert",)

        def param(shape, names):
            return nnx.Param(fan_in_init(init_scale)(rngs.params(), lead + shape, param_dtype),
                             out_sharding=lead_name + names)

        n_in = 2 if is_gated(activation) else 1
        self.wi = nnx.List([param((d_model, d_ff), ("embed", "mlp")) for _ in range(n_in)])
        self.wo = param((d_ff, d_model), ("mlp", "embed"))
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array, group_sizes: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        if group_sizes is not None:
            def ragged(a, w):  # [N, D] x [E, D, F] -> [N, F], rows grouped by expert
                return checkpoint_name(jax.lax.ragged_dot(a, w.astype(self.dtype), group_sizes),
                                       EXPERT_MATMUL)
            return self._apply(x, ragged)
        if self.num_experts is None:
            # Rows as one [N, D] matrix: with several leading axes XLA:CPU transposes the [B, L, F]
            # activations to form the weight gradients (3x slower with SwiGLU).
            def dense(a, w):  # [N, D] x [D, F] -> [N, F]
                return jnp.einsum("nd,df->nf", a, w.astype(self.dtype))
            y = self._apply(x.reshape(-1, x.shape[-1]), dense)  # [..., D] -> [N, D]
            return y.reshape(*x.shape[:-1], y.shape[-1])

        def batched(a, w):  # [E, N, D] x [E, D, F] -> [E, N, F]
            return checkpoint_name(jnp.einsum("end,edf->enf", a, w.astype(self.dtype)), EXPERT_MATMUL)
        return self._apply(x, batched)

    def _apply(self, x: jax.Array, matmul) -> jax.Array:
        h = _ACT[self.activation](matmul(x, self.wi[0][...]))  # [..., F]
        if is_gated(self.activation):
            h = h * matmul(x, self.wi[1][...])
        h = self.dropout(h)
        return matmul(h, self.wo[...])  # [..., F] -> [..., D]
