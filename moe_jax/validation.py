"""Field checks shared by the config dataclasses and the data options: each refuses a bad value
with a ValueError that names the field as the command line spells it ('moe.k', 'model.d_model')."""
from __future__ import annotations

from typing import Any


def _name(section: str, field: str) -> str:
    return f"{section}.{field}" if section else field


def choice(section: str, field: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{_name(section, field)} must be one of {tuple(allowed)}, got {value!r}")


def integer(section: str, field: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{_name(section, field)} must be an int >= {low}, got {value!r}")
    return value


def number(section: str, field: str, value: Any, *, above: float | None = None) -> float:
    """A real number (not a bool); above: it must be strictly greater."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (above is not None and value <= above)):
        bound = "" if above is None else f" > {above:g}"
        raise ValueError(f"{_name(section, field)} must be a number{bound}, got {value!r}")
    return value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict -> {'a.b.c': value}, tuples as lists (as JSON holds them)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out
