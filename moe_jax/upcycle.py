"""A fresh run's parameters from a published or earlier checkpoint: `config.init_from`.

The source is a moe_jax workdir (its latest checkpoint, with the config saved in it) or a Hugging
Face directory (moe_jax.convert.from_hf). Layer by layer, every parameter whose path and shape
match is copied. Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training
Mixture-of-Experts from Dense Checkpoints"): where this model has an MoE layer and the source a
dense FFN, each of the E experts is a copy of that FFN, optionally plus Gaussian noise of std
`config.upcycle_noise` x the copied weight's std (0, the paper's choice, by default); the router
keeps its fresh initialisation. With top-1 routing, an upcycled layer at step 0 computes the dense
FFN's output times the chosen expert's router probability (Switch and the paper do not
renormalise); with moe.renormalize=True the weight is 1 and, with no token dropped, the upcycled
model computes exactly what the dense one does.

What cannot be copied (another width, depth or vocabulary; a sparse source layer where this model
is dense) is refused before training, naming the config field and the source's value. The caller
(main.Run) makes a new optimizer state and starts at step 0; a workdir that holds a checkpoint
resumes from it and never reads init_from.
"""
from __future__ import annotations

import zlib

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from moe_jax import configuration
from moe_jax.checkpoints import Checkpointer
from moe_jax.configuration import ConfigError
from moe_jax.data import sources, tokenizer
from moe_jax.trainer import Trainer, TrainState

# model fields the copied weights fix: (field, ModelConfig attribute compared)
SAME_MODEL_FIELDS = (("kind", "kind"), ("vocab_size", "vocab_size"), ("d_model", "d_model"),
                     ("num_heads", "num_heads"), ("num_kv_heads", "kv_heads"), ("head_dim", "head_size"),
                     ("position", "position"), ("relative_buckets", "relative_buckets"),
                     ("tie_embeddings", "tie_embeddings"), ("moe_extra_dense_ffn", "moe_extra_dense_ffn"),
                     ("first_dense_layers", "first_dense_layers"))
SAME_SPARSE_FIELDS = ("num_experts", "d_ff", "activation", "num_shared_experts", "router")


def initialise(state: TrainState, config, mc, trainer: Trainer, tokenizer_path: str) -> tuple:
    """(state with the source's parameters and a new optimizer state, a line for the log); `state` is
    the run's fresh state (its routers and RNG streams stay), `tokenizer_path` the run's vocabulary."""
    path = config.init_from
    src, src_mc, read_params = open_source(path, trainer)
    check_compatible(config, mc, src_mc, path)
    vocabulary = check_vocabulary(config, src, tokenizer_path, path)
    counts = {"copied": 0, "upcycled": 0, "fresh": 0}
    params = compose(_to_host(state.params), read_params(), mc, src_mc, counts,
                     noise=config.upcycle_noise, seed=config.seed)
    placed = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
                          params, trainer.state_sharding.params)
    opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_sharding.opt_state)(placed)
    line = (f"initialised from config.init_from={path}: {counts['copied']} parameters copied, "
            f"{counts['upcycled']} expert weights upcycled from dense FFNs "
            f"(moe.num_experts={mc.moe.num_experts} copies, upcycle_noise={config.upcycle_noise}), "
            f"{counts['fresh']} router weights fresh; "
            f"{vocabulary}; new optimizer state, step 0")
    return state.replace(params=placed, opt_state=opt_state), line


def open_source(path: str, trainer: Trainer) -> tuple:
    """(source config, its ModelConfig, a function reading its parameters as NumPy arrays): the
    config first, so that a model that cannot take the weights is refused before they are read."""
    from moe_jax import convert  # noqa: PLC0415 (the converters are needed only here)
    from moe_jax.convert import workdir  # noqa: PLC0415

    if (epath.Path(path) / "checkpoints").exists():
        src = workdir.saved_config(path)
        mc = configuration.model_config(src)
        return src, mc, lambda: _restore_params(path, src, mc, trainer)
    if _is_hf(path):
        src, model = convert.from_hf(path)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return src, configuration.model_config(src), lambda: _to_host(params)
    raise ConfigError(f"config.init_from={path!r} is neither a moe_jax workdir (it has no checkpoints/) "
                      "nor a Hugging Face checkpoint directory (no config.json): point it at one")


def _is_hf(path: str) -> bool:
    root = epath.Path(path)
    return (root / "config.json").exists() and not (root / "checkpoints").exists()


def _restore_params(path: str, src, mc, trainer) -> dict:
    """The parameters of a workdir's latest checkpoint, placed on this run's mesh, then on the host."""
    for name in ("mesh_shape", "logical_axis_rules", "fsdp", "batch_size", "grad_accum_steps"):
        src[name] = trainer.config[name]  # where and how this run computes, not what the source is
    source_trainer = Trainer(src, mc, mesh=trainer.mesh)
    checkpointer = Checkpointer(path, keep=src.keep_checkpoints, async_save=False)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise ConfigError(f"config.init_from={path!r}: the workdir holds no complete checkpoint yet")
        state, _ = checkpointer.restore(step, source_trainer.abstract_sharded_state())
    finally:
        checkpointer.close()
    return _to_host(state.params)


