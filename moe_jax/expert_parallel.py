"""Expert-parallel dropless dispatch: GShard's expert parallelism (Lepikhin et al. 2020) without a
capacity, each shard running MegaBlocks' grouped matmul (Gale et al. 2022) on the rows it receives.

Under a mesh whose 'expert' rule names one mesh axis of n > 1 devices, each device holds E / n
experts and a 1 / n share of the routing groups. Inside `jax.shard_map` every device
1. sorts its own assignments by expert (dispatch.dropless_dispatch): rows [N, D];
2. sends device j the rows of j's experts (contiguous, as the experts of a device are), into a
   receive buffer of M rows: n * N by default, the most one device can get, so nothing is dropped;
   moe.ep_buffer_factor makes M smaller, each device then taking the first M rows in source order
   and dropping the rest. 'ragged' exchange (`jax.lax.ragged_all_to_all`, TPU and GPU) moves only
   the rows taken, sources back to back; 'padded' (XLA:CPU, which has no ragged all-to-all) an
   `all_to_all` of [n, N, D] zero-padded blocks, ignoring the rows not taken;
3. regroups the received rows by local expert (a gather; its gradient is the inverse gather) for
   moe_jax.grouped.matmul, and runs the experts;
4. undoes 3 and 2 and combines its own tokens' outputs with their weights.
Under a mesh that does not split the experts (data parallelism, experts replicated) each device
runs all E experts on its own groups: the same shard_map without the exchange (a Pallas kernel
cannot be partitioned by GSPMD, and a sort of every device's rows together would gather them).
Expert weights stay in their shards: E over 'expert' and, where the rules split F ('mlp') over a
mesh axis, F too, the output projection then summed over that axis (Megatron-style, Shoeybi et al.
2019). The grouped matmul sees all M rows: megablox visits only the tiles of real rows, but its
declared cost (the TPU cost model's figure) counts every one.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from moe_jax import dispatch, grouped, sharding

class _Choices(NamedTuple):
    """The token-choice fields dropless_dispatch reads, for one shard's groups."""
    expert_index: jax.Array  # int32 [G, S, K]
    position: jax.Array  # int32 [G, S, K], -1 when dropped
    weight: jax.Array  # float32 [G, S, K]
    num_experts: int
    dropless_ok: bool = True


def exchange_for(platform: str) -> str:
    """'ragged' (ragged_all_to_all) or 'padded' (all_to_all of zero-padded blocks) for a platform."""
    return "padded" if platform == "cpu" else "ragged"


def applies(experts: nnx.Module) -> bool:
    """Whether a dropless layer runs here: under a mesh, with its experts split, or replicated and
    without expert dropout (whose random masks GSPMD places; `dropless` refuses it with experts split)."""
    return sharding.active_mesh() is not None and (sharding.expert_axis() is not None
                                                   or experts.dropout.rate == 0)


