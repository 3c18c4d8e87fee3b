"""The grouped matmul's backends against a row-by-row loop, and the dropless layout's invariants
(moe_jax/grouped.py, dispatch.dropless_dispatch); the layer-level equality with the reference is in
test_layer_reference.py."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from flax import nnx
from hypothesis import strategies as st

from moe_jax import MoEConfig, MoELayer, dispatch, grouped, sharding
from moe_jax.routing import token_choice

K_IN, N_OUT, E = 16, 24, 4


MAX_ROWS = 4 * 12  # the most rows the examples below group


def loop_reference(x, w, sizes, probe):
    """Row by row in NumPy: y[r] = x[r] @ w[e(r)] inside the groups, zero after; and the gradients
    of sum(y * probe): dx[r] = probe[r] @ w[e(r)]^T, dw[e] = sum over e's rows of x[r]^T probe[r]."""
    x, w, probe = (np.asarray(a, np.float64) for a in (x, w, probe))
    y, dx, dw = np.zeros((x.shape[0], w.shape[-1])), np.zeros_like(x), np.zeros_like(w)
    ends = np.cumsum(sizes)
    for r in range(int(ends[-1])):
        e = int(np.searchsorted(ends, r, side="right"))
        y[r], dx[r] = x[r] @ w[e], probe[r] @ w[e].T
        dw[e] += np.outer(x[r], probe[r])
    return y, dx, dw


@functools.lru_cache(maxsize=None)
def grouped_value_and_grad(lay):
    def loss(x, w, gs, probe):
        y = grouped.matmul(x, w, gs, lay)
        return jnp.sum(y * probe), y
    return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))


# (backend, K, N): megablox at 16 x 24 pads both to 256 (no 128-multiple tile divides them, as
# gpt-oss's 2880), at 128 x 256 it tiles them as they are.
SHAPES = [(b, K_IN, N_OUT) for b in grouped.BACKENDS] + [("megablox", 128, 256)]


@pytest.mark.parametrize("backend,K_IN,N_OUT", SHAPES)
@settings(max_examples=5, deadline=None)
@given(counts=st.lists(st.integers(0, 12), min_size=E, max_size=E).filter(sum))
def test_matmul_equals_loop_forward_and_gradients(backend, K_IN, N_OUT, counts):
    lay = grouped.plan(backend, MAX_ROWS, E)  # one layout (one compile) for every example
    sizes = np.asarray(counts)
    if lay.align > 1:  # 'blocks' groups are padded to whole blocks, as the dispatch lays them out
        sizes = -(-sizes // lay.align) * lay.align
    assert sizes.sum() <= lay.rows
    x = jax.random.normal(jax.random.key(0), (lay.rows, K_IN))
    w = jax.random.normal(jax.random.key(1), (E, K_IN, N_OUT))
    probe = jax.random.normal(jax.random.key(2), (lay.rows, N_OUT))
    (_, y), (dx, dw) = grouped_value_and_grad(lay)(x, w, jnp.asarray(sizes, jnp.int32), probe)
    y_ref, dx_ref, dw_ref = loop_reference(x, w, sizes, probe)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-4)  # zero past the groups
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)


@functools.lru_cache(maxsize=None)
def jitted_dispatch(k, capacity, lay):
    return jax.jit(lambda logits, x: dispatch.dropless_dispatch(
        x, token_choice.tokens_choose(logits, k=k, capacity=capacity), lay))