def _to_host(tree) -> dict:
    """Global arrays -> full NumPy arrays on every host."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(fetch, tree)


def _refuse(field: str, mine, theirs, source: str, why: str) -> None:
    raise ConfigError(f"config.{field}={mine!r} but the config.init_from source {source} has {theirs!r}: "
                      f"{why}; set --config.{field}={theirs!r}")


def check_compatible(config, mc, src_mc, source: str) -> None:
    """Refuse, naming the field, a model whose parameters cannot all be copied from the source's."""
    for field, attr in SAME_MODEL_FIELDS:
        if getattr(mc, attr) != getattr(src_mc, attr):
            _refuse(f"model.{field}", getattr(mc, attr), getattr(src_mc, attr), source,
                    "the copied weights keep the source's shapes")
    src_stacks = {name: (depth, every) for name, depth, every in src_mc.family.stacks(src_mc)}
    for name, depth, every in mc.family.stacks(mc):
        src_depth, src_every = src_stacks[name]
        if depth != src_depth:
            _refuse(f"model.num_{name}_layers", depth, src_depth, source, "layers are copied one by one")
        kinds = {(_sparse(i, every), _sparse(i, src_every)) for i in range(depth)}
        if (False, True) in kinds:
            raise ConfigError(f"config.model.{name}_moe_every={every}: the config.init_from source {source} "
                              f"has an MoE layer (model.{name}_moe_every={src_every}) where this model has "
                              "a dense FFN, and experts are not merged back into one FFN: make every "
                              f"sparse layer of the source sparse here too (e.g. {name}_moe_every="
                              f"{src_every})")
        if (False, False) in kinds:
            for field in ("d_ff", "activation"):
                if getattr(mc, field) != getattr(src_mc, field):
                    _refuse(f"model.{field}", getattr(mc, field), getattr(src_mc, field), source,
                            "dense FFNs are copied")
        if (True, False) in kinds:
            _check_upcycled(mc, src_mc, source)
        if (True, True) in kinds:
            for field in SAME_SPARSE_FIELDS:
                if getattr(mc.moe, field) != getattr(src_mc.moe, field):
                    _refuse(f"moe.{field}", getattr(mc.moe, field), getattr(src_mc.moe, field), source,
                            "MoE layers are copied expert by expert")
    if config.upcycle_noise and not _upcycles(mc, src_mc):
        raise ConfigError(f"config.upcycle_noise={config.upcycle_noise} does not apply: no MoE layer of this "
                          f"model is upcycled from a dense FFN of {source}; leave it at 0")


def _check_upcycled(mc, src_mc, source: str) -> None:
    for field in ("d_ff", "activation"):
        if getattr(mc.moe, field) != getattr(src_mc, field):
            _refuse(f"moe.{field}", getattr(mc.moe, field), getattr(src_mc, field), source,
                    f"each expert is a copy of the source's dense FFN (its model.{field})")
    if mc.moe.num_shared_experts:
        raise ConfigError(f"config.moe.num_shared_experts={mc.moe.num_shared_experts}: upcycling copies the "
                          "dense FFN into every routed expert, and a shared expert beside them would add it "
                          "twice; set it to 0 or initialise from a checkpoint that has shared experts")


def _sparse(layer: int, every: int) -> bool:
    """Whether layer `layer` (0-based) of a stack is an MoE layer: the last of each unit of `every`."""
    return bool(every) and layer % every == every - 1


def _upcycles(mc, src_mc) -> bool:
    src_every = {name: every for name, _, every in src_mc.family.stacks(src_mc)}
    return any(_sparse(i, every) and not _sparse(i, src_every[name])
               for name, depth, every in mc.family.stacks(mc) for i in range(depth))


def check_vocabulary(config, src, tokenizer_path: str, source: str) -> str:
    """Refuse a run whose vocabulary differs from the source's (the copied embeddings would stand for
    other tokens); returns what was checked, for the log."""
    if config.data.extra_ids != src.data.extra_ids:
        _refuse("data.extra_ids", config.data.extra_ids, src.data.extra_ids, source,
                "the sentinels' ids are counted from the top of the vocabulary")
    d = src.data
    theirs = d.tokenizer or tokenizer.cache_path(sources.resolve_data_dir(d.data_dir),
                                                 sources.dataset_tag(d.dataset, d.corpus_max_files),
                                                 d.spm_vocab_size)
    if not d.tokenizer and _is_hf(source):
        return "vocabulary not checked (the Hugging Face source has no spiece.model)"
    if not epath.Path(theirs).exists():
        return f"vocabulary not checked (the source's {theirs} is not on this machine)"
    if epath.Path(theirs).read_bytes() != epath.Path(tokenizer_path).read_bytes():
        raise ConfigError(f"config.data.tokenizer: this run's vocabulary {tokenizer_path} differs from the "
                          f"one the config.init_from source {source} was trained with, {theirs}: the copied "
                          f"embeddings would stand for other tokens; set --config.data.tokenizer={theirs}")
    return f"same vocabulary as the source ({theirs})"


