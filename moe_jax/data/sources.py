"""Random-access text sources: the default stdlib corpus or any prepared TFDS text dataset.

Both are read the same way, through TFDS's array_record data sources (`builder.as_data_source`,
no TensorFlow), which grain indexes directly. TFDS datasets (c4/en, lm1b, wiki40b/en, ...) must be
prepared beforehand with `tfds build` in array_record format (data_dir may be gs://); nothing is
downloaded at run time.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants

from moe_jax.data import corpus

DEFAULT = "default"


def resolve_data_dir(data_dir: str) -> str:
    """`data_dir`, or TFDS's default (~/tensorflow_datasets, or $TFDS_DATA_DIR) when empty."""
    return data_dir or constants.DATA_DIR


def dataset_tag(dataset: str, max_files: int) -> str:
    """A name for the dataset that tells caches apart (stdlib version and subset included)."""
    return f"stdlib_{corpus.builder_config(max_files).name}" if dataset == DEFAULT else dataset


def _build_command(dataset: str, data_dir: str) -> str:
    name, _, config = dataset.partition(":")[0].partition("/")
    config_flag = f" --config={config}" if config else ""
    return f"tfds build {name}{config_flag} --data_dir={data_dir} --file_format=array_record"


def open_split(dataset: str, split: str, data_dir: str, text_key: str, *, split_field: str,
               max_files: int = 0) -> Sequence[Any]:
    """The split as a random-access sequence of examples (dicts of NumPy values and bytes).

    `split_field` names the config field that chose `split`, for the error message.
    """
    data_dir = resolve_data_dir(data_dir)
    how = (f"Prepare it once, where TFDS can download it, with:\n  {_build_command(dataset, data_dir)}\n"
           "(array_record is the format moe_jax reads without TensorFlow; gs:// data dirs work.)")
    if dataset == DEFAULT:
        builder = corpus.prepare(data_dir, max_files)
    else:
        try:
            builder = tfds.builder(dataset, data_dir=data_dir)
        except tfds.core.DatasetNotFoundError:
            raise ValueError(f"data.dataset={dataset!r}: no such TFDS dataset prepared in data.data_dir="
                             f"{data_dir!r}. {how}") from None
    if text_key not in builder.info.features:
        raise ValueError(f"data.text_key={text_key!r} is not a feature of {dataset!r}; its features are "
                         f"{sorted(builder.info.features)}")
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError:
        state = "is prepared there in another file format" if builder.is_prepared() else "is not prepared there"
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
