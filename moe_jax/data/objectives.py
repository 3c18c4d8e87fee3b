"""Pre-training objectives in NumPy: causal LM and T5 span corruption, and T5X model features.

Span corruption follows the T5 paper (Raffel et al. 2020, section 3.1.4 and 3.3) and its reference
preprocessors (t5.data.preprocessors: random_spans_helper, random_spans_noise_mask,
noise_span_to_unique_sentinel): a fraction `noise_density` of a chunk's tokens, in spans of mean
length `mean_noise_span_length`, is dropped from the inputs, each span replaced by one sentinel;
the targets are the dropped spans, each preceded by its sentinel. Span counts and lengths use
T5's formulas (banker's rounding included), so 568 raw tokens give 512 inputs and 114 targets.

Features are T5X's (t5x/seqio feature converters): `decoder_input_tokens` are the targets shifted
right inside each packed segment (0 at a segment's start), segment ids are 1, 2, ... per packed
example and 0 on padding, positions restart at 0 in each segment, loss weights are 1.0 on real
target tokens and 0.0 on padding.
"""
from __future__ import annotations

import numpy as np

from moe_jax.data.tokenizer import EOS_ID


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) that T5 picks for a chunk of `length` tokens."""
    length = max(length, 2)
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    return num_noise, max(round(num_noise / mean_noise_span_length), 1)


def corrupted_lengths(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(inputs, targets) lengths after corrupting `length` tokens, each with its eos."""
    if length == 1:  # T5 masks 2 tokens then keeps the first: no noise, one sentinel in the targets
        return 2, 2
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def t5_targets_length(inputs_length: int, noise_density: float, mean_noise_span_length: float) -> int:
    """T5's random_spans_helper: the targets length that goes with `inputs_length` (512 -> 114)."""
    raw = raw_length(inputs_length, 10 ** 9, noise_density, mean_noise_span_length)
    return corrupted_lengths(raw, noise_density, mean_noise_span_length)[1]


def raw_length(inputs_length: int, targets_length: int, noise_density: float,
               mean_noise_span_length: float) -> int:
    """The longest chunk of raw tokens such that every chunk up to that long fits both lengths.

    T5's random_spans_helper grows the chunk until its inputs would exceed `inputs_length`; here
    every shorter chunk (a document's last piece) must fit too, so rounding bumps are excluded.
    Returns 0 if not even one token fits.
    """
    raw = 0
    while True:
        inputs, targets = corrupted_lengths(raw + 1, noise_density, mean_noise_span_length)
        if inputs > inputs_length or targets > targets_length:
            return raw
        raw += 1


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """[length] bool, True on noise: alternating non-noise/noise spans, non-noise first (T5)."""
    orig_length, length = length, max(length, 2)
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)

    def random_segmentation(num_items: int) -> np.ndarray:
        # [num_items] -> [num_spans] positive lengths summing to num_items, uniformly at random
        first_in_segment = np.zeros(num_items, np.int64)
        first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_spans - 1)
        return np.bincount(np.cumsum(first_in_segment), minlength=num_spans)

    noise_lengths = random_segmentation(num_noise)  # [num_spans]
    nonnoise_lengths = random_segmentation(length - num_noise)  # [num_spans]
    span_lengths = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)  # [2 * num_spans]
    span_index = np.repeat(np.arange(2 * num_spans), span_lengths)  # [length]
    return (span_index % 2 == 1)[:orig_length]


def span_corrupt(tokens: np.ndarray, noise_mask: np.ndarray,
                 first_sentinel: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) without eos; the k-th noise span gets sentinel `first_sentinel - k` (T5)."""
    def replace_spans(mask: np.ndarray) -> np.ndarray:
        # [N] -> [N - tokens after each span's first]: each masked span becomes one sentinel
        previous = np.concatenate([[False], mask[:-1]])
        first = mask & ~previous
        out = np.where(first, first_sentinel + 1 - np.cumsum(first), tokens)
        return out[~(mask & previous)]

    return replace_spans(noise_mask), replace_spans(~noise_mask)


def split(tokens: np.ndarray, length: int) -> list[np.ndarray]:
    """Consecutive pieces of at most `length` tokens."""
    return [tokens[i:i + length] for i in range(0, len(tokens), length)]


def lm_examples(tokens: np.ndarray, seq_len: int) -> list[dict[str, np.ndarray]]:
    """A document's tokens plus eos, cut into `{"targets": [<= seq_len]}` examples."""
    return [{"targets": t} for t in split(np.append(tokens, EOS_ID).astype(np.int32), seq_len)]


def span_corruption_examples(tokens: np.ndarray, raw_len: int, noise_density: float,
                             mean_noise_span_length: float, first_sentinel: int,
                             rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """A document cut into chunks of at most `raw_len` tokens, each corrupted and given eos."""
    examples = []
    for chunk in split(np.asarray(tokens, np.int32), raw_len):
        mask = random_spans_noise_mask(len(chunk), noise_density, mean_noise_span_length, rng)
        inputs, targets = span_corrupt(chunk, mask, first_sentinel)
        examples.append({"inputs": np.append(inputs, EOS_ID).astype(np.int32),
                         "targets": np.append(targets, EOS_ID).astype(np.int32)})
    return examples


def seq2seq_example(inputs: np.ndarray, targets: np.ndarray, inputs_len: int,
                    targets_len: int) -> dict[str, np.ndarray]:
    """A supervised pair, each cut to its length with room for its eos."""
    return {"inputs": np.append(inputs[:inputs_len - 1], EOS_ID).astype(np.int32),
            "targets": np.append(targets[:targets_len - 1], EOS_ID).astype(np.int32)}


def shift_right(targets: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """[B, L] -> [B, L]: each token's predecessor in its segment, 0 at every segment start."""
    shifted = np.zeros_like(targets)
    shifted[:, 1:] = targets[:, :-1] * (segment_ids[:, 1:] == segment_ids[:, :-1])
    return shifted


def decoder_features(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """T5X decoder features from packed `targets`, `targets_segment_ids`, `targets_positions` [B, L]."""
    segments = packed["targets_segment_ids"]
    return {
        "decoder_input_tokens": shift_right(packed["targets"], segments),
        "decoder_target_tokens": packed["targets"],
        "decoder_segment_ids": segments,
        "decoder_positions": packed["targets_positions"],
        "decoder_loss_weights": (segments > 0).astype(np.float32),
    }


def encoder_decoder_features(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds the encoder features from packed `inputs`, `inputs_segment_ids`, `inputs_positions` [B, Li]."""
    return {
        "encoder_input_tokens": packed["inputs"],
        "encoder_segment_ids": packed["inputs_segment_ids"],
        "encoder_positions": packed["inputs_positions"],
        **decoder_features(packed),
    }
