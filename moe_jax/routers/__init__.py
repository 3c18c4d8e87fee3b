"""The router registry: each moe.router name maps to one router object (see base.RouterKind),
imported when first asked for. Adding a router is one module here, one line in _KINDS and its
test (README, "Adding a router")."""
from __future__ import annotations

import functools
import importlib

from moe_jax.routers.base import ROUTER_OPTIONS, RouterKind

_KINDS = {  # moe.router -> "module.Class" under moe_jax.routers
    "top_k": "top_k.TopK",
    "expert_choice": "expert_choice.ExpertChoice",
    "soft": "soft.Soft",
    "dense": "dense.Dense",
    "hierarchical": "hierarchical.Hierarchical",
    "noisy_top_k": "noisy_top_k.NoisyTopK",
    "sigmoid": "sigmoid.Sigmoid",
}
NAMES = tuple(_KINDS)


@functools.cache
def get(name: str) -> RouterKind:
    """The router object of a moe.router name."""
    if name not in _KINDS:
        raise ValueError(f"moe.router must be one of {NAMES}, got {name!r}")
    module, cls = _KINDS[name].rsplit(".", 1)
    kind = getattr(importlib.import_module(f"moe_jax.routers.{module}"), cls)()
    if kind.name != name:
        raise ValueError(f"router {_KINDS[name]} declares name {kind.name!r}, registered as {name!r}")
    return kind


__all__ = ["NAMES", "ROUTER_OPTIONS", "RouterKind", "get"]
