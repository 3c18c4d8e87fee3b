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
@given(receipts(), st.sampled_from(["blocks", "ragged_dot"]))
def test_regroup_is_a_bijection_grouping_rows_by_expert(case, backend):
    counts, N = case
    n, El = counts.shape
    lay = grouped.plan(backend, n * N, El)
    row_src, src_row, sizes = map(np.asarray, expert_parallel._regroup(counts, N, lay))
    assert (sizes >= counts.sum(0)).all() and (sizes % lay.align == 0).all() and sizes.sum() <= lay.rows
    real_slots = [i * N + r for i in range(n) for r in range(counts[i].sum())]
    assert sorted(src_row[real_slots]) == sorted(set(src_row[real_slots]))  # one row per slot
    assert (src_row[[s for s in range(n * N) if s not in real_slots]] == lay.rows).all()
    np.testing.assert_array_equal(row_src[src_row[real_slots]], real_slots)
    assert (row_src >= n * N).sum() == lay.rows - len(real_slots)  # every other row is padding
    # expert e's rows: from source 0, then 1, ..., in each source's order
    first = np.cumsum(sizes) - sizes
    for e in range(El):
        expected = [i * N + counts[i, :e].sum() + r for i in range(n) for r in range(counts[i, e])]
        np.testing.assert_array_equal(row_src[first[e]:first[e] + len(expected)], expected)


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
