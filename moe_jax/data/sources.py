"""Random-access text sources: the default stdlib corpus or any prepared TFDS text dataset.

Both are read the same way, through TFDS's array_record data sources (`builder.as_data_source`,
no TensorFlow), which grain indexes directly. TFDS datasets (c4/en, lm1b, wiki40b/en, ...) must be
prepared beforehand with `tfds build` in array_record format (data_dir may be gs://); nothing is
downloaded at run time.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds
from google.protobuf import json_format
from tensorflow_datasets.core import constants

from moe_jax.data import corpus, docstrings

DEFAULT = "default"
# What TFDS and array_record raise on prepared files that are truncated, garbled or missing
# (KeyError: TFDS's split table, read from a missing dataset_info.json, is empty).
DAMAGE_ERRORS = (RuntimeError, OSError, UnicodeDecodeError, json.JSONDecodeError, json_format.ParseError,
                 KeyError)


def resolve_data_dir(data_dir: str) -> str:
    """`data_dir`, or TFDS's default (~/tensorflow_datasets, or $TFDS_DATA_DIR) when empty."""
    return data_dir or constants.DATA_DIR


def dataset_tag(dataset: str, max_files: int) -> str:
    """A name for the dataset that tells caches apart (stdlib version and subset included)."""
    if dataset in (DEFAULT, docstrings.NAME):
        prefix = "stdlib" if dataset == DEFAULT else docstrings.NAME
        return f"{prefix}_{corpus.builder_config(max_files).name}"
    return dataset


def _build_command(dataset: str, data_dir: str) -> str:
    name, _, config = dataset.partition(":")[0].partition("/")
    config_flag = f" --config={config}" if config else ""
    return f"tfds build {name}{config_flag} --data_dir={data_dir} --file_format=array_record"


def open_split(dataset: str, split: str, data_dir: str, text_key: str | tuple[str, ...], *, split_field: str,
               max_files: int = 0) -> Sequence[Any]:
    """The split as a random-access sequence of examples (dicts of NumPy values and bytes).

    `split_field` names the config field that chose `split`, for the error message. Damaged
    prepared files (truncated, garbled) are a ValueError naming the dataset and the fix, whether
    found on opening the split or when a record is read.
    """
    data_dir = resolve_data_dir(data_dir)
    where = (dataset, split, data_dir, max_files)
    try:
        source = _open_split(dataset, split, data_dir, text_key, split_field, max_files)
        len(source)  # opens the files
    except DAMAGE_ERRORS as e:
        raise ValueError(damaged_message(*where, _reason(e))) from None
    return _CheckedSource(source, where)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def damaged_message(dataset: str, split: str, data_dir: str, max_files: int, reason: str) -> str:
    """What to say when the prepared files of `dataset` cannot be read, and how to fix it."""
    if dataset == DEFAULT:
        folder = f"{data_dir}/{corpus.StdlibCorpus.name}/{corpus.builder_config(max_files).name}"
        fix = "delete that folder and run again: moe_jax prepares the corpus anew"
    else:
        folder = f"{data_dir}/{dataset.partition(':')[0]}"
        fix = f"delete that folder and prepare it again with `{_build_command(dataset, data_dir)}`"
    return (f"data.dataset={dataset!r} (split {split!r}) in data.data_dir={data_dir!r} "
            f"cannot be read ({reason}). If its prepared files under {folder} "
            f"are truncated or corrupted, {fix}.")


class _CheckedSource(Sequence):
    """A data source whose read errors name the dataset and the fix (picklable, for grain's workers)."""

    def __init__(self, source, where: tuple):
        self._source, self._where = source, where

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        try:
            return self._source[index]
        except DAMAGE_ERRORS as e:
            raise ValueError(damaged_message(*self._where, f"record {index}: {_reason(e)}")) from None


def _open_split(dataset: str, split: str, data_dir: str, text_key: str, split_field: str, max_files: int):
    how = (f"Prepare it once, where TFDS can download it, with:\n  {_build_command(dataset, data_dir)}\n"
           "(array_record is the format moe_jax reads without TensorFlow; gs:// data dirs work.)")
    if dataset == DEFAULT:
        builder = corpus.prepare(data_dir, max_files)
    elif dataset == docstrings.NAME:
        builder = docstrings.prepare(data_dir, max_files)
    else:
        try:
            builder = tfds.builder(dataset, data_dir=data_dir)
        except tfds.core.DatasetNotFoundError:
            raise ValueError(f"data.dataset={dataset!r}: no such TFDS dataset prepared in data.data_dir="
                             f"{data_dir!r}. {how}") from None
    for key in (text_key,) if isinstance(text_key, str) else text_key:
        if key not in builder.info.features:
            raise ValueError(f"data.text_key={key!r} is not a feature of {dataset!r}; its features are "
                             f"{sorted(builder.info.features)}")
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError:
        state = ("is prepared there in another file format" if builder.is_prepared()
                 else "is not prepared there")
        raise ValueError(f"data.dataset={dataset!r} {state} (data.data_dir={data_dir!r}). {how}") from None
    except ValueError as e:
        if "split" not in str(e).lower():
            raise
        raise ValueError(f"{split_field}={split!r}: {dataset!r} in {data_dir!r} has splits "
                         f"{sorted(builder.info.splits)}") from None


def text_of(example: Any, text_key: str) -> str:
    """The text feature of an example read from a data source, as str."""
    value = example[text_key]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
