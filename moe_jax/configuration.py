"""Experiment configs: load a configs/<experiment>.py file, and turn its ConfigDict into the
validated ModelConfig / MoEConfig the library builds from.

Config files import their base as `from configs import base`, so the folder that holds configs/
must be importable; `make_configs_importable` puts it on sys.path for any config path given on
the command line (`--config=path/to/configs/x.py[:arg]`), wherever the command runs from.
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import ml_collections

from moe_jax import validation
from moe_jax.models.config import ModelConfig
from moe_jax.moe_config import MoEConfig


class ConfigError(ValueError):
    """A config file or field that cannot be used, with what would fix it."""


def _config_paths(argv: Sequence[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
    return [p.split(":", 1)[0] for p in paths]


def make_configs_importable(argv: Sequence[str]) -> None:
    """Let `from configs import base` work for every --config path in argv, and check the files exist."""
    for path in _config_paths(argv):
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist: pass --config=configs/<experiment>.py "
                              f"(available: {', '.join(sorted(available_configs()))})")
        root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        if root not in sys.path:
            sys.path.insert(0, root)


BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "base.py")


@functools.lru_cache(maxsize=1)
def base_defaults() -> dict[str, Any]:
    """configs/base.py's value of every field, flattened ('moe.k': 1): what a field that a saved config
    lacks (it was added to moe_jax later) meant when that config was written."""
    return validation.flatten(json.loads(load(BASE_CONFIG).to_json())) if os.path.isfile(BASE_CONFIG) else {}


def available_configs() -> list[str]:
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    if not os.path.isdir(here):
        return []
    return [f"configs/{f}" for f in os.listdir(here) if f.endswith(".py") and not f.startswith("_")]


def load(path: str) -> ml_collections.ConfigDict:
    """Load `path[:arg]` the way --config does, with clear errors for missing or broken files."""
    file_path, _, arg = path.partition(":")
    make_configs_importable([f"--config={file_path}"])
    spec = importlib.util.spec_from_file_location(f"_moe_jax_config_{abs(hash(file_path))}", file_path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:  # in this file, or in one it imports (configs/base.py)
        raise ConfigError(f"config file {e.filename or file_path!r} is not valid Python "
                          f"(line {e.lineno}: {e.msg}); is it truncated or corrupted?") from None
    except Exception as e:  # noqa: BLE001 (whatever the file's own code raises, said in one line)
        raise ConfigError(f"config file {file_path!r} failed to load{_line_in(e, file_path)}: "
                          f"{type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {file_path!r} defines no get_config(): it must return a ConfigDict")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001
        call = f"get_config({arg!r})" if arg else "get_config()"
        raise ConfigError(f"{call} of config file {file_path!r} failed{_line_in(e, file_path)}: "
                          f"{type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() of config file {file_path!r} returned {type(config).__name__}, "
                          "not an ml_collections.ConfigDict: start from configs/base.py")
    return config


def _line_in(error: BaseException, file_path: str) -> str:
    """' (line N)' of the innermost frame of `error`'s traceback in `file_path`, or ''."""
    here = os.path.abspath(file_path)
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
             if os.path.abspath(f.filename) == here]
    return f" (line {lines[-1]})" if lines else ""


def _config_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """(argument, dotted field) of every --config.<field>[=value] (or --noconfig.<field>) in argv."""
    out = []
    for arg in argv:
        match = re.match(r"--?(no)?config\.([^=]*)", arg)
        if match:
            out.append((arg, match.group(2)))
    return out


def check_command_line(argv: Sequence[str]) -> ml_collections.ConfigDict | None:
    """The config that `--config=<file>[:arg] --config.<field>=<value> ...` in argv gives, or None
    without --config, checked the way the command line will be parsed, so that a missing or broken
    file, an unknown field or a value of the wrong type is a ConfigError naming it (not a
    traceback from inside ml_collections or absl). The fields' values are checked by validate()."""
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    make_configs_importable(argv)
    paths = _config_paths(argv)
    if not paths:
        return None
    config = load(paths[-1])
    for arg, field in _config_overrides(argv):
        node, parts = config, field.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                parent = ".".join(["config", *parts[:depth]])
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(part, known, 1)
                hint = (f" (did you mean {parent}.{close[0]}?)" if close else
                        f"; its fields are {known}" if known else f"; {parent} is not a section")
                raise ConfigError(f"{arg}: unknown config field {'.'.join(['config', *parts[:depth + 1]])}"
                                  f"{hint}")
            node = node[part]
    # Parse the overrides as absl will, into a throwaway FlagValues: wrong types are named here.
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                    sys_argv=list(argv))
    try:
        flag_values(list(argv), known_only=True)
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"cannot apply the --config overrides: {type(e).__name__}: {e}") from None
    return flag_values.config


