"""From a config to batches: tokenizer choice, and the grain pipeline with checkpointable state.

The pipeline (grain, https://google-grain.readthedocs.io), for split S on host h of P:

    TFDS array_record source of S
    -> global shuffle, a new permutation each epoch (train only), repeated forever
    -> per document: tokenize, cut, apply the objective (noise seeded by seed and the document's
       global index, so any host count sees the same examples)
    -> documents s, s + S, s + 2S, ... of that global order, for each of the host's shards s
       (S = data.shards, or P with one shard per host when it is 0)
    -> flatten to examples -> first-fit packing into batch_size // S rows (one example per row
       without packing) -> batch -> T5X features -> the host's shards' rows, in shard order

Every stage is a grain dataset, so `DatasetIterator.get_state()` is a small JSON-able dict from
which `set_state` resumes at exactly the next batch; the shards' documents are disjoint and
together are the one-shard order. With a fixed S, the global batch is the same for every host
count P that divides it.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import grain
from absl import flags
import numpy as np
from etils import epath

from moe_jax.data import objectives, options, sources, tokenizer

def get_tokenizer(config) -> tokenizer.Tokenizer:
    """The config's SentencePiece tokenizer (data.tokenizer), or one trained on the dataset and cached.

    A trained vocabulary (data.spm_vocab_size pieces) learns from lines of the train split and is
    cached as <data_dir>/moe_jax_tokenizers/<dataset>_unigram<N>.model; later runs load it.
    """
    options.plan(config)
    d = config.data
    if d.tokenizer:
        tok = tokenizer.load(d.tokenizer, d.extra_ids)
    else:
        data_dir = sources.resolve_data_dir(d.data_dir)
        path = tokenizer.cache_path(data_dir, sources.dataset_tag(d.dataset, d.corpus_max_files),
                                    d.spm_vocab_size)
        if not epath.Path(path).exists():
            source = sources.open_split(d.dataset, d.train_split, d.data_dir, options.text_keys(config),
                                        split_field="data.train_split", max_files=d.corpus_max_files)
            # [n] evenly spaced documents, read lazily until sample_lines has enough lines
            picks = np.linspace(0, len(source) - 1, min(len(source), tokenizer.TRAIN_LINES)).astype(np.int64)
            key = options.text_keys(config)[0]
            texts = (sources.text_of(source[int(i)], key) for i in np.unique(picks))
            tokenizer.train(tokenizer.sample_lines(texts), d.spm_vocab_size, path)
        tok = tokenizer.load(path, d.extra_ids)
    if config.model.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                         f"{tok.base_vocab_size} pieces + data.extra_ids={d.extra_ids} = {tok.vocab_size} "
                         f"(tokenizer {tok.path}): raise model.vocab_size or lower data.spm_vocab_size")
    return tok


class _Flatten(grain.experimental.FlatMapTransform):
    """A document's list of examples -> the examples, one by one."""

    def flat_map(self, examples):
        return examples


class _Document:
    """Index and example of the document stream -> its list of model examples (picklable)."""

    def __init__(self, config, tok: tokenizer.Tokenizer, plan: options.Plan, salt: int):
        self.tok, self.plan, self.salt = tok, plan, salt
        self.text_key, self.seed = config.data.text_key, config.seed
        self.noise = (config.data.noise_density, config.data.mean_noise_span_length)

    def __call__(self, index: int, example) -> list[dict[str, np.ndarray]]:
        if self.plan.objective == "seq2seq":
            inputs, targets = (np.asarray(self.tok.encode(sources.text_of(example, k)), np.int32)
                               for k in options.SEQ2SEQ_KEYS)
            return [objectives.seq2seq_example(inputs, targets, self.plan.inputs_len, self.plan.targets_len)]
        tokens = np.asarray(self.tok.encode(sources.text_of(example, self.text_key)), np.int32)
        if not len(tokens):
            return []
        if self.plan.objective == "lm":
            return objectives.lm_examples(tokens, self.plan.targets_len)
        rng = np.random.default_rng([self.seed % 2 ** 32, self.salt, index])
        return objectives.span_corruption_examples(tokens, self.plan.raw_len, *self.noise,
                                                   self.tok.sentinel(0), rng)