def dropless(groups: jax.Array, decision, experts: nnx.Module, backend: str, buffer_factor: float = 0.0
             ) -> tuple[jax.Array, jax.Array]:
    """groups [G, S, D] -> ([G, S, D], the fraction of kept assignments the receive buffers
    dropped []) through `experts` (a FeedForward of E experts), the experts and groups sharded as
    the active mesh says; backend: moe.grouped_matmul; buffer_factor: moe.ep_buffer_factor."""
    mesh, rules = sharding.active_mesh()
    axis = sharding.one_axis("expert", mesh, rules)
    n, E = (mesh.shape[axis] if axis else 1), decision.num_experts
    if E % n:
        raise sharding.ShardingError(f"moe.num_experts={E} is not divisible by the {n} devices of mesh "
                                     f"axis {axis!r}: choose a multiple of {n}")
    if axis and experts.dropout.rate > 0:
        raise ValueError("moe.expert_dropout > 0 is not supported with expert-parallel dropless dispatch: "
                         "set it to 0 or use a mesh without an expert axis")
    graphdef, params, rest = nnx.split(experts, nnx.Param, ...)
    token_spec = sharding.mesh_spec(("batch", None, "embed"), groups.shape, mesh, rules)
    choice_spec = PartitionSpec(token_spec[0], None, None)
    width_axis = _width_axis(mesh, rules, axis, experts.wo.shape[1])

    def spec_of(v):  # [E, ...]: experts over `axis`, F ('mlp') over width_axis, the rest whole
        # (the names of a scanned stack's variable also name its 'layers' axis, not in the value here)
        names = v.get_metadata().get("out_sharding")[-v.ndim:]
        return PartitionSpec(*({"expert": axis, "mlp": width_axis}.get(name) for name in names))
    param_spec = jax.tree.map(spec_of, params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    exchange = exchange_for(sharding.target_platform())
    token_axes = token_spec[0] if isinstance(token_spec[0], tuple) else (token_spec[0],)
    split = axis in token_axes

    def shard(x, expert_index, position, weight, local_params):  # x [G/m, S, D]
        merged = nnx.merge(graphdef, local_params, rest)
        # with F split over width_axis, each device's output projection is a partial sum
        reduce = None if width_axis is None else functools.partial(jax.lax.psum, axis_name=width_axis)

        def ffn(rows, group_sizes, lay):
            return merged(rows, group_sizes, lay, reduce)
        choices = _Choices(expert_index, position, weight, E)
        if axis is None:
            return dispatch.dropless_apply(x, choices, ffn, backend), jnp.zeros((), jnp.float32)
        if not split:
            return _local_experts(x, choices, ffn, axis, n, backend), jnp.zeros((), jnp.float32)
        y, dropped = _shard_layer(x, choices, ffn, axis, n, backend, exchange, buffer_factor)
        kept = jnp.sum(position >= 0)
        return y, (jax.lax.psum(dropped, token_axes) / jnp.maximum(jax.lax.psum(kept, token_axes), 1))

    # check_vma=False: the megablox kernel declares no per-axis variance for its outputs
    specs = (token_spec, choice_spec, choice_spec, choice_spec, param_spec)
    return jax.shard_map(shard, mesh=mesh, in_specs=specs, out_specs=(token_spec, PartitionSpec()),
                         check_vma=False)(
        groups, decision.expert_index, decision.position, decision.weight, params)


def _width_axis(mesh, rules, expert_axis: str, d_ff: int) -> str | None:
    """The mesh axis the experts' F ('mlp') splits over, if any (as sharding.mesh_spec splits it)."""
    axis = sharding.one_axis("mlp", mesh, rules)
    return None if axis is None or axis == expert_axis or d_ff % mesh.shape[axis] else axis


def _shard_layer(x, choices: _Choices, ffn, axis: str, n: int, backend: str, exchange: str,
                 buffer_factor: float):
    """One device's part: x [G, S, D] (its groups) -> ([G, S, D], assignments it dropped [])."""
    (rows, counts), ctx = dispatch.dropless_dispatch(x, choices)  # rows [N, D] by global expert
    N = rows.shape[0]
    M = receive_rows(N, n, buffer_factor)
    per_device = counts.reshape(n, -1)  # [n, E/n]: my rows for each device's experts
    send_sizes = jnp.sum(per_device, axis=1)  # [n]
    starts = jnp.cumsum(send_sizes) - send_sizes  # [n]: where my rows for device j begin
    # [n, E/n]: the rows each source offers me, per local expert; I take the first M in source order
    offered = jax.lax.all_to_all(per_device, axis, 0, 0, tiled=True)
    offered_sizes = jnp.sum(offered, axis=1)  # [n]
    before = jnp.cumsum(offered_sizes) - offered_sizes  # [n]
    accepted = jnp.clip(M - before, 0, offered_sizes)  # [n]
    in_block = jnp.cumsum(offered, axis=1) - offered  # [n, E/n]
    recv_counts = jnp.clip(accepted[:, None] - in_block, 0, offered)  # [n, E/n]
    dropped = jnp.sum(offered) - jnp.sum(accepted)
    if exchange == "ragged":  # source i's rows at [min(before_i, M), ...) of a [M, D] buffer
        block_start, slots = jnp.minimum(before, M), M
        taken = jax.lax.all_to_all(accepted, axis, 0, 0, tiled=True)  # [n]: what device j takes of mine
        received = jax.lax.ragged_all_to_all(  # [N, D] -> [M, D]
            rows, jnp.zeros((M, rows.shape[1]), rows.dtype), starts, taken,
            jax.lax.all_to_all(block_start, axis, 0, 0, tiled=True), accepted, axis_name=axis)
    else:  # every row, in [n, N, D] blocks; those past M are ignored
        block_start, slots = jnp.arange(n, dtype=jnp.int32) * N, n * N
        slot_row, row_slot = _padded_maps(send_sizes, starts, N, n)
        blocks = dispatch.gather_rows(rows, slot_row, row_slot[:, None]).reshape(n, N, -1)  # [n, N, D]
        received = jax.lax.all_to_all(blocks, axis, 0, 0, tiled=True).reshape(n * N, -1)  # [n * N, D]
    lay = grouped.plan(backend, M, recv_counts.shape[1])
    row_src, src_row, group_sizes = _regroup(recv_counts, block_start, slots, lay)
    xs = dispatch.gather_rows(received, row_src, src_row[:, None])  # [slots, D] -> [R, D]
    ys = ffn(xs, group_sizes, lay)  # [R, D]
    back = dispatch.gather_rows(ys, src_row, row_src[:, None])  # [R, D] -> [slots, D]
    if exchange == "ragged":
        outputs = jax.lax.ragged_all_to_all(  # [M, D] -> [N, D]; rows not taken stay 0
            back, jnp.zeros_like(rows), block_start, accepted,
            jax.lax.all_to_all(starts, axis, 0, 0, tiled=True), taken, axis_name=axis)
    else:
        returned = jax.lax.all_to_all(back.reshape(n, N, -1), axis, 0, 0, tiled=True)  # [n, N, D]
        outputs = dispatch.gather_rows(returned.reshape(n * N, -1), row_slot, slot_row[:, None])  # [N, D]
    return dispatch.dropless_combine(outputs, ctx), dropped


def receive_rows(N: int, n: int, buffer_factor: float) -> int:
    """Rows of one device's receive buffer: n * N (all rows of all n devices: nothing dropped), or
    buffer_factor x its own N, a multiple of 8, when that is less."""
    if buffer_factor <= 0:
        return n * N
    return min(n * N, -(-math.ceil(buffer_factor * N) // 8) * 8)


def _local_experts(x, choices: _Choices, ffn, axis: str, n: int, backend: str):
    """Every device holds the same tokens (too few groups to split, as in decoding): each runs its
    own experts on the assignments to them, and a sum over the expert axis combines the outputs."""
    El = choices.num_experts // n
    first = jax.lax.axis_index(axis) * El
    mine = (choices.expert_index >= first) & (choices.expert_index < first + El)  # [G, S, K]
    local = _Choices(jnp.where(mine, choices.expert_index - first, 0), jnp.where(mine, choices.position, -1),
                     choices.weight, El)
    return jax.lax.psum(dispatch.dropless_apply(x, local, ffn, backend), axis)  # [G, S, D]


def _padded_maps(send_sizes, starts, N: int, n: int):
    """Slot s = j * N + r of the [n, N] send blocks <-> my sorted row starts[j] + r: (slot_row [n*N]
    with N for empty slots, row_slot [N] with n * N for rows sent nowhere)."""
    slot = jnp.arange(n * N)
    j, r = slot // N, slot % N
    slot_row = jnp.where(r < send_sizes[j], starts[j] + r, N)  # [n * N]
    row = jnp.arange(N)
    dest = jnp.searchsorted(jnp.cumsum(send_sizes), row, side="right")  # [N], n past the sent rows
    d = jnp.minimum(dest, n - 1)
    row_slot = jnp.where(dest < n, d * N + row - starts[d], n * N)  # [N]
    return slot_row, row_slot


def _regroup(recv_counts, block_start, slots: int, lay: grouped.Layout):
    """Received slot p (source i's block from block_start[i]) <-> row of the expert-grouped layout.

    recv_counts int32 [n, E']: rows taken from source i for local expert e, in source-major, then
    expert order; slots: the receive buffer's length. Returns (row_src [R], `slots` for padding
    rows; src_row [slots], R for empty slots; group_sizes [E'], padded to lay.align)."""
    n, El = recv_counts.shape
    R = lay.rows
    totals = jnp.sum(recv_counts, axis=0)  # [E']
    sizes = -(-totals // lay.align) * lay.align  # [E']
    first_row = jnp.cumsum(sizes) - sizes  # [E']
    in_block = jnp.cumsum(recv_counts, axis=1) - recv_counts  # [n, E']: e's start in source i's block
    before = jnp.cumsum(recv_counts, axis=0)  # [n, E']: e's rows from sources <= i
    earlier = before - recv_counts  # [n, E']: from sources < i
    # slot -> row
    slot = jnp.arange(slots)
    i = jnp.maximum(jnp.searchsorted(block_start, slot, side="right") - 1, 0)  # [slots]
    r = slot - block_start[i]
    e = jnp.minimum(jnp.sum(r[:, None] >= (in_block + recv_counts)[i], axis=1), El - 1)  # [slots]
    real = r < jnp.sum(recv_counts, axis=1)[i]
    src_row = jnp.where(real, first_row[e] + earlier[i, e] + r - in_block[i, e], R)
    # row -> slot
    row = jnp.arange(R)
    e_q = jnp.minimum(jnp.searchsorted(first_row + sizes, row, side="right"), El - 1)  # [R]
    rank = row - first_row[e_q]
    i_q = jnp.minimum(jnp.sum(rank[:, None] >= before.T[e_q], axis=1), n - 1)  # [R]
    slot_q = block_start[i_q] + in_block[i_q, e_q] + rank - earlier[i_q, e_q]
    return jnp.where(rank < totals[e_q], slot_q, slots), src_row, sizes
