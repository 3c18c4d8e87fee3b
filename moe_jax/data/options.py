"""Checks the data fields of a config before anything expensive runs, and derives the lengths.

Every error is a ValueError that names the config field (`data.objective`, `batch_size`, ...) and
what it accepts. Target length for span corruption follows T5's random_spans_helper (Raffel et
al. 2020): with `target_seq_len = 0`, 512 encoder tokens at noise density 0.15 and mean span 3
give 114 decoder tokens.
"""
from __future__ import annotations

import dataclasses
import re

from moe_jax import validation
from moe_jax.data import objectives
from moe_jax.models import families

# objective -> the model.kind that trains with it
OBJECTIVES = dict(sorted((family.objective, kind) for kind, family in families.FAMILIES.items()))
# supervised inputs -> targets (a fine-tuning task, e.g. data.dataset='stdlib_docstrings'), no corruption
OBJECTIVES["seq2seq"] = "encoder_decoder"
SEQ2SEQ_KEYS = ("inputs", "targets")  # the features a seq2seq dataset holds (seqio's names)
# TFDS names: name[/config][:version], e.g. c4/en:3.1.0, lm1b, wiki40b/en.
TFDS_NAME = re.compile(r"[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?(:[0-9]+\.[0-9*]+\.[0-9*]+)?")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the pipeline builds, derived from a validated config."""
    objective: str
    inputs_len: int  # encoder length (span corruption) or 0
    targets_len: int  # decoder length
    raw_len: int  # raw tokens per example before corruption (lm: = targets_len)
    per_host_batch: int
    shards: int  # data shards of the batch (data.shards, or one per host when it is 0)
    host_shards: int  # shards each host reads: shards // process_count

    @property
    def shard_rows(self) -> int:
        return self.per_host_batch // self.host_shards


def plan(config, process_count: int = 1) -> Plan:
    """Validates `config`'s data-related fields; returns the derived lengths."""
    d = config.data
    if d.dataset != "default" and not TFDS_NAME.fullmatch(d.dataset):
        raise ValueError(f"data.dataset must be 'default' (the offline stdlib corpus) or a TFDS name such as "
                         f"'c4/en:3.1.0', 'lm1b', 'wiki40b/en'; got {d.dataset!r}")
    if d.objective not in OBJECTIVES:
        raise ValueError(f"data.objective must be one of {tuple(OBJECTIVES)}, got {d.objective!r}")
    if OBJECTIVES[d.objective] != config.model.kind:
        allowed = [o for o, kind in OBJECTIVES.items() if kind == config.model.kind]
        raise ValueError(f"data.objective={d.objective!r} needs model.kind={OBJECTIVES[d.objective]!r}; "
                         f"model.kind={config.model.kind!r} trains with data.objective in {allowed}")
    for field in ("text_key", "train_split", "eval_split"):
        if not isinstance(d[field], str) or not d[field]:
            raise ValueError(f"data.{field} must be a non-empty string, got {d[field]!r}")
    for field in ("data_dir", "tokenizer"):
        if not isinstance(d[field], str):
            raise ValueError(f"data.{field} must be a string ('' for the default), got {d[field]!r}")
    if "://" in d.data_dir:
        raise ValueError(f"data.data_dir={d.data_dir!r}: the pipeline reads TFDS array_record files with "
                         "array_record's own C++ file I/O, which opens local paths only. Mount the bucket "
                         "(gcsfuse, e.g. /gcs/<bucket>/tfds on a Cloud TPU VM) and give the mounted path")
    if not isinstance(d.packing, bool):
        raise ValueError(f"data.packing must be True or False, got {d.packing!r}")
    validation.integer("data", "num_workers", d.num_workers, 0)
    validation.integer("data", "corpus_max_files", d.corpus_max_files, 0)
    # 256 byte pieces + pad, eos, unk, newline
    validation.integer("data", "spm_vocab_size", d.spm_vocab_size, 260)
    validation.integer("data", "extra_ids", d.extra_ids, 0)
    validation.integer("", "num_eval_steps", config.num_eval_steps, 0)
    validation.integer("", "process_count", process_count, 1)
    batch_size = validation.integer("", "batch_size", config.batch_size, 1)
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of hosts "
                         f"({process_count}): each host loads batch_size // process_count rows")
    shards = _shards(d, batch_size, process_count)
    rows = dict(per_host_batch=batch_size // process_count, shards=shards,
                host_shards=shards // process_count)
    seq_len = validation.integer("", "seq_len", config.seq_len, 2)
    if d.objective == "lm":
        if config.target_seq_len:
            raise ValueError(f"target_seq_len={config.target_seq_len} does not apply to data.objective='lm' "
                             "(an LM's targets are its seq_len inputs shifted): leave it at 0")
        return Plan("lm", 0, seq_len, seq_len, **rows)
    if d.objective == "seq2seq":
        return Plan("seq2seq", seq_len, _seq2seq_targets_len(config), 0, **rows)
    return Plan("span_corruption", seq_len, *_span_corruption_lengths(config, seq_len), **rows)


def text_keys(config) -> tuple[str, ...]:
    """The text features an example is read from."""
    return SEQ2SEQ_KEYS if config.data.objective == "seq2seq" else (config.data.text_key,)


def _seq2seq_targets_len(config) -> int:
    if config.data.text_key != "text":
        raise ValueError(f"data.text_key={config.data.text_key!r} does not apply to "
                         "data.objective='seq2seq', "
                         f"which reads the features {SEQ2SEQ_KEYS}: leave it at 'text'")
    if not validation.integer("", "target_seq_len", config.target_seq_len, 0):
        raise ValueError("target_seq_len=0: data.objective='seq2seq' needs the decoder length (targets are "
                         "cut to it), e.g. --config.target_seq_len=32")
    return config.target_seq_len


def _span_corruption_lengths(config, seq_len: int) -> tuple[int, int]:
    """(targets_len, raw_len) of T5 span corruption of seq_len encoder tokens, checked."""
    d = config.data
    if not 0 < d.noise_density < 1:
        raise ValueError(f"data.noise_density must be in (0, 1), got {d.noise_density!r}")
    if not d.mean_noise_span_length >= 1:
        raise ValueError(f"data.mean_noise_span_length must be >= 1, got {d.mean_noise_span_length!r}")
    noise = (d.noise_density, d.mean_noise_span_length)
    needed = objectives.t5_targets_length(seq_len, *noise)
    targets_len = validation.integer("", "target_seq_len", config.target_seq_len, 0) or needed
    if targets_len < needed:
        raise ValueError(f"target_seq_len={targets_len} is too short for seq_len={seq_len} at "
                         f"data.noise_density={d.noise_density}: span corruption needs >= {needed} "
                         "(0 derives it)")
    raw_len = objectives.raw_length(seq_len, targets_len, *noise)
    max_spans = max(objectives.noise_counts(n, *noise)[1] for n in range(1, raw_len + 1))
    if max_spans > d.extra_ids:
        raise ValueError(f"data.extra_ids={d.extra_ids} is too few: span corruption of seq_len={seq_len} "
                         f"uses up to {max_spans} sentinels")
    return targets_len, raw_len


def _shards(d, batch_size: int, process_count: int) -> int:
    """data.shards, checked against the batch and the hosts; 0 becomes one shard per host."""
    shards = validation.integer("data", "shards", d.shards, 0) or process_count
    if d.shards and batch_size % shards:
        raise ValueError(f"data.shards={shards} must divide batch_size={batch_size}: each shard packs "
                         "batch_size // data.shards rows of every batch")
    if d.shards and shards % process_count:
        raise ValueError(f"data.shards={shards} must be a multiple of the {process_count} hosts: each host "
                         "reads data.shards // hosts whole shards (0: one shard per host)")
    return shards
