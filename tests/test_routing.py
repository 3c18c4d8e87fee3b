"""Routing invariants, checked on random inputs (hypothesis) against a walk of the fill order."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_jax import routing
from tests import reference


@st.composite
def routing_problems(draw):
    G = draw(st.integers(1, 2))
    S = draw(st.sampled_from([4, 8]))
    E = draw(st.sampled_from([2, 4]))
    k = draw(st.integers(1, E))
    capacity = draw(st.one_of(st.none(), st.integers(1, S)))
    order = draw(st.sampled_from(["rank_major", "token_major"]))
    bpr = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    logits = np.random.default_rng(seed).normal(size=(G, S, E)).astype(np.float32) * 2
    return logits, k, capacity, order, bpr


SETTINGS = settings(max_examples=30, deadline=None)


@SETTINGS
@given(routing_problems())
def test_token_choice_invariants(problem):
    logits, k, capacity, order, bpr = problem
    G, S, E = logits.shape
    d = routing.tokens_choose(jnp.asarray(logits), k=k, capacity=capacity, batch_prioritized=bpr, order=order)
    expert, pos, weight = np.asarray(d.expert_index), np.asarray(d.position), np.asarray(d.weight)
    probs = np.asarray(d.probs)
    # Choices are the k most probable experts, in descending order.
    chosen_p = np.take_along_axis(probs, expert, -1)
    assert (np.diff(chosen_p, axis=-1) <= 0).all()
    assert np.allclose(chosen_p[..., -1:], np.sort(probs, -1)[..., E - k : E - k + 1])
    # Slots: below capacity, used at most once per expert and group; weight is 0 iff dropped.
    kept = pos >= 0
    if capacity is not None:
        assert (pos < capacity).all()
    else:
        assert kept.all()  # dropless drops nothing
    for g in range(G):
        pairs = [(expert[g, s, j], pos[g, s, j]) for s in range(S) for j in range(k) if kept[g, s, j]]
        assert len(pairs) == len(set(pairs))
    assert ((weight == 0) == ~kept).all()
    np.testing.assert_allclose(weight[kept], chosen_p[kept], rtol=1e-6)
    # The exact slots equal a walk of the fill order, one assignment at a time.
    for g in range(G):
        rank = reference.bpr_rank(probs[g].max(-1)) if bpr else None
        np.testing.assert_array_equal(pos[g], reference.fill_slots(expert[g], capacity, E, order=order,
                                                                   token_rank=rank))


@SETTINGS
@given(routing_problems())
def test_earlier_ranks_outrank_later_ones(problem):
    """Rank-major: an expert's kept assignments are a prefix of its fill order, so a kept j-th
    choice means every (j-1)-th choice for that expert was kept, in a lower slot."""
    logits, k, capacity, _, bpr = problem
    d = routing.tokens_choose(jnp.asarray(logits), k=k, capacity=capacity, batch_prioritized=bpr)
    expert, pos = np.asarray(d.expert_index), np.asarray(d.position)
    G, S, E = logits.shape
    for g in range(G):
        for e in range(E):
            for j in range(1, k):
                later = pos[g][(expert[g, :, j] == e), j]
                earlier = pos[g][(expert[g, :, j - 1] == e), j - 1]
                if (later >= 0).any():
                    assert (earlier >= 0).all() and earlier.max(initial=-1) < later[later >= 0].min()


@SETTINGS
@given(routing_problems())
def test_batch_prioritized_keeps_the_most_confident_tokens(problem):
    logits, _, capacity, _, _ = problem
    d = routing.tokens_choose(jnp.asarray(logits), k=1, capacity=capacity, batch_prioritized=True)
    expert, pos, probs = (np.asarray(d.expert_index[..., 0]), np.asarray(d.position[..., 0]),
                          np.asarray(d.probs))
    top1 = probs.max(-1)
    for g in range(logits.shape[0]):
        for e in np.unique(expert[g]):
            mine = expert[g] == e
            kept, dropped = top1[g][mine & (pos[g] >= 0)], top1[g][mine & (pos[g] < 0)]
            if len(kept) and len(dropped):
                assert kept.min() >= dropped.max()
            # Slots are handed out by descending confidence.
            order = np.argsort(pos[g][mine & (pos[g] >= 0)])
            assert (np.diff(kept[order]) <= 0).all()


@SETTINGS
@given(routing_problems())
def test_expert_choice_takes_each_experts_top_tokens(problem):
    logits, _, capacity, _, _ = problem
    capacity = capacity or logits.shape[1]
    d = routing.experts_choose(jnp.asarray(logits), capacity=capacity)
    token, weight, probs = np.asarray(d.token_index), np.asarray(d.weight), np.asarray(d.probs)
    G, S, E = logits.shape
    for g in range(G):
        for e in range(E):
            assert len(set(token[g, e])) == capacity
            np.testing.assert_allclose(weight[g, e], probs[g, token[g, e], e], rtol=1e-6)
            np.testing.assert_allclose(np.sort(weight[g, e]), np.sort(probs[g, :, e])[S - capacity :],
                                       rtol=1e-6)


@st.composite
def token_choice_options(draw):
    logits, k, capacity, order, bpr = draw(routing_problems())
    E = logits.shape[-1]
    opts = dict(k=k, capacity=capacity, order=order, batch_prioritized=bpr, renormalize=draw(st.booleans()),
                weight_scale=draw(st.sampled_from([1.0, 2.5])))
    if draw(st.booleans()):
        opts["choice_bias"] = (np.random.default_rng(draw(st.integers(0, 99))).normal(size=E)
                               .astype(np.float32) * 0.3)
    if k == 2 and draw(st.booleans()):
        opts["second_choice"] = "random"
    return logits, opts


@settings(max_examples=20, deadline=None)  # each example compiles anew
@given(token_choice_options())
def test_tokens_choose_equals_the_loop_reference_for_every_option(problem):
    """The one fused top-k (routing.tokens_choose), the path every top_k router takes, equals a walk
    of the definition: choice bias, GShard's random second choice, BPR, fill order, renormalization,
    weight scale, and the balancing and z losses."""
    logits, opts = problem
    rng = jax.random.PRNGKey(7) if opts.get("second_choice") == "random" else None
    d = routing.tokens_choose(jnp.asarray(logits), rng=rng, **opts)
    uniform = None if rng is None else np.asarray(jax.random.uniform(rng, logits.shape[:2]))
    ref_opts = {k: v for k, v in opts.items() if k not in ("k", "capacity", "second_choice")}
    index, position, weight = reference.tokens_choose_loops(logits, opts["k"], opts["capacity"],
                                                            second_uniform=uniform, **ref_opts)
    np.testing.assert_array_equal(d.expert_index, index)
    np.testing.assert_array_equal(d.position, position)
    np.testing.assert_allclose(d.weight, weight, rtol=1e-5, atol=1e-7)
    G, S, E = logits.shape
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    f = np.stack([[np.sum(index[g] == e) / S for e in range(E)] for g in range(G)])  # [G, E]
    np.testing.assert_allclose(d.balance_loss, np.mean(E * np.sum(f * probs.mean(1), -1)), rtol=1e-5)
    lse = np.log(np.sum(np.exp(logits.astype(np.float64)), -1))
    np.testing.assert_allclose(d.z_loss, np.mean(lse ** 2), rtol=1e-5)


def test_renormalize_makes_the_k_weights_sum_to_one():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 4))
    d = routing.tokens_choose(logits, k=2, capacity=None, renormalize=True)
    np.testing.assert_allclose(jnp.sum(d.weight, -1), 1.0, rtol=1e-6)
    plain = routing.tokens_choose(logits, k=2, capacity=None)
    assert (jnp.sum(plain.weight, -1) < 1).all()  # Switch / V-MoE: p1 + p2 < 1


def test_gshard_random_second_choice():
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 64, 4))
    d = routing.tokens_choose(logits, k=2, capacity=None, second_choice="random", rng=jax.random.PRNGKey(1))
    p = jnp.take_along_axis(d.probs, d.expert_index, -1)
    keep_prob = jnp.minimum(1.0, 2 * p[..., 1] / (p[..., 0] + p[..., 1]))
    second_kept = d.position[..., 1] >= 0
    assert (d.position[..., 0] >= 0).all()  # first choices are never skipped
    assert 0 < float(second_kept.mean()) < 1
    # The fraction kept matches the expected keep probability.
    assert abs(float(second_kept.mean()) - float(keep_prob.mean())) < 0.08
    # A skipped second choice takes no slot: the other assignments of that expert fill densely.
    for g in range(4):
        for e in range(4):
            slots = np.sort(np.asarray(d.position[g])[np.asarray(d.expert_index[g]) == e])
            slots = slots[slots >= 0]
            np.testing.assert_array_equal(slots, np.arange(len(slots)))


def test_choice_bias_changes_choices_not_weights():
    logits = jnp.log(jnp.array([[[0.5, 0.3, 0.2]]]))
    bias = jnp.array([0.0, 0.0, 0.5])
    d = routing.tokens_choose(logits, k=1, capacity=None, choice_bias=bias)
    assert int(d.expert_index[0, 0, 0]) == 2
    np.testing.assert_allclose(d.weight[0, 0, 0], 0.2, rtol=1e-6)  # the unbiased probability


def test_capacity_formulas():
    cc = routing.compute_capacity
    assert cc(1024, 8, 2, 1.25) == 320  # GShard / V-MoE: ceil(1.25 * 2 * 1024 / 8)
    assert cc(1024, 8, 2, 1.25, formula="tokens", rounding="round") == 160  # Flaxformer: k not a factor
    assert cc(100, 8, 1, 1.0, formula="tokens", rounding="round") == 12  # round(12.5) = 12, half to even
    assert cc(100, 8, 1, 1.0, rounding="ceil") == 13
    assert cc(100, 8, 1, 1.0, rounding="floor") == 12
    assert cc(16, 64, 1, 1.0, min_capacity=4) == 4  # Flaxformer's minimum
    assert cc(100, 8, 1, 1.0, multiple_of=8) == 16
    assert cc(8, 2, 2, 4.0) == 8  # never above the group size
    assert cc(64, 8, 2, 0.0) is None and cc(64, 8, 2, -1.0) is None  # dropless
