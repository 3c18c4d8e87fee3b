"""SentencePiece tokenizer with T5's conventions (Kudo & Richardson 2018; Raffel et al. 2020).

Ids: pad 0, eos 1, unk 2, no bos (T5's vocabulary and seqio's SentencePieceVocabulary). On top of
the model's pieces sit `extra_ids` sentinel ids for span corruption, counted from the top as in T5:
`<extra_id_0>` is `vocab_size - 1`, `<extra_id_1>` is `vocab_size - 2`, ... (T5: 32000 pieces +
100 extra ids = 32100, which the model pads to 32128).

Either a user's .model file (local or gs://, read through etils.epath, never TensorFlow), or a
unigram model trained on the run's dataset at first use and cached in the data dir. The training
recipe keeps code exact: identity normalisation, whitespace kept (runs of spaces become pieces),
newline as a piece, byte fallback for rare characters, so decode(encode(text)) == text. On the
stdlib corpus an 8k model reaches 3.6 characters per token.
"""
from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm
from etils import epath

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
TRAIN_LINES = 100_000  # lines sampled to train a vocabulary (stdlib: 8k pieces in about 20 s on 2 cores)
TRAIN_LINE_CHARS = 2048  # longer lines are cut (SentencePiece skips sentences over 4192 bytes)


class Tokenizer:
    """A SentencePiece model plus `extra_ids` sentinels at the top of the vocabulary."""

    pad_id, eos_id = PAD_ID, EOS_ID

    def __init__(self, model_proto: bytes, extra_ids: int, path: str):
        self.path = path
        self.extra_ids = extra_ids
        self._sp = _load_processor(model_proto, path)
        self.unk_id = self._sp.unk_id()
        self.base_vocab_size = self._sp.vocab_size()
        self.vocab_size = self.base_vocab_size + extra_ids  # what the model's embedding must cover

    def encode(self, text: str, *, sentinels: bool = False) -> list[int]:
        """Ids of `text`; with sentinels=True, `<extra_id_N>` in the text becomes sentinel N (how a
        prompt asks a span-corruption model to fill a span)."""
        if not sentinels:
            return self._sp.encode(text)
        ids = []
        for i, part in enumerate(re.split(r"<extra_id_(\d+)>", text)):
            if i % 2 == 0:
                ids += self._sp.encode(part) if part else []
            elif int(part) < self.extra_ids:
                ids.append(self.sentinel(int(part)))
            else:
                raise ValueError(f"<extra_id_{part}> is past the tokenizer's {self.extra_ids} sentinels "
                                 "(config.data.extra_ids)")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first eos; pads dropped, sentinels written `<extra_id_N>` and ids
        past the vocabulary (the model's padding of it) `<id_N>`."""
        ids = [int(i) for i in ids]
        if EOS_ID in ids:
            ids = ids[:ids.index(EOS_ID)]
        text, run = [], []
        for i in ids:
            if i >= self.base_vocab_size:
                name = f"<extra_id_{self.vocab_size - 1 - i}>" if i < self.vocab_size else f"<id_{i}>"
                text += [self._sp.decode(run), name]
                run = []
            elif i != PAD_ID:
                run.append(i)
        return "".join(text + [self._sp.decode(run)])

    def sentinel(self, index: int) -> int:
        """Id of `<extra_id_{index}>`, the sentinel of the index-th noise span."""
        return self.vocab_size - 1 - index

    def __getstate__(self):  # grain worker processes receive the tokenizer pickled
        return {"model_proto": self._sp.serialized_model_proto(), "extra_ids": self.extra_ids,
                "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["extra_ids"], state["path"])


def _load_processor(model_proto: bytes, path: str) -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"data.tokenizer: {path} is not a valid SentencePiece .model file (truncated or "
                         f"corrupted? SentencePiece says: {reason}). Point data.tokenizer at a good file or, "
                         f"if it is the vocabulary cached by an earlier run, "
                         f"delete it to train it again.") from None
    pad, eos = processor.pad_id(), processor.eos_id()
    if (pad, eos) != (PAD_ID, EOS_ID):
        raise ValueError(f"data.tokenizer: {path} has pad id {pad} and eos id {eos}; moe_jax needs "
                         f"T5's convention pad={PAD_ID}, eos={EOS_ID} (token 0 is padding for the model). "
                         "Train a model with pad_id=0 eos_id=1 unk_id=2 bos_id=-1.")
    return processor


def load(path: str, extra_ids: int) -> Tokenizer:
    """A tokenizer from a .model file, local or remote (gs://...; needs gcsfs, not TensorFlow)."""
    try:
        proto = epath.Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"data.tokenizer: no SentencePiece model at {path}") from None
    except ImportError as e:
        raise ValueError(f"data.tokenizer: cannot read {path}: {e} (for gs:// paths without TensorFlow, "
                         "`pip install gcsfs`)") from None
    return Tokenizer(proto, extra_ids, path)


def sample_lines(texts: Iterable[str], max_lines: int = TRAIN_LINES) -> list[str]:
    """Up to `max_lines` non-blank lines of `texts`, each cut to TRAIN_LINE_CHARS.

    Reads at most 4 * max_lines lines and thins them evenly, so a big corpus is sampled wider than
    its first documents.
    """
    lines = []
    for text in texts:
        lines += [line[:TRAIN_LINE_CHARS] for line in text.split("\n") if line.strip()]
        if len(lines) >= 4 * max_lines:
            break
    if len(lines) > max_lines:
        # [max_lines] evenly spaced indices into [len(lines)]
        lines = [lines[i] for i in np.linspace(0, len(lines) - 1, max_lines).astype(np.int64)]
    return lines


def train(lines: list[str], vocab_size: int, path: str, num_threads: int = os.cpu_count() or 1) -> None:
    """Trains a unigram SentencePiece model on `lines` and writes it atomically to `path`."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="unigram", vocab_size=vocab_size,
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_by_whitespace=True, allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
            byte_fallback=True, character_coverage=1.0, max_sentence_length=4 * TRAIN_LINE_CHARS,
            num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"data.spm_vocab_size={vocab_size}: SentencePiece could not train a vocabulary on "
                         f"{len(lines)} lines of the dataset ({str(e).splitlines()[0]})") from None
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if "://" in path:
        target.write_bytes(model.getvalue())
        return
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)  # a concurrent reader never sees half a file


def cache_path(data_dir: str, dataset_tag: str, vocab_size: int) -> str:
    """Where the vocabulary trained for `dataset_tag` is cached: <data_dir>/moe_jax_tokenizers/."""
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset_tag)
    return os.path.join(data_dir, "moe_jax_tokenizers", f"{tag}_unigram{vocab_size}.model")