def _features(plan: options.Plan):
    return objectives.decoder_features if plan.objective == "lm" else objectives.encoder_decoder_features


class _HostBatches(grain.IterDataset):
    """One batch of each of this host's shards per step, their rows concatenated in shard order."""

    def __iter__(self):
        return _HostBatchesIterator([iter(p) for p in self._parents])


class _HostBatchesIterator(grain.DatasetIterator):
    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(p) for p in self._parents]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}  # [R * host shards, L]

    def get_state(self) -> dict:
        return {"shards": [p.get_state() for p in self._parents]}

    def set_state(self, state: dict) -> None:
        for parent, shard in zip(self._parents, state["shards"], strict=True):
            parent.set_state(shard)


def _shard_batches(config, tok, plan: options.Plan, source, *, train: bool, shard: int) -> grain.IterDataset:
    """The batches of one shard of the document stream: documents shard, shard + S, ... packed into
    plan.shard_rows rows each."""
    docs = grain.MapDataset.source(source)
    if train:
        docs = docs.shuffle(seed=config.seed % 2 ** 32)  # a new permutation in each epoch
    salt = 0 if train else 1  # decorrelates the noise of the train and eval streams
    docs = docs.repeat(None).map_with_index(_Document(config, tok, plan, salt))
    docs = docs[shard::plan.shards]
    examples = grain.experimental.FlatMapIterDataset(docs.to_iter_dataset(), _Flatten())
    lengths = {"targets": plan.targets_len} if plan.objective == "lm" else {
        "inputs": plan.inputs_len, "targets": plan.targets_len}
    rows = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct=lengths, num_packing_bins=plan.shard_rows, shuffle_bins=False,
        max_sequences_per_bin=None if config.data.packing else 1)
    batches = rows.batch(plan.shard_rows, drop_remainder=True).map(_features(plan))
    if config.data.num_workers:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
    return batches


def _dataset(config, tok: tokenizer.Tokenizer, *, train: bool, process_index: int,
             process_count: int) -> grain.IterDataset:
    plan = options.plan(config, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    d = config.data
    split, field = (d.train_split, "data.train_split") if train else (d.eval_split, "data.eval_split")
    source = sources.open_split(d.dataset, split, d.data_dir, options.text_keys(config), split_field=field,
                                max_files=d.corpus_max_files)
    if not len(source):
        raise ValueError(f"{field}={split!r} of data.dataset={d.dataset!r} has no examples")
    first = process_index * plan.host_shards
    parts = [_shard_batches(config, tok, plan, source, train=train, shard=s)
             for s in range(first, first + plan.host_shards)]
    return _HostBatches(parts) if d.shards else parts[0]  # data.shards = 0: the one shard's own state


def train_iterator(config, tok: tokenizer.Tokenizer, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
    """This host's endless train batches; `.get_state()` / `.set_state(state)` checkpoint it."""
    return iter(_dataset(config, tok, train=True, process_index=process_index, process_count=process_count))


class EvalBatches:
    """`num_eval_steps` eval batches of this host; each iteration starts afresh and is identical."""

    def __init__(self, dataset: grain.IterDataset, num_steps: int):
        self._dataset, self._num_steps = dataset, num_steps

    def __len__(self) -> int:
        return self._num_steps

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return itertools.islice(iter(self._dataset), self._num_steps)


def eval_batches(config, tok: tokenizer.Tokenizer, process_index: int = 0,
                 process_count: int = 1) -> EvalBatches:
    """The first `num_eval_steps` batches of the eval split (in order, repeated if it is short)."""
    dataset = _dataset(config, tok, train=False, process_index=process_index, process_count=process_count)
    return EvalBatches(dataset, config.num_eval_steps)
