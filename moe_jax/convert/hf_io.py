"""Reading and writing Hugging Face checkpoint directories without torch: config.json and the
weights in the safetensors format (https://huggingface.co/docs/safetensors), one
`model.safetensors` file or shards listed by `model.safetensors.index.json` ({"weight_map":
{tensor name: shard file}}), through `safetensors.numpy`. bfloat16 tensors come as ml_dtypes
arrays (numpy has no bfloat16 of its own).
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors import numpy as st_numpy

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD = "model-{:05d}-of-{:05d}.safetensors"


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted, with the file or field and what would fix it."""


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, CONFIG)
    if not os.path.isfile(path):
        raise ConversionError(f"{path} does not exist: pass --hf_dir=<a directory written by "
                              "transformers' save_pretrained> (it holds config.json and model.safetensors)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """{tensor name: array} of model.safetensors, or of every shard its index lists."""
    single, index = os.path.join(hf_dir, SINGLE), os.path.join(hf_dir, INDEX)
    if os.path.isfile(single):
        return _load(single)
    if not os.path.isfile(index):
        other = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5")
                 if os.path.exists(os.path.join(hf_dir, f))]
        hint = (f" (it has {other[0]}: re-save it with transformers' save_pretrained(..., "
                "safe_serialization=True), which writes safetensors)") if other else ""
        raise ConversionError(f"{hf_dir} has neither {SINGLE} nor {INDEX}{hint}")
    with open(index) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index} has no 'weight_map' {{tensor name: shard file}}")
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(hf_dir, shard)
        if not os.path.isfile(path):
            raise ConversionError(f"{index} lists the shard {shard}, which is missing from {hf_dir}")
        tensors.update(_load(path))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ConversionError(f"{index} lists tensors its shards do not hold: {missing[:5]}")
    return tensors


def _load(path: str) -> dict[str, np.ndarray]:
    try:
        return st_numpy.load_file(path)
    except Exception as e:  # noqa: BLE001 (the safetensors library's own error, said in one line)
        raise ConversionError(f"cannot read {path} as safetensors: {type(e).__name__}: {e}") from None


def write(hf_dir: str, config: dict, tensors: dict[str, np.ndarray], *, max_shard_bytes: int = 0) -> None:
    """config.json and the tensors: one model.safetensors, or shards of at most max_shard_bytes
    (0: no limit) and their index, as save_pretrained writes them (metadata format 'pt')."""
    os.makedirs(hf_dir, exist_ok=True)
    with open(os.path.join(hf_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and max_shard_bytes and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = np.ascontiguousarray(tensors[name])
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        st_numpy.save_file(shards[0], os.path.join(hf_dir, SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = SHARD.format(i, len(shards))
        st_numpy.save_file(shard, os.path.join(hf_dir, name), metadata={"format": "pt"})
        weight_map.update({tensor: name for tensor in shard})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(hf_dir, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


_REQUIRED = object()


def field(hf: dict, key: str, default=_REQUIRED):
    """hf[key] (a config.json field), or `default`; a missing required field is a ConversionError."""
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is _REQUIRED:
        raise ConversionError(f"config.json has no {key!r} (model_type {hf.get('model_type')!r}); "
                              "is it a complete transformers config?")
    return default


def refuse(field_name: str, value, reason: str) -> ConversionError:
    """The error for a config.json field whose value moe_jax cannot reproduce exactly."""
    return ConversionError(f"config.json {field_name}={value!r} is not supported: {reason}")
