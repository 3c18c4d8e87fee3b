"""Meshes and logical-axis sharding (GSPMD, Xu et al. 2021; the T5X / Flaxformer logical-axis
scheme; GShard's expert parallelism, Lepikhin et al. 2020).

The mesh has axes (data, expert, model). The model only names logical axes ('batch', 'expert',
'embed', 'mlp', 'heads', ...); `config.logical_axis_rules` maps them to mesh axes. Expert weights
[E, D, F] split over 'expert' (E / n experts per device), attention and FFN weights over 'model',
the batch over data x expert. Inside the MoE layer, token-major buffers [G, E*C, D] (groups
sharded like the batch) become expert-major [E, G*C, D] (experts over 'expert'): the constraints
placed there make XLA move tokens with one all-to-all over 'expert' each way. The dropless dispatch
has no fixed-size buffers for GSPMD to split: it runs under shard_map (moe_jax/expert_parallel.py).
With `config.fsdp` every weight's 'embed' (d_model) axis also splits over the batch's mesh axes
(ZeRO-3, Rajbhandari et al. 2020; FSDP): parameters, gradients and optimizer state are divided over
all devices and XLA gathers each layer's weights where they are used.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "model")
EXPERT_MAJOR = ("expert", "expert_tokens", "embed")  # logical axes of [E, G*C, D] expert buffers
DEFAULT_RULES = (
    ("batch", ("data", "expert")),  # the batch, and routing groups [G, ...]
    ("expert", "expert"),  # experts: weights [E, D, F] and expert-major buffers [E, G*C, D]
    ("expert_tokens", "data"),  # the G*C axis of expert-major buffers
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("layers", None),
    ("relpos_buckets", None),
    ("length", None),
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar(
    "moe_jax_sharding", default=None)
_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("moe_jax_platform", default=None)


class ShardingError(ValueError):
    """A mesh or rule that does not fit the devices, the model or the batch."""


def make_mesh(mesh_shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, expert, model) mesh; one entry may be -1 (the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(mesh_shape)
    if len(shape) != len(MESH_AXES):
        raise ShardingError(f"config.mesh_shape must have {len(MESH_AXES)} entries {MESH_AXES}, "
                            f"got {tuple(shape)}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ShardingError(f"config.mesh_shape entries must be >= 1, with at most one -1; "
                            f"got {tuple(shape)}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ShardingError(f"config.mesh_shape={tuple(mesh_shape)}: {len(devices)} devices "
                                f"are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ShardingError(f"config.mesh_shape={tuple(mesh_shape)} needs {math.prod(shape)} devices, but "
                            f"{len(devices)} are available: make the product equal the device count, "
                            "or use -1")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules_dict(rules: Sequence[Sequence[Any]]) -> dict[str, Any]:
    out = {}
    for rule in rules:
        if len(rule) != 2:
            raise ShardingError(f"config.logical_axis_rules entries are (logical name, mesh axes) pairs, "
                                f"got {rule!r}")
        name, axes = rule
        for axis in (axes if isinstance(axes, (tuple, list)) else (axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise ShardingError(f"config.logical_axis_rules maps {name!r} to unknown mesh axis {axis!r}; "
                                    f"mesh axes are {MESH_AXES}")
        out[name] = tuple(axes) if isinstance(axes, list) else axes
    return out


def rules_for(config) -> dict[str, Any]:
    """The config's logical-axis rules, with 'embed' mapped to the batch's mesh axes under config.fsdp.

    Activations are unaffected: their batch axis comes first and takes those mesh axes (a mesh axis
    is used once per array), so only the weights' d_model axis splits."""
    rules = rules_dict(config.logical_axis_rules)
    if not config.fsdp:
        return rules
    if rules.get("embed") is not None:
        raise ShardingError(f"config.fsdp=True splits 'embed' over the batch's mesh axes, but "
                            f"config.logical_axis_rules already maps 'embed' to {rules['embed']!r}: "
                            "map it to None, or set config.fsdp=False")
    return {**rules, "embed": rules.get("batch")}


