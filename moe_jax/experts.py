"""Feed-forward blocks: the dense FFN (T5 / Transformer) and a batch of E expert FFNs.

Experts hold weights [E, D, F] and [E, F, D] (GShard's layout; the leading axis is the one
expert parallelism shards). Activations: 'relu', 'gelu', and the gated 'swiglu' / 'geglu'
(Shazeer 2020, "GLU Variants Improve Transformer"; T5.1.1 uses gated GELU, Mixtral SwiGLU), and
gpt-oss's 'clamped_swiglu' (OpenAI 2025): gate g = min(x W0, 7), linear part u = clip(x W1, -7, 7),
h = (u + 1) * g * sigmoid(1.702 g). `bias=True` adds biases after the input and output matmuls
(gpt-oss's experts). Expert dropout (Switch, fine-tuning) is its own rate, separate from the
model's dropout.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moe_jax import grouped, sharding

ACTIVATIONS = ("relu", "gelu", "swiglu", "geglu", "clamped_swiglu")
GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 7.0  # clamped_swiglu's sigmoid slope and clamp
EXPERT_MATMUL = "expert_matmul"  # name of the experts' matmul outputs, which remat 'minimal' keeps
_ACT: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu, "gelu": jax.nn.gelu, "swiglu": jax.nn.silu, "geglu": jax.nn.gelu}


def is_gated(activation: str) -> bool:
    return activation in ("swiglu", "geglu", "clamped_swiglu")


def _gated(activation: str, gate: jax.Array, linear: jax.Array) -> jax.Array:
    """The gated unit of [..., F] gate and linear parts."""
    if activation == "clamped_swiglu":
        g = jnp.minimum(gate, GPT_OSS_LIMIT)
        return (jnp.clip(linear, -GPT_OSS_LIMIT, GPT_OSS_LIMIT) + 1) * g * jax.nn.sigmoid(GPT_OSS_ALPHA * g)
    return _ACT[activation](gate) * linear


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
    int32 [E], rows [R, D] grouped by expert as `lay` says -> [R, D] through grouped.matmul.
    """

    def __init__(self, d_model: int, d_ff: int, *, num_experts: int | None = None, activation: str = "relu",
                 dropout_rate: float = 0.0, init_scale: float = 1.0, dtype=jnp.float32,
                 param_dtype=jnp.float32, bias: bool = False, rngs: nnx.Rngs):
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

        def zeros(width, name):  # [(E,) width] biases, zero at init
            return nnx.Param(jnp.zeros(lead + (width,), param_dtype), out_sharding=lead_name + (name,))
        self.bi = nnx.List([zeros(d_ff, "mlp") for _ in range(n_in)]) if bias else None
        self.bo = zeros(d_model, "embed") if bias else None
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array, group_sizes: jax.Array | None = None,
                 lay: grouped.Layout | None = None, reduce=None) -> jax.Array:
        """reduce (grouped rows only): applied to the output projection before its bias, e.g. a psum
        over the mesh axis that splits F (expert parallelism inside shard_map)."""
        x = x.astype(self.dtype)
        if group_sizes is not None:
            lay = lay or grouped.plan("ragged_dot", x.shape[0], group_sizes.shape[0])

            def ragged(a, w):  # [R, D] x [E, D, F] -> [R, F], rows grouped by expert
                return checkpoint_name(grouped.matmul(a, w.astype(self.dtype), group_sizes, lay),
                                       EXPERT_MATMUL)
            # the expert of each row [R]: rows past the groups take the last expert's (unused). E is
            # group_sizes' length: under expert parallelism, the experts of one shard.
            E = group_sizes.shape[0]
            expert = jnp.repeat(jnp.arange(E), group_sizes, total_repeat_length=x.shape[0])
            return self._apply(x, ragged, lambda b: b[expert], reduce)  # [E, W] -> [R, W]
        if self.num_experts is None:
            def dense(a, w):  # [..., D] x [D, F] -> [..., F]
                return jnp.einsum("...d,df->...f", a, w.astype(self.dtype))
            # The TPU cost model (v5e, N = 8192, D = 768): [N, D] costs 23% more at relu F = 3072
            # (1.716 vs 1.393 ms), 0-4% more at F = 6144 or with SwiGLU; keep [B, L, D] there.
            if sharding.target_platform() != "cpu":
                return self._apply(x, dense, lambda b: b)
            # XLA:CPU: rows as one [N, D] matrix; with several leading axes it transposes the [B, L, F]
            # activations to form the weight gradients (3x slower with SwiGLU).
            y = self._apply(x.reshape(-1, x.shape[-1]), dense, lambda b: b)  # [..., D] -> [N, D]
            return y.reshape(*x.shape[:-1], y.shape[-1])

        def batched(a, w):  # [E, N, D] x [E, D, F] -> [E, N, F]
            return checkpoint_name(jnp.einsum("end,edf->enf", a, w.astype(self.dtype)), EXPERT_MATMUL)
        return self._apply(x, batched, lambda b: b[:, None])  # [E, W] -> [E, 1, W]

    def _apply(self, x: jax.Array, matmul, rows, reduce=None) -> jax.Array:
        """rows(bias): a bias laid out to add to the matmul outputs; reduce: see __call__."""
        def project(a, w, b, reduce=None):
            y = matmul(a, w[...]) if reduce is None else reduce(matmul(a, w[...]))
            return y if b is None else y + rows(b[...].astype(self.dtype))
        bi = [None] * len(self.wi) if self.bi is None else list(self.bi)
        first = project(x, self.wi[0], bi[0])  # [..., F]
        if is_gated(self.activation):
            h = _gated(self.activation, first, project(x, self.wi[1], bi[1]))
        else:
            h = _ACT[self.activation](first)
        h = self.dropout(h)
        return project(h, self.wo, self.bo, reduce)  # [..., F] -> [..., D]
