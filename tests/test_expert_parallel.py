"""The index maps of expert-parallel dropless (moe_jax/expert_parallel.py) on one device: received
slots <-> expert-grouped rows and sorted rows <-> padded send blocks are inverse bijections that
keep each expert's rows together, in source order. The layer's equality with the unsharded one (8
devices, forward and gradients) is in tests/sharding; its TPU compile in test_cost_model.py."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_jax import expert_parallel, grouped


@st.composite
def receipts(draw):
    """(recv_counts [n, E'], N): rows each of n sources sends per local expert, N per source at most."""
    n, El, N = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 12))
    counts = np.zeros((n, El), np.int32)
    for i in range(n):
        total = draw(st.integers(0, N))
        cuts = sorted(draw(st.lists(st.integers(0, total), min_size=El - 1, max_size=El - 1)))
        counts[i] = np.diff([0, *cuts, total])
    return counts, N


@settings(max_examples=40, deadline=None)
@given(receipts(), st.sampled_from(["blocks", "ragged_dot"]), st.booleans())
def test_regroup_is_a_bijection_grouping_rows_by_expert(case, backend, compact):
    """Blocks of N slots per source (the padded exchange) or back to back (the ragged one)."""
    counts, N = case
    n, El = counts.shape
    per_source = counts.sum(1)
    starts = np.cumsum(per_source) - per_source if compact else np.arange(n) * N
    slots = int(per_source.sum()) if compact else n * N
    lay = grouped.plan(backend, max(slots, 1), El)
    row_src, src_row, sizes = map(np.asarray, expert_parallel._regroup(counts, starts.astype(np.int32),
                                                                       slots, lay))
    assert (sizes >= counts.sum(0)).all() and (sizes % lay.align == 0).all() and sizes.sum() <= lay.rows
    real_slots = [starts[i] + r for i in range(n) for r in range(per_source[i])]
    assert sorted(src_row[real_slots]) == sorted(set(src_row[real_slots]))  # one row per slot
    assert (src_row[[s for s in range(slots) if s not in real_slots]] == lay.rows).all()
    np.testing.assert_array_equal(row_src[src_row[real_slots]], real_slots)
    assert (row_src >= slots).sum() == lay.rows - len(real_slots)  # every other row is padding
    # expert e's rows: from source 0, then 1, ..., in each source's order
    first = np.cumsum(sizes) - sizes
    for e in range(El):
        expected = [starts[i] + counts[i, :e].sum() + r for i in range(n) for r in range(counts[i, e])]
        np.testing.assert_array_equal(row_src[first[e]:first[e] + len(expected)], expected)


def test_receive_buffer_rows():
    assert expert_parallel.receive_rows(100, 4, 0.0) == 400  # all rows of all devices
    assert expert_parallel.receive_rows(100, 4, 1.25) == 128  # 125, to a multiple of 8
    assert expert_parallel.receive_rows(100, 4, 8.0) == 400  # never more than all of them


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, 4), min_size=n,
                                                                           max_size=n))))
def test_padded_send_blocks_invert_the_sorted_rows(case):
    n, sizes = case
    N = max(sum(sizes), 1) + 2  # two rows that go nowhere (dropped assignments)
    sizes = np.asarray(sizes, np.int32)
    starts = np.cumsum(sizes) - sizes
    slot_row, row_slot = map(np.asarray, expert_parallel._padded_maps(sizes, starts, N, n))
    for j in range(n):
        np.testing.assert_array_equal(slot_row[j * N:j * N + sizes[j]], starts[j] + np.arange(sizes[j]))
        assert (slot_row[j * N + sizes[j]:(j + 1) * N] == N).all()
    sent = np.arange(sizes.sum())
    np.testing.assert_array_equal(slot_row[row_slot[sent]], sent)
    assert (row_slot[sizes.sum():] == n * N).all()