def mesh_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules: dict,
              *, strict: Sequence[str] = ("expert",)) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec for an array of `shape`.

    A dimension that its mesh axes do not divide is replicated, except for the logical names in
    `strict` (experts must split evenly), which raise. A mesh axis is used at most once per array.
    """
    if logical is None:
        return PartitionSpec()
    used, spec = set(), []
    for name, size in zip(logical, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"unknown logical axis {name!r}: add it to config.logical_axis_rules "
                                f"(known: {sorted(rules)})")
        axes = rules[name]
        axes = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,))
                     if a is not None and a not in used)
        ways = math.prod(mesh.shape[a] for a in axes)
        if ways > 1 and size % ways:
            if name in strict:
                raise ShardingError(f"the {name!r} axis has {size} entries, which the mesh axes {axes} "
                                    f"({ways} ways) do not divide: choose moe.num_experts divisible by the "
                                    "expert mesh axis")
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: dict):
    """Activate `constrain` while tracing the step functions."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def compiling_for(platform: str):
    """Trace for `platform` ('cpu', 'gpu', 'tpu') without a mesh: a one-chip compile for a TPU topology."""
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def one_axis(logical: str, mesh: Mesh, rules: dict) -> str | None:
    """The mesh axis a logical name maps to, when it is one axis of more than one device."""
    axis = rules.get(logical)
    axis = axis[0] if isinstance(axis, tuple) and len(axis) == 1 else axis
    return axis if isinstance(axis, str) and mesh.shape[axis] > 1 else None


def active_mesh() -> tuple[Mesh, dict] | None:
    """(mesh, rules) while tracing under `use_mesh` with more than one device, else None."""
    active = _ACTIVE.get()
    return None if active is None or active[0].size == 1 else active


def expert_axis() -> tuple[Mesh, dict, str] | None:
    """(mesh, rules, mesh axis) when tracing under a mesh whose 'expert' rule names one mesh axis of
    more than one device (expert parallelism), else None."""
    active = active_mesh()  # a one-device mesh has no axis of more than one device
    if active is None:
        return None
    mesh, rules = active
    axis = one_axis("expert", mesh, rules)
    return None if axis is None else (mesh, rules, axis)


def target_platform() -> str:
    """The platform the program being traced will run on: the active mesh's devices', else the one
    `compiling_for` names, else JAX's default backend. Kernels (the grouped matmul) choose by it."""
    active = _ACTIVE.get()
    if active is not None:
        return active[0].devices.flat[0].platform
    return _PLATFORM.get() or jax.default_backend()


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside `use_mesh` (single device)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, mesh_spec(logical, x.shape, mesh, rules)))


def logical_axes(abstract_model: nnx.Module, filter_=nnx.Param) -> dict:
    """The logical names (out_sharding metadata) of a model's variables, as a pure dict."""
    state = nnx.state(abstract_model, filter_)
    return nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata().get("out_sharding"), state,
                                         is_leaf=lambda v: isinstance(v, nnx.Variable)))


def tree_shardings(abstract_tree, logical_tree, mesh: Mesh, rules: dict):
    """NamedShardings for a pure-dict tree of arrays whose logical names are in logical_tree."""
    return jax.tree.map(lambda a, names: NamedSharding(mesh, mesh_spec(names, a.shape, mesh, rules)),
                        abstract_tree, logical_tree, is_leaf=lambda x: x is None or isinstance(x, tuple))


def matching_shardings(abstract_tree, param_shapes, param_shardings, mesh: Mesh):
    """Shardings for optimizer-state trees: a leaf shaped like its parameter takes the parameter's
    sharding; a factored statistic (one axis of the parameter reduced away, as Adafactor keeps) takes
    it without that axis; anything else is replicated."""
    params_struct = jax.tree.structure(param_shapes)

    def for_subtree(sub):
        if jax.tree.structure(sub) != params_struct:
            return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), sub)
        return jax.tree.map(_match, sub, param_shapes, param_shardings)

    def _match(leaf, param, sharding):
        spec = tuple(sharding.spec) + (None,) * (param.ndim - len(sharding.spec))
        if leaf.shape == param.shape:
            return sharding
        for i in range(param.ndim):
            if leaf.shape == param.shape[:i] + param.shape[i + 1:]:
                return NamedSharding(mesh, PartitionSpec(*(spec[:i] + spec[i + 1:])))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(for_subtree, abstract_tree,
                        is_leaf=lambda x: jax.tree.structure(x) == params_struct or not jax.tree.leaves(x))
