"""Span corruption, lengths and T5X features (moe_jax.data.objectives), on random token arrays."""
import numpy as np
import pytest

from moe_jax.data import objectives as obj

DENSITY, MEAN = 0.15, 3.0
FIRST_SENTINEL = 1099  # vocab 1000 pieces + 100 extra ids: <extra_id_0> = 1099 ... <extra_id_99> = 1000


def t5_random_spans_helper(inputs_length, noise_density, mean_noise_span_length):
    """T5's random_spans_helper (t5.data.preprocessors), restated: (raw tokens, targets length)."""
    def lengths(tokens_length):
        num_noise = int(round(tokens_length * noise_density))
        num_spans = int(round(num_noise / mean_noise_span_length))
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, lengths(tokens_length)[1]


def reconstruct(inputs, targets, first_sentinel=FIRST_SENTINEL, num_sentinels=100):
    """The original tokens, from inputs and targets without eos: fill each input sentinel's span."""
    is_sentinel = lambda t: first_sentinel - num_sentinels < t <= first_sentinel
    spans, current = {}, None
    for t in targets:
        if is_sentinel(t):
            current = spans.setdefault(int(t), [])
        else:
            current.append(int(t))
    out = []
    for t in inputs:
        out += spans[int(t)] if is_sentinel(t) else [int(t)]
    return out


@pytest.mark.parametrize("length", [1, 2, 3, 7, 20, 100, 568, 1000])
def test_span_corruption_invariants(length):
    rng = np.random.default_rng(length)
    tokens = rng.integers(3, 1000, size=length).astype(np.int32)
    mask = obj.random_spans_noise_mask(length, DENSITY, MEAN, np.random.default_rng(0))
    num_noise, num_spans = obj.noise_counts(length, DENSITY, MEAN)
    assert mask.shape == (length,) and mask.dtype == bool
    if length >= 2:
        assert mask.sum() == num_noise == min(max(round(length * DENSITY), 1), length - 1)
        starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
        assert len(starts) == num_spans
        assert not mask[0]  # T5 starts with a non-noise span
    inputs, targets = obj.span_corrupt(tokens, mask, FIRST_SENTINEL)
    assert reconstruct(inputs, targets) == tokens.tolist()
    sentinels_in = inputs[inputs > 999]
    sentinels_out = targets[targets > 999]
    np.testing.assert_array_equal(sentinels_in, FIRST_SENTINEL - np.arange(len(sentinels_in)))
    if length >= 2:
        np.testing.assert_array_equal(sentinels_in, sentinels_out)
    else:  # T5's quirk: one token is never noise, yet its targets hold an (empty) sentinel span
        assert len(sentinels_in) == 0 and sentinels_out.tolist() == [FIRST_SENTINEL]
    assert targets[0] == FIRST_SENTINEL  # targets open with the first sentinel
    assert (len(inputs) + 1, len(targets) + 1) == obj.corrupted_lengths(length, DENSITY, MEAN)


def test_noise_fraction_and_span_length_on_average():
    masks = [obj.random_spans_noise_mask(568, DENSITY, MEAN, np.random.default_rng(s)) for s in range(50)]
    assert np.mean([m.mean() for m in masks]) == pytest.approx(85 / 568)
    spans = [np.sum(m & ~np.concatenate([[False], m[:-1]])) for m in masks]
    assert np.mean([m.sum() / s for m, s in zip(masks, spans)]) == pytest.approx(85 / 28)
    # the span lengths vary: the segmentation is random, not a fixed pattern
    assert len({tuple(np.flatnonzero(m)) for m in masks}) == 50


def test_noise_mask_is_deterministic_given_the_seed():
    a = obj.random_spans_noise_mask(300, DENSITY, MEAN, np.random.default_rng([4, 2]))
    b = obj.random_spans_noise_mask(300, DENSITY, MEAN, np.random.default_rng([4, 2]))
    c = obj.random_spans_noise_mask(300, DENSITY, MEAN, np.random.default_rng([4, 3]))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_lengths_match_t5():
    assert obj.t5_targets_length(512, DENSITY, MEAN) == 114
    assert obj.raw_length(512, 114, DENSITY, MEAN) == 568
    for inputs_length in [16, 64, 100, 128, 257, 512, 1024, 2048]:
        for density, mean in [(DENSITY, MEAN), (0.5, 3.0), (0.3, 2.0)]:
            # (below ~10 tokens T5's helper lacks its mask's one-span minimum, so they differ there)
            raw, targets = t5_random_spans_helper(inputs_length, density, mean)
            assert obj.raw_length(inputs_length, 10 ** 9, density, mean) == raw
            assert obj.t5_targets_length(inputs_length, density, mean) == targets


@pytest.mark.parametrize("inputs_length", [16, 100, 512])
def test_every_chunk_up_to_the_raw_length_fits(inputs_length):
    targets_length = obj.t5_targets_length(inputs_length, DENSITY, MEAN)
    raw = obj.raw_length(inputs_length, targets_length, DENSITY, MEAN)
    fits = [obj.corrupted_lengths(n, DENSITY, MEAN) for n in range(1, raw + 1)]
    assert max(i for i, _ in fits) <= inputs_length and max(t for _, t in fits) <= targets_length
    assert obj.corrupted_lengths(raw + 1, DENSITY, MEAN)[0] > inputs_length


def test_span_corruption_examples_cover_the_document():
    tokens = np.random.default_rng(0).integers(3, 1000, size=1300).astype(np.int32)
    examples = obj.span_corruption_examples(tokens, 568, DENSITY, MEAN, FIRST_SENTINEL,
                                            np.random.default_rng(0))
    assert len(examples) == 3
    rebuilt = []
    for ex in examples:
        assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1  # eos closes both
        assert len(ex["inputs"]) <= 512 and len(ex["targets"]) <= 114
        rebuilt += reconstruct(ex["inputs"][:-1], ex["targets"][:-1])
    assert rebuilt == tokens.tolist()


def test_lm_examples_split_document_and_eos():
    tokens = np.arange(3, 103, dtype=np.int32)
    examples = obj.lm_examples(tokens, 32)
    assert [len(e["targets"]) for e in examples] == [32, 32, 32, 5]
    np.testing.assert_array_equal(np.concatenate([e["targets"] for e in examples]), np.append(tokens, 1))


def test_decoder_features_shift_inside_segments():
    targets = np.array([[5, 6, 7, 8, 9, 0], [4, 1, 0, 0, 0, 0]], np.int32)  # [B, L]
    segments = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 0, 0, 0, 0]], np.int32)
    positions = np.array([[0, 1, 0, 1, 2, 0], [0, 1, 0, 0, 0, 0]], np.int32)
    f = obj.decoder_features({"targets": targets, "targets_segment_ids": segments,
                              "targets_positions": positions})
    np.testing.assert_array_equal(f["decoder_input_tokens"], [[0, 5, 0, 7, 8, 0], [0, 4, 0, 0, 0, 0]])
    np.testing.assert_array_equal(f["decoder_loss_weights"], segments > 0)
    assert f["decoder_loss_weights"].dtype == np.float32