# The top-level fields every config has (configs/base.py sets their defaults) and their types.
TOP_LEVEL_FIELDS: dict[str, type | tuple[type, ...]] = {
    "seed": int, "num_train_steps": int, "batch_size": int, "seq_len": int, "target_seq_len": int,
    "eval_every_steps": int, "num_eval_steps": int, "checkpoint_every_steps": int, "log_every_steps": int,
    "keep_checkpoints": int, "optimizer": str, "learning_rate": float, "warmup_steps": int, "schedule": str,
    "weight_decay": float, "grad_clip_norm": float, "grad_accum_steps": int, "balance_loss_weight": float,
    "z_loss_weight": float, "model": ml_collections.ConfigDict, "moe": ml_collections.ConfigDict,
    "data": ml_collections.ConfigDict, "mesh_shape": tuple, "logical_axis_rules": tuple, "fsdp": bool,
    "init_from": str, "upcycle_noise": float,
}
POSITIVE = ("num_train_steps", "batch_size", "seq_len", "eval_every_steps", "num_eval_steps",
            "checkpoint_every_steps", "log_every_steps", "keep_checkpoints", "grad_accum_steps")


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
    """Check every field before anything is built or compiled; returns the ModelConfig.

    Raises ConfigError naming the field and what it accepts."""
    from moe_jax import optim  # noqa: PLC0415 (optim imports optax; keep this module light)
    from moe_jax.data import options as data_options  # noqa: PLC0415

    unknown = sorted(set(config.keys()) - set(TOP_LEVEL_FIELDS))
    if unknown:
        hints = [f"{u} (did you mean {close[0]}?)"
                 if (close := difflib.get_close_matches(u, TOP_LEVEL_FIELDS, 1))
                 else u for u in unknown]
        raise ConfigError(f"unknown config field(s): {', '.join(hints)}; known: {sorted(TOP_LEVEL_FIELDS)}")
    for name, kind in TOP_LEVEL_FIELDS.items():
        if name not in config:
            raise ConfigError(f"config.{name} is missing: start from configs/base.py")
        value = config[name]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"config.{name} must be of type {getattr(kind, '__name__', kind)}, "
                              f"got {value!r}")
    for name in POSITIVE:
        if config[name] < 1:
            raise ConfigError(f"config.{name} must be >= 1, got {config[name]}")
    if config.optimizer not in optim.OPTIMIZERS:
        raise ConfigError(f"config.optimizer must be one of {optim.OPTIMIZERS}, got {config.optimizer!r}")
    if config.schedule not in optim.SCHEDULES:
        raise ConfigError(f"config.schedule must be one of {optim.SCHEDULES}, got {config.schedule!r}")
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError(f"config.batch_size={config.batch_size} must be divisible by "
                          f"config.grad_accum_steps={config.grad_accum_steps}")
    for name in ("learning_rate", "weight_decay", "grad_clip_norm", "balance_loss_weight", "z_loss_weight",
                 "warmup_steps", "target_seq_len", "upcycle_noise"):
        if config[name] < 0:
            raise ConfigError(f"config.{name} must be >= 0, got {config[name]}")
    if config.upcycle_noise and not config.init_from:
        raise ConfigError(f"config.upcycle_noise={config.upcycle_noise} applies to experts copied from "
                          "config.init_from's dense FFNs, and config.init_from is empty: set both, or leave "
                          "upcycle_noise at 0")
    model = model_config(config)
    try:
        data_options.plan(config)  # the data fields, and the lengths they imply
    except AttributeError as e:  # ml_collections' missing field: its name, quoted
        raise ConfigError(f"config.data has no field {str(e).strip(chr(34))}: start from configs/base.py, "
                          "which sets every data field") from None
    return model


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """ModelConfig from config.model and config.moe; raises ValueError naming the bad field."""
    for name in ("model", "moe"):
        if name not in config:
            raise ConfigError(f"config has no '{name}' section: start from configs/base.py")
    return ModelConfig.from_dict({**config.model.to_dict(), "moe": MoEConfig.from_dict(config.moe.to_dict())})
