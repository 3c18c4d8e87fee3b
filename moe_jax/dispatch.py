"""Dispatch: move tokens into expert buffers and expert outputs back, weighted (GShard, Lepikhin
et al. 2020; MegaBlocks, Gale et al. 2022 for the dropless form).

Three interchangeable strategies behind one interface, `dispatch(x, decision) -> (inputs, ctx)`
and `combine(outputs, ctx) -> y`; a decision hands them its own one-hot masks (`masks`) and slot
maps (`slots`), so they serve token choice and expert choice alike:
- 'einsum': the GShard/Flaxformer reference, one-hot masks [G, S, E, C] and two einsums. Its
  work and memory grow with S * E * C.
- 'index': integer slot maps and row gathers, O(tokens x K) memory. Both directions are gathers
  and so are their gradients: a token's slots and a slot's token are inverse maps, so the VJP
  of one gather is a gather through the other map (no scatter-add of activations).
- 'dropless': assignments sorted by expert for a grouped matmul (moe_jax.grouped: megablox on TPU,
  ragged_dot on GPU, blocks of one expert on CPU); nothing is dropped beyond the capacity, and with
  capacity factor <= 0 nothing at all, and no expert is padded to S slots. With experts sharded,
  moe_jax.expert_parallel runs it per device and exchanges the rows between the experts' devices.
Buffers use the layout [E, G * C, D] (expert-major), the one expert parallelism shards over E.
Each strategy fills them per group first, the groups kept where the batch is sharded, and then
moves them expert-major: the two layout constraints make GSPMD exchange the buffers with one
all-to-all, not gather every token onto every device (what it chose at E = 128 on 16 chips).
"""
from __future__ import annotations

import typing
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from moe_jax import grouped, sharding
from moe_jax.routing import SlotMaps

Strategy = Literal["einsum", "index", "dropless"]
STRATEGIES = typing.get_args(Strategy)


@jax.custom_vjp
def gather_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """out[i] = x[index[i]] (0 where index[i] >= N): x [N, D], index int [M] -> [M, D].

    inverse int [N, m]: the rows of out that read each row of x (entries >= M: none). The
    gradient is then a gather too: dx[j] = sum_m dout[inverse[j, m]].
    """
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(x, index, inverse):
    return gather_rows(x, index, inverse), (index, inverse)


def _gather_rows_bwd(res, dout):
    index, inverse = res
    # [m, N, D], m leading: as [N, m, D] a small m is the second-minor axis, which a TPU tiles by 8
    dx = jnp.take(dout, inverse.T, axis=0, mode="fill", fill_value=0)
    return jnp.sum(dx, axis=0), None, None  # [N, D]


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def buffer_capacity(decision, group_size: int) -> int:
    """Slots per expert and group; dropless decisions get S (an expert takes a token at most once)."""
    return group_size if decision.capacity is None else decision.capacity


# ----------------------------------------------------------------------------- einsum (reference)
GROUPED = (None, "batch", None, "embed")  # logical axes of [E, G, C, D]: sharded by group


class EinsumCtx(NamedTuple):
    combine: jax.Array  # float32 [G, S, E, C]


def einsum_dispatch(x: jax.Array, decision) -> tuple[jax.Array, EinsumCtx]:
    G, S, D = x.shape
    dispatch, combine = decision.masks(buffer_capacity(decision, S))  # [G, S, E, C] x2
    inputs = jnp.einsum("gsec,gsd->egcd", dispatch.astype(x.dtype), x)  # [E, G, C, D]
    inputs = sharding.constrain(inputs, GROUPED)  # computed where its groups are
    E, _, C, _ = inputs.shape
    return inputs.reshape(E, G * C, D), EinsumCtx(combine)


def einsum_combine(outputs: jax.Array, ctx: EinsumCtx) -> jax.Array:
    G, S, E, C = ctx.combine.shape
    outputs = sharding.constrain(outputs.reshape(E, G, C, -1), GROUPED)  # [E, G*C, D] -> [E, G, C, D]
    return jnp.einsum("egcd,gsec->gsd", outputs, ctx.combine.astype(outputs.dtype))  # [G, S, D]


