"""Experiment configs: load a configs/<experiment>.py file, and turn its ConfigDict into the
validated ModelConfig / MoEConfig the library builds from.

Config files import their base as `from configs import base`, so the folder that holds configs/
must be importable; `make_configs_importable` puts it on sys.path for any config path given on
the command line (`--config=path/to/configs/x.py[:arg]`), wherever the command runs from.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence

import ml_collections

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
    except SyntaxError as e:
        raise ConfigError(f"config file {file_path!r} is not valid Python (line {e.lineno}: {e.msg}); "
                          "is it truncated or corrupted?") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {file_path!r} defines no get_config(): it must return a ConfigDict")
    return module.get_config(arg) if arg else module.get_config()


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """ModelConfig from config.model and config.moe; raises ValueError naming the bad field."""
    for name in ("model", "moe"):
        if name not in config:
            raise ConfigError(f"config has no '{name}' section: start from configs/base.py")
    return ModelConfig.from_dict({**config.model.to_dict(), "moe": MoEConfig.from_dict(config.moe.to_dict())})
