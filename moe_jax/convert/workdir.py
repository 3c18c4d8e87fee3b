"""An imported checkpoint as a moe_jax workdir, and a workdir's checkpoint back to Hugging Face.

Import writes what `python -m moe_jax.main` reads: <workdir>/config.py, a self-contained config
file (the imported ConfigDict as a literal, so it needs no configs/ package beside it) to pass as
--config, and an Orbax checkpoint of step 0 (moe_jax.checkpoints.Checkpointer's layout: the
TrainState with the imported parameters, a fresh optimizer state and RNG streams, the config, and
no data-iterator position, so training from it starts the data at the beginning). --mode=eval
and --mode=infer then use it; so does training (fine-tuning), with the same config. The main job
refuses a config that differs from the checkpoint's in anything but the run-control fields, so
the data, batch and length fields are set at import (`overrides`).
Export restores the latest checkpoint with the config saved in it and writes the HF directory.
"""
from __future__ import annotations

import ast
import os
import pprint

import jax
import ml_collections
import numpy as np
from flax import nnx

from moe_jax import configuration, convert, paths
from moe_jax.checkpoints import Checkpointer
from moe_jax.convert.hf_io import ConversionError
from moe_jax.models import build_model

CONFIG_FILE = "config.py"
TEMPLATE = '''"""moe_jax config imported from the Hugging Face checkpoint {source}
by `python -m moe_jax.convert import`; its checkpoint is in this workdir. Use it as
    python -m moe_jax.main --config={path} --workdir={workdir} --mode=eval
"""
import ml_collections

CONFIG = {literal}


def get_config():
    return ml_collections.ConfigDict(CONFIG)
'''


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """'field.sub=value' assignments (values as Python literals, else strings), type-checked by the
    ConfigDict; an unknown field is a ConversionError naming it."""
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep:
            raise ConversionError(f"--config override {item!r} must be <field>=<value>")
        name = name.removeprefix("config.")
        node, parts = config, name.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ConversionError(f"--config.{name}: config has no section {part!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConversionError(f"--config.{name}: unknown config field; its section has "
                                  f"{sorted(node.keys())}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(node[parts[-1]], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            node[parts[-1]] = value
        except TypeError as e:
            raise ConversionError(f"--config.{name}={text}: {e}") from None


def write_config_file(config: ml_collections.ConfigDict, workdir: str, source: str) -> str:
    path = os.path.join(workdir, CONFIG_FILE)
    literal = pprint.pformat(config.to_dict(), width=100, sort_dicts=True)
    with open(path, "w") as f:
        f.write(TEMPLATE.format(source=source, path=path, workdir=workdir, literal=literal))
    return path


def import_checkpoint(hf_dir: str, workdir: str, overrides: list[str] = ()) -> str:
    """HF directory -> workdir with config.py and the step-0 checkpoint; returns the config path."""
    from moe_jax.trainer import Trainer  # noqa: PLC0415 (imports optax; keep `import convert` light)

    config, model = convert.from_hf(hf_dir)
    apply_overrides(config, list(overrides))
    try:
        model_cfg = configuration.validate(config)
    except ValueError as e:
        raise ConversionError(f"the imported config is refused: {e} "
                              "(adjust it with --config.<field>=...)") from None
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, async_save=False)
    try:
        if checkpointer.latest_step() is not None:
            raise ConversionError(f"{workdir} already holds checkpoints (latest step "
                                  f"{checkpointer.latest_step()}): import into an empty --workdir")
        trainer = Trainer(config, model_cfg)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        state = trainer.init_state(config.seed)
        state = state.replace(params=params, opt_state=trainer.tx.init(params))
        checkpointer.save(0, jax.device_put(state, trainer.state_sharding), None, config)
        checkpointer.wait()
    finally:
        checkpointer.close()
    return write_config_file(config, workdir, hf_dir)


def saved_config(workdir: str) -> ml_collections.ConfigDict:
    """The config saved with the workdir's latest checkpoint (JSON lists back to the tuples configs hold)."""
    if not (paths.resolve(workdir) / "checkpoints").exists():
        raise ConversionError(f"{workdir} holds no checkpoints/ to export")
    checkpointer = Checkpointer(workdir, keep=1, async_save=False)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise ConversionError(f"{workdir} holds no checkpoint to export")
        saved = checkpointer.saved_config(step)
    finally:
        checkpointer.close()

    def tuples(x):
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x
    for name in ("mesh_shape", "logical_axis_rules"):
        saved[name] = tuples(saved[name])
    return ml_collections.ConfigDict(saved)


def export_checkpoint(workdir: str, hf_dir: str, **options) -> dict:
    """The workdir's latest checkpoint -> HF directory (options: those of convert.to_hf)."""
    from moe_jax.trainer import Trainer  # noqa: PLC0415

    config = saved_config(workdir)
    model_cfg = configuration.validate(config)
    trainer = Trainer(config, model_cfg)
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, async_save=False)
    try:
        state, _ = checkpointer.restore(checkpointer.latest_step(), trainer.abstract_sharded_state())
    finally:
        checkpointer.close()
    model = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, jax.tree.map(np.asarray, state.params))
    return convert.to_hf(config, nnx.merge(graphdef, params, rest), hf_dir, **options)
