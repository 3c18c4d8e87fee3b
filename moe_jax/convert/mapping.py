"""Tensor-by-tensor maps between a Hugging Face state dict and moe_jax's parameter tree.

A `Rule` turns some named HF tensors into some moe_jax parameters and back: a torch Linear's
weight [out, in] becomes our kernel [in, out], attention projections get their head axes
([D, H, Dh], [H, Dh, D]), the E per-expert matrices of a layer become one [E, D, F] array.
Every rule is exact (transposes, reshapes, stacking), except `scale`, which multiplies by a
constant in float64 and rounds once to the parameter's dtype; with a power of two (T5's sqrt(64)
= 8) that is exact too. Our layers are scanned (models/blocks.py): a layer parameter lives at
`[stack, 'units', 'layers', j, ...]` with a leading [U] axis, unit u holding HF layer
u * period + j; a `Target` names one parameter and, for those, its unit.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from moe_jax.convert.hf_io import ConversionError

Path = tuple


@dataclasses.dataclass(frozen=True)
class Target:
    path: Path  # in the parameter tree, without the unit axis
    unit: int | None = None  # which slice of the leading [U] axis; None: not a layer parameter


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]  # HF tensor names
    ours: tuple[Target, ...]
    load: Callable[[list[np.ndarray]], list[np.ndarray]]  # HF arrays -> our arrays
    save: Callable[[list[np.ndarray]], list[np.ndarray]]  # our arrays -> HF arrays


def _scaled(x: np.ndarray, factor: float) -> np.ndarray:
    return (x.astype(np.float64) * factor).astype(x.dtype)  # [...] -> [...], one rounding


def copy(hf: str, ours: Target) -> Rule:
    return Rule((hf,), (ours,), lambda a: [a[0]], lambda a: [a[0]])


def linear(hf: str, ours: Target) -> Rule:
    """torch Linear weight [out, in] <-> kernel [in, out]."""
    return Rule((hf,), (ours,), lambda a: [a[0].T], lambda a: [a[0].T])  # [O, I] <-> [I, O]


def heads_in(hf: str, ours: Target, heads: int, head_dim: int, scale: float = 1.0) -> Rule:
    """q/k/v projection [H*Dh, D] <-> [D, H, Dh], times `scale` on the way in."""
    def load(a):
        w = a[0].T.reshape(a[0].shape[1], heads, head_dim)  # [H*Dh, D] -> [D, H, Dh]
        return [w if scale == 1.0 else _scaled(w, scale)]

    def save(a):
        w = a[0] if scale == 1.0 else _scaled(a[0], 1.0 / scale)
        return [w.reshape(w.shape[0], heads * head_dim).T]  # [D, H, Dh] -> [H*Dh, D]
    return Rule((hf,), (ours,), load, save)


def heads_out(hf: str, ours: Target, heads: int, head_dim: int) -> Rule:
    """output projection [D, H*Dh] <-> [H, Dh, D]."""
    return Rule((hf,), (ours,), lambda a: [a[0].T.reshape(heads, head_dim, -1)],  # [D, H*Dh] -> [H, Dh, D]
                lambda a: [a[0].reshape(heads * head_dim, -1).T])  # [H, Dh, D] -> [D, H*Dh]


def experts(names: Sequence[str], ours: Target) -> Rule:
    """E torch Linear weights [out, in] <-> one [E, in, out] array."""
    return Rule(tuple(names), (ours,),
                lambda a: [np.stack([w.T for w in a])],  # E x [O, I] -> [E, I, O]
                lambda a: [w.T for w in a[0]])  # [E, I, O] -> E x [O, I]


def layer_slot(mc, i: int) -> tuple[Path, int, bool]:
    """Where HF decoder layer i lives in a decoder-only model: (path of its layer without the unit
    axis, its unit, whether its FFN is the MoE layer). A dense prefix (model.first_dense_layers)
    holds the first layers one per unit; the decoder's units of moe_every layers end in the MoE one."""
    if i < mc.first_dense_layers:
        return ("dense_prefix", "units", "layers", 0), i, False
    i -= mc.first_dense_layers
    period = mc.decoder_moe_every or 1
    return ("decoder", "units", "layers", i % period), i // period, bool(mc.decoder_moe_every) and (
        i % period == period - 1)


def _get(tree: dict, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def flat_paths(tree, prefix: Path = ()) -> dict[Path, np.ndarray]:
    if isinstance(tree, dict):
        return {p: v for k, sub in tree.items() for p, v in flat_paths(sub, prefix + (k,)).items()}
    return {prefix: tree}


def load_params(rules: Sequence[Rule], tensors: dict[str, np.ndarray], template: dict, source: str) -> dict:
    """Fill a copy of `template` (our parameter tree: arrays or ShapeDtypeStructs) from `tensors`.

    Every parameter must be set, with its shape, and every HF tensor used; otherwise a
    ConversionError names what is missing or left over in `source`."""
    missing = sorted({n for r in rules for n in r.hf} - set(tensors))
    if missing:
        raise ConversionError(f"{source} lacks tensors this architecture needs: {missing[:6]}"
                              + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
    unused = sorted(set(tensors) - {n for r in rules for n in r.hf})
    if unused:
        raise ConversionError(f"{source} holds tensors the converter does not map: {unused[:6]}: is it "
                              "a checkpoint of another architecture or variant?")
    want = flat_paths(template)
    units: dict[Path, dict[int, np.ndarray]] = {}
    out = {}
    for rule in rules:
        arrays = rule.load([np.asarray(tensors[n], np.float32) for n in rule.hf])
        for target, array in zip(rule.ours, arrays):
            if target.unit is None:
                out[target.path] = array
            else:
                units.setdefault(target.path, {})[target.unit] = array
    for path, parts in units.items():
        out[path] = np.stack([parts[u] for u in range(len(parts))])  # U x [...] -> [U, ...]
    _check_complete(out, want, source)
    tree = _nested(want)
    for path, array in out.items():
        _set(tree, path, array)
    return tree


def _check_complete(out: dict, want: dict, source: str) -> None:
    absent = sorted(set(want) - set(out), key=str)
    extra = sorted(set(out) - set(want), key=str)
    if absent or extra:
        raise ConversionError(f"{source}: the mapped parameters do not match the model: unset "
                              f"{absent[:4]}, unknown {extra[:4]}")
    for path, array in out.items():
        if tuple(array.shape) != tuple(want[path].shape):
            raise ConversionError(f"{source}: parameter {'/'.join(map(str, path))} has shape "
                                  f"{tuple(array.shape)} from the checkpoint, the model wants "
                                  f"{tuple(want[path].shape)}: does config.json match the weights?")


def _nested(flat: dict[Path, object]) -> dict:
    tree: dict = {}
    for path in flat:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = None
    return tree


def save_params(rules: Sequence[Rule], params: dict, dtype) -> dict[str, np.ndarray]:
    """Our parameter tree -> {HF tensor name: array in `dtype`}."""
    out = {}
    for rule in rules:
        ours = []
        for target in rule.ours:
            array = np.asarray(_get(params, target.path), np.float32)
            ours.append(array if target.unit is None else array[target.unit])  # [U, ...] -> [...]
        for name, array in zip(rule.hf, rule.save(ours)):
            out[name] = np.ascontiguousarray(array).astype(dtype)
    return out