@pytest.mark.parametrize("backend", grouped.BACKENDS)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 3), capacity=st.sampled_from([None, 1, 3]))
def test_dropless_layout_invariants(backend, seed, k, capacity):
    G, S, D = 2, 8, 4
    logits = jax.random.normal(jax.random.key(seed), (G, S, E))
    decision = token_choice.tokens_choose(logits, k=k, capacity=capacity)
    lay = grouped.plan(backend, G * S * k, E)
    x = jnp.arange(G * S * D, dtype=jnp.float32).reshape(G, S, D) + 1  # token t's rows hold t*D+1..
    (rows, sizes), ctx = jitted_dispatch(k, capacity, lay)(logits, x)
    rows, sizes, x = np.asarray(rows), np.asarray(sizes), np.asarray(x)
    assert rows.shape == (lay.rows, D)
    assert np.all(sizes % lay.align == 0) and sizes.sum() <= lay.rows
    kept = np.asarray(decision.position >= 0).reshape(G * S, k)
    token_row = np.asarray(ctx.token_row).T  # [K, G*S] (choice-major) -> [G*S, K]
    # every kept choice has its own row, in its expert's group, holding its token; dropped: none
    assert len(set(token_row[kept].tolist())) == int(kept.sum())
    assert bool(np.all(token_row[~kept] == lay.rows))
    starts = np.cumsum(sizes) - sizes
    experts = np.asarray(decision.expert_index).reshape(G * S, k)
    for t, c in zip(*np.nonzero(kept)):
        r, e = token_row[t, c], experts[t, c]
        assert starts[e] <= r < starts[e] + sizes[e]
        np.testing.assert_array_equal(rows[r], x.reshape(G * S, D)[t])
    # every other row is zero padding
    filled = np.zeros(lay.rows, bool)
    filled[token_row[kept]] = True
    assert np.all(rows[~filled] == 0)


def test_plan_bounds_the_padding():
    for n, e in ((65536, 8), (32768, 128), (64, 8)):
        lay = grouped.plan("blocks", n, e)
        assert lay.rows >= n + e * (lay.align - 1) and lay.rows % lay.align == 0
        assert lay.rows <= n + e * lay.align + lay.align and (n < 1024 or e * lay.align <= n // 4)
    tm, tk, tn = grouped.megablox_tiling(8192, 768, 3072)
    assert (tm, tk, tn) == (1024, 768, 768)
    assert grouped.megablox_tiling(100, 4096, 14336) == (128, 512, 512)


def test_auto_dispatch_is_dropless_without_capacity():
    """A capacity factor <= 0 never pads every expert to S slots: 'auto' takes the grouped path."""
    cfg = MoEConfig(num_experts=8, k=2, d_ff=16, train_capacity_factor=0.0, eval_capacity_factor=0.0)
    layer = MoELayer(cfg, 8, rngs=nnx.Rngs(0))
    assert layer.dispatch_for(layer.capacity(64)) == "dropless"
    with_capacity = MoELayer(MoEConfig(num_experts=8, k=2, d_ff=16), 8, rngs=nnx.Rngs(0))
    assert with_capacity.dispatch_for(with_capacity.capacity(64)) == "index"


@pytest.mark.parametrize("group_size,k,activation,expected", [
    (512, 1, "relu", "einsum"), (512, 2, "swiglu", "einsum"), (4096, 1, "relu", "index"),
    (4096, 1, "swiglu", "index")])
def test_auto_dispatch_on_tpu_follows_the_one_hot_work(group_size, k, activation, expected):
    """On TPU 'auto' takes einsum while its one-hot products add at most half the experts' FLOPs
    (2 E C / (k n F) <= 0.5: v5e cost model, einsum cheaper at S = 512, index at S = 4096)."""
    cfg = MoEConfig(num_experts=8, k=k, d_ff=3072, activation=activation,
                    train_capacity_factor=1.0 if k == 1 else 1.25,
                    group_size=group_size)
    layer = nnx.eval_shape(lambda: MoELayer(cfg, 768, rngs=nnx.Rngs(0)))
    with sharding.compiling_for("tpu"):
        assert layer.dispatch_for(layer.capacity(group_size)) == expected
    assert layer.dispatch_for(layer.capacity(group_size)) == "index"  # XLA:CPU


def test_grouped_matmul_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="moe.grouped_matmul='blocks' applies to dispatch 'dropless'"):
        MoEConfig(dispatch="index", grouped_matmul="blocks")
    with pytest.raises(ValueError, match="grouped_matmul"):
        MoEConfig(grouped_matmul="cutlass")