# ----------------------------------------------------------------------------- index
class IndexCtx(NamedTuple):
    maps: SlotMaps
    group_size: int  # S


def _to_expert_major(buffers: jax.Array, E: int) -> jax.Array:
    """[G, E*C, D] -> [E, G*C, D]: the move expert parallelism turns into an all-to-all."""
    G, EC, D = buffers.shape
    buffers = sharding.constrain(buffers, ("batch", None, "embed"))  # filled where its groups are
    return jnp.transpose(buffers.reshape(G, E, EC // E, D), (1, 0, 2, 3)).reshape(E, G * (EC // E), D)


def _to_group_major(outputs: jax.Array, G: int) -> jax.Array:
    """[E, G*C, D] -> [G, E*C, D], the inverse move."""
    E, GC, D = outputs.shape
    buffers = jnp.transpose(outputs.reshape(E, G, GC // G, D), (1, 0, 2, 3)).reshape(G, E * (GC // G), D)
    return sharding.constrain(buffers, ("batch", None, "embed"))  # read where its groups are


def index_dispatch(x: jax.Array, decision) -> tuple[jax.Array, IndexCtx]:
    G, S, D = x.shape
    maps = decision.slots(buffer_capacity(decision, S))
    if maps.token_slot is not None:
        # Per group: [S, D] -> [E*C, D]; the VJP gathers back through token_slot.
        buffers = jax.vmap(gather_rows)(x, maps.slot_token, maps.token_slot)  # [G, E*C, D]
    else:  # expert choice: every slot is filled
        buffers = jnp.take_along_axis(x, maps.slot_token[..., None], axis=1)  # [G, E*C, D]
    return _to_expert_major(buffers, decision.num_experts), IndexCtx(maps, S)


def index_combine(outputs: jax.Array, ctx: IndexCtx) -> jax.Array:
    maps = ctx.maps
    G = maps.slot_token.shape[0]
    buffers = _to_group_major(outputs, G)  # [G, E*C, D]
    D = buffers.shape[-1]
    if maps.token_slot is None:  # expert choice: a token sits in 0..E slots, so scatter-add.
        weighted = buffers * maps.weight[..., None].astype(buffers.dtype)  # [G, E*C, D]
        return jax.vmap(lambda w, t: jnp.zeros((ctx.group_size, D), w.dtype).at[t].add(w))(
            weighted, maps.slot_token)
    _, S, K = maps.token_slot.shape
    slots = jnp.moveaxis(maps.token_slot, -1, 1).reshape(G, K * S)  # choice-major, as slot_choice
    picked = jax.vmap(gather_rows)(buffers, slots, maps.slot_choice[..., None])  # [G, K*S, D]
    # [G, K, S, D] (not [G, S, K, D]: see DroplessCtx), weighted sum over the K choices -> [G, S, D]
    return jnp.einsum("gksd,gsk->gsd", picked.reshape(G, K, S, D), maps.weight.astype(buffers.dtype))


# ----------------------------------------------------------------------------- dropless
class DroplessCtx(NamedTuple):
    """Choices are numbered choice-major, c = k * G*S + t, so that the combine reads [K, T, D]: a TPU
    tiles a K = 2 second-minor axis of [T, K, D] by (2, 128) instead of (8, 128), four times the tiles."""
    token_row: jax.Array  # int32 [K, G*S]: row of each choice in the grouped layout (R when dropped)
    row_choice: jax.Array  # int32 [R]: flat choice index c of each row (N for padding rows)
    weight: jax.Array  # float32 [K, G*S]
    shape: tuple[int, int]


def dropless_dispatch(x: jax.Array, decision, lay: grouped.Layout | None = None
                      ) -> tuple[tuple[jax.Array, jax.Array], DroplessCtx]:
    """Returns ((rows [R, D] grouped by expert, group_sizes int32 [E]), ctx): the kept assignments
    sorted by expert, each expert's rows from a multiple of lay.align (its zero padding rows counted
    in group_sizes), R = lay.rows (default: N = G*S*K, no alignment). Gathers and sorts only."""
    if not decision.dropless_ok:
        raise ValueError(f"dispatch='dropless' needs a token-choice routing decision, "
                         f"got {type(decision).__name__}")
    G, S, D = x.shape
    E, K = decision.num_experts, decision.position.shape[-1]
    n = G * S * K
    align, R = (1, n) if lay is None else (lay.align, lay.rows)
    # Kept assignments sorted by expert (stable); dropped ones go to a last bucket E, after all rows.
    expert = jnp.where(decision.position >= 0, decision.expert_index, E)  # [G, S, K]
    expert = jnp.moveaxis(expert, -1, 0).reshape(n)  # [K, G, S] -> [N], choice-major
    choice_id = jnp.arange(n, dtype=jnp.int32)
    sorted_expert, sorted_choice = jax.lax.sort((expert, choice_id), num_keys=1, is_stable=True)  # [N]
    counts = jnp.bincount(expert, length=E + 1)[:E].astype(jnp.int32)  # [E]
    sizes = -(-counts // align) * align  # [E], padded to the alignment
    first_sorted, first_row = jnp.cumsum(counts) - counts, jnp.cumsum(sizes) - sizes  # [E] each
    e = jnp.minimum(sorted_expert, E - 1)  # [N]
    row_of_sorted = jnp.where(sorted_expert < E, first_row[e] + choice_id - first_sorted[e], R)  # [N]
    # choice -> row: sorting the rows by their choice inverts the permutation (no scatter)
    token_row = jax.lax.sort((sorted_choice, row_of_sorted), num_keys=1)[1].reshape(K, G * S)
    # row -> choice: each row's expert and its rank there; padding rows and rows past all get N
    row = jnp.arange(R, dtype=jnp.int32)
    row_expert = jnp.minimum(jnp.searchsorted(first_row + sizes, row, side="right"), E - 1)  # [R]
    rank = row - first_row[row_expert]
    real = rank < counts[row_expert]  # [R]
    row_choice = jnp.where(real, sorted_choice[jnp.minimum(first_sorted[row_expert] + rank, n - 1)], n)
    row_token = jnp.where(real, row_choice % (G * S), G * S)  # [R]
    rows = gather_rows(x.reshape(G * S, D), row_token, token_row.T)  # [R, D]
    weight = jnp.moveaxis(decision.weight, -1, 0).reshape(K, G * S)  # [G, S, K] -> [K, G*S]
    ctx = DroplessCtx(token_row, row_choice, weight, (G, S))
    return (rows, sizes), ctx


def dropless_combine(outputs: jax.Array, ctx: DroplessCtx) -> jax.Array:
    G, S = ctx.shape
    K = ctx.token_row.shape[0]
    D = outputs.shape[-1]
    picked = gather_rows(outputs, ctx.token_row.reshape(-1), ctx.row_choice[:, None])  # [K*G*S, D]
    y = jnp.einsum("ktd,kt->td", picked.reshape(K, G * S, D), ctx.weight.astype(outputs.dtype))
    return y.reshape(G, S, D)


def dropless_apply(x: jax.Array, decision, ffn, backend: str) -> jax.Array:
    """x [G, S, D] -> [G, S, D]: the assignments sorted by expert, ffn(rows, group_sizes, layout)
    run on them (the grouped matmul of `backend`), the outputs combined with their weights."""
    G, S, K = decision.position.shape
    lay = grouped.plan(backend, G * S * K, decision.num_experts)
    (rows, group_sizes), ctx = dropless_dispatch(x, decision, lay)  # [R, D]
    return dropless_combine(ffn(rows, group_sizes, lay), ctx)


_IMPLS: dict[str, tuple[Any, Any]] = {
    "einsum": (einsum_dispatch, einsum_combine),
    "index": (index_dispatch, index_combine),
    "dropless": (dropless_dispatch, dropless_combine),
}


def get(strategy: str):
    """(dispatch, combine) functions of a strategy name."""
    if strategy not in _IMPLS:
        raise ValueError(f"dispatch must be one of {STRATEGIES}, got {strategy!r}")
    return _IMPLS[strategy]
