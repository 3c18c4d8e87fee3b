"""Grouped matmul of rows sorted by expert: y[r] = x[r] @ w[e(r)] (MegaBlocks, Gale et al. 2022).

The dropless dispatch lays the assignments out as rows [R, K] grouped by expert (group_sizes int32
[E], padding rows after their sum) and each expert FFN matmul is one grouped product. Backends:
- 'megablox': JAX's Pallas TPU kernel (jax.experimental.pallas.ops.tpu.megablox): gmm forward,
  gmm and tgmm backward, so no dense product over all experts and no scatter. Tiles of at most
  1024 x 768 x 768 fit the default scoped VMEM of v5e (1024 x 768 x 1536 does not); the kernel
  declares its cost to the compiler (its lhs read once per column tile). Off TPU it runs in the
  Pallas interpreter, for tests.
- 'ragged_dot': jax.lax.ragged_dot, native on GPU. XLA:TPU costs its weight gradient as a dense
  masked product over all experts, and XLA:CPU computes it densely over all experts.
- 'blocks' (XLA:CPU): every expert's group padded to a multiple of b rows, so that each block of b
  rows belongs to one expert; the blocks' weights are gathered [NB, K, N] and one batched matmul
  does the rest. Work is R = N + E * (b - 1) rows instead of E * N.
Rows past the sum of group_sizes come out zero and pass no gradient, whatever the backend.
"""
from __future__ import annotations

import math
import typing
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from moe_jax import sharding

Backend = Literal["megablox", "ragged_dot", "blocks"]
BACKENDS = typing.get_args(Backend)
AUTO = {"tpu": "megablox", "gpu": "ragged_dot", "cpu": "blocks"}
MAX_TILE_M, TILE_KN = 1024, (768, 512, 256, 128)


def resolve(backend: str) -> str:
    """'auto' -> the backend for the platform being traced for (sharding.target_platform)."""
    if backend == "auto":
        return AUTO.get(sharding.target_platform(), "ragged_dot")
    if backend not in BACKENDS:
        raise ValueError(f"moe.grouped_matmul must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


class Layout(NamedTuple):
    """How the dropless dispatch lays out n assignments for a backend: each expert's rows start at
    a multiple of `align` (the block size of 'blocks', else 1), in R = `rows` rows, a multiple of the
    backend's row tile and at least n + E * (align - 1)."""
    backend: str
    align: int
    rows: int


def plan(backend: str, n: int, num_experts: int) -> Layout:
    """The Layout of n assignments to num_experts experts; backend may be 'auto'."""
    backend = resolve(backend)
    if backend == "blocks":
        b = block_rows(n, num_experts)
        return Layout(backend, b, _round_up(n + num_experts * (b - 1), b))
    if backend == "megablox":
        return Layout(backend, 1, _round_up(max(n, 1), megablox_tiling(n, 128, 128)[0]))
    return Layout(backend, 1, n)


def block_rows(n: int, num_experts: int) -> int:
    """b for 'blocks': a power of two, 8..256, with the E * b padding rows at most n / 4."""
    b = 8
    while b < 256 and 2 * b * num_experts * 4 <= n:
        b *= 2
    return b


def megablox_tiling(rows: int, k: int, n: int) -> tuple[int, int, int]:
    """(tm, tk, tn): the backward pass swaps k and n, so tk = tn divides both."""
    tm = min(MAX_TILE_M, _round_up(max(rows, 1), 128))
    common = math.gcd(k, n)
    t = next((t for t in TILE_KN if common % t == 0), common)
    return tm, t, t


def matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, lay: Layout) -> jax.Array:
    """x [R, K] grouped by expert as `lay` says, w [E, K, N], group_sizes int32 [E] -> [R, N]."""
    R = x.shape[0]
    valid = (jnp.arange(R) < jnp.sum(group_sizes))[:, None]  # [R, 1]
    if lay.backend == "megablox":
        return jnp.where(valid, _megablox(jnp.where(valid, x, 0), w, group_sizes), 0)
    if lay.backend == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes)  # [R, N], zero past the groups
    if lay.backend == "blocks":
        return _blocks(x, w, group_sizes, valid, lay.align)
    raise ValueError(f"unknown grouped matmul backend {lay.backend!r}; one of {BACKENDS}")


def _megablox(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """gmm, K and N zero-padded to multiples of 256 when no tile of TILE_KN divides both (gpt-oss's
    2880: a whole-width tile overflows VMEM). Rows past the groups come out unwritten."""
    K, N = w.shape[1:]
    if math.gcd(K, N) % TILE_KN[-1]:
        Kp, Np = _round_up(K, 256), _round_up(N, 256)
        x = jnp.pad(x, ((0, 0), (0, Kp - K)))  # [R, K] -> [R, Kp]
        w = jnp.pad(w, ((0, 0), (0, Kp - K), (0, Np - N)))  # [E, K, N] -> [E, Kp, Np]
    interpret = sharding.target_platform() != "tpu"
    tiling = megablox_tiling(x.shape[0], w.shape[1], w.shape[2])
    y = megablox.gmm(x, w, group_sizes, x.dtype, tiling, None, None, False, interpret)  # [R, Np]
    return y[:, :N]


def _blocks(x: jax.Array, w: jax.Array, group_sizes: jax.Array, valid: jax.Array, b: int) -> jax.Array:
    R, K = x.shape
    E, _, N = w.shape
    # the expert of each block [NB]: blocks past the groups take the last expert (their rows are 0)
    ends = jnp.cumsum(group_sizes)  # [E]
    block_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(0, R, b), side="right"), E - 1)
    weights = jnp.take(w, block_expert, axis=0)  # [E, K, N] -> [NB, K, N]
    y = jnp.einsum("nbk,nkf->nbf", jnp.where(valid, x, 0).reshape(R // b, b, K), weights)  # [NB, b, N]
    return jnp.where(valid, y.reshape(R, N), 0)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m