def compose(fresh: dict, source: dict, mc, src_mc, counts: dict, *, noise: float, seed: int) -> dict:
    """This model's parameters: `fresh` (its initialisation, NumPy) with the source's copied in, layer by
    layer; counts['copied' | 'upcycled' | 'fresh'] count the arrays of each kind."""
    stacks = {name: every for name, _, every in mc.family.stacks(mc)}
    src_stacks = {name: every for name, _, every in src_mc.family.stacks(src_mc)}
    out = {}
    for key in _same_keys(fresh, source, ""):
        if key not in stacks:
            out[key] = _copy(fresh[key], source[key], key, counts)
            continue
        layers = [_layer(t, s, f"{key}/layer {i}", counts, noise, seed) for i, (t, s) in enumerate(zip(
            _split_units(fresh[key]["units"], stacks[key], mc.scan_layers),
            _split_units(source[key]["units"], src_stacks[key], src_mc.scan_layers)))]
        rest = {k: v for k, v in fresh[key].items() if k != "units"}
        out[key] = {**_copy(rest, {k: v for k, v in source[key].items() if k != "units"}, key, counts),
                    "units": _join_units(layers, stacks[key], mc.scan_layers)}
    return out


def _same_keys(fresh: dict, source: dict, path: str) -> list:
    if set(fresh) != set(source):
        missing, extra = sorted(set(fresh) - set(source), key=str), sorted(set(source) - set(fresh), key=str)
        raise ConfigError(f"config.init_from: at {path or 'the top'} of the parameter tree this model has "
                          f"{missing} that the source lacks and the source {extra} that this model lacks: "
                          "make the architectures match (the refusals above name their fields)")
    return list(fresh)


def _copy(fresh, source, path: str, counts: dict):
    """The source's subtree at `path`, checked against this model's."""
    if isinstance(fresh, dict):
        return {k: _copy(fresh[k], source[k], f"{path}/{k}", counts) for k in _same_keys(fresh, source, path)}
    if fresh.shape != source.shape:
        raise ConfigError(f"config.init_from: parameter {path} is {fresh.shape} here but {source.shape} in "
                          "the source: make the field that sets that width match the source's")
    counts["copied"] += 1
    return np.asarray(source, fresh.dtype)


def _layer(fresh: dict, source: dict, path: str, counts: dict, noise: float, seed: int) -> dict:
    """One layer: copied, except an MoE FFN over a dense source FFN, which is upcycled."""
    if "experts" not in fresh["ffn"] or "experts" in source["ffn"]:
        return _copy(fresh, source, path, counts)
    out = {k: _copy(fresh[k], source[k], f"{path}/{k}", counts)
           for k in _same_keys(fresh, source, path) if k != "ffn"}
    counts["fresh"] += len(jax.tree.leaves(fresh["ffn"]["router"]))
    experts = jax.tree_util.tree_map_with_path(  # {wi: {0: [E, D, F], ...}, wo: [E, F, D]}
        lambda key, t, s: _experts(t, s, f"{path}/ffn/experts{jax.tree_util.keystr(key)}", noise, seed),
        fresh["ffn"]["experts"], source["ffn"])
    counts["upcycled"] += len(jax.tree.leaves(experts))
    return {**out, "ffn": {"router": fresh["ffn"]["router"], "experts": experts}}


def _experts(fresh: np.ndarray, dense: np.ndarray, path: str, noise: float, seed: int) -> np.ndarray:
    """E copies of a dense FFN weight, plus noise of std `noise` x its std: [D, F] -> [E, D, F]."""
    if fresh.shape[1:] != dense.shape:
        raise ConfigError(f"config.init_from: the experts at {path} are {fresh.shape[1:]} each but the "
                          f"source's dense FFN is {dense.shape}: set moe.d_ff to the source's model.d_ff")
    copies = np.broadcast_to(dense, fresh.shape)  # [D, F] -> [E, D, F]
    if noise:
        rng = np.random.default_rng([seed % 2 ** 32, zlib.crc32(path.encode())])
        copies = copies + noise * np.std(dense) * rng.standard_normal(fresh.shape)  # [E, D, F]
    return np.asarray(copies, fresh.dtype)


def _split_units(units: dict, every: int, scanned: bool) -> list[dict]:
    """A stack's units -> its layers in order: unit u holds layers u * P .. u * P + P - 1 (P = every or 1)."""
    size = max(every, 1)
    if not scanned:
        return [units[u]["layers"][i] for u in sorted(units) for i in range(size)]
    count = len(jax.tree.leaves(units)[0])  # leaves [U, ...]
    return [jax.tree.map(lambda x: x[u], units["layers"][i]) for u in range(count) for i in range(size)]


def _join_units(layers: list[dict], every: int, scanned: bool) -> dict:
    """The inverse of _split_units."""
    size = max(every, 1)
    count = len(layers) // size
    if not scanned:
        return {u: {"layers": {i: layers[u * size + i] for i in range(size)}} for u in range(count)}
    # U x [...] -> [U, ...] for each position in the unit
    return {"layers": {i: jax.tree.map(lambda *xs: np.stack(xs), *layers[i::size]) for i in range(size)}}
