"""Checkpoints in the workdir with Orbax: the train state, the data iterator's position and the
config, saved together every checkpoint_every_steps (and on SIGTERM), the last N kept.

Orbax writes each step to a temporary directory and renames it when complete, so a write cut
short (a kill, a full disk) is never taken for a checkpoint and the previous one stays loadable.
A workdir's checkpoints belong to one experiment: resuming with a config that differs in
anything but the run-control fields is refused, with the differences listed, and nothing is
overwritten. Restoring onto other shardings (another mesh) is Orbax's resharding restore.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from moe_jax import paths, validation

# Fields a resumed run may change: how long and how often, never what is trained or on what.
# The mesh only places the same computation on devices, so a run may resume on another one.
RUN_CONTROL_FIELDS = ("num_train_steps", "eval_every_steps", "num_eval_steps", "checkpoint_every_steps",
                      "log_every_steps", "keep_checkpoints", "mesh_shape", "logical_axis_rules",
                      "fsdp")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used, with what to do about it."""


def _reason(error: BaseException) -> str:
    """The gist of a storage error: its first line, without the tensorstore spec it may carry; a long
    one keeps its start (what failed) and its end (the system's reason: "No space left on device")."""
    text = (str(error).splitlines() or [type(error).__name__])[0].split(" [tensorstore_spec=")[0]
    return text if len(text) <= 400 else f"{text[:240]} ... {text[-160:]}"


def config_differences(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
    """'field: saved -> current' for every field that matters to what is trained. The cosine
    schedule's horizon is num_train_steps, so under it a resumed run may not change that field
    (the rate at every later step would move); rsqrt and constant do not depend on it."""
    from moe_jax import configuration  # noqa: PLC0415 (configuration imports the models)

    b = validation.flatten(json.loads(current.to_json()))
    # a field the saved config lacks was added to moe_jax after it was written: it had the base default
    defaults = configuration.base_defaults()
    a = {**{k: defaults[k] for k in b if k in defaults}, **validation.flatten(saved)}
    free = set(RUN_CONTROL_FIELDS)
    if "cosine" in (a.get("schedule"), b.get("schedule")):
        free.discard("num_train_steps")
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
            if k not in free and a.get(k) != b.get(k)]


def _keys_to_data(tree):
    """Typed PRNG keys -> their uint32 data (Orbax saves plain arrays)."""
    return jax.tree.map(
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


def _abstract_key_data(abstract):
    def convert(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
        return x
    return jax.tree.map(convert, abstract)


def _data_to_keys(tree, abstract):
    return jax.tree.map(
        lambda x, a: jax.random.wrap_key_data(x) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else x,
        tree, abstract)


def gather_host_states(state: Any) -> list:
    """Every host's data-iterator state, in process order (each host reads its own shard)."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils  # noqa: PLC0415

    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([raw.size]))  # [P, 1]
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:raw.size] = raw
    rows = multihost_utils.process_allgather(padded)  # [P, max length]
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(rows, lengths.ravel())]


def regroup_host_states(hosts: list, process_count: int, step: int) -> list:
    """The saved hosts' data states dealt to `process_count` hosts: as saved for as many hosts; with a
    fixed data.shards (states {"shards": [...]}), the shards in order, data.shards // hosts each."""
    if len(hosts) == process_count:
        return hosts
    shards = [s for h in hosts for s in h["shards"]] if all("shards" in h for h in hosts) else []
    if not shards or len(shards) % process_count:
        raise CheckpointError(
            f"the checkpoint of step {step} was written by {len(hosts)} host(s), but {process_count} are "
            "running: each host resumes its own data shard. Resume with the same number of hosts, or "
            "train with a fixed data.shards that both host counts divide"
            + (f" (this run's data.shards={len(shards)})" if shards else ""))
    per = len(shards) // process_count
    return [{"shards": shards[i * per:(i + 1) * per]} for i in range(process_count)]


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        self.directory = paths.resolve(workdir) / "checkpoints"  # a local directory or a gs:// URL
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, item_names=("state", "data", "config"),
                options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                     enable_async_checkpointing=async_save))
        except OSError as e:
            raise CheckpointError(f"cannot create the checkpoint directory {self.directory}: {e}. "
                                  "Choose a writable --workdir.") from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def check_compatible(self, config: ml_collections.ConfigDict) -> None:
        step = self.latest_step()
        if step is None:
            return
        diff = config_differences(self.saved_config(step), config)
        if diff:
            raise CheckpointError(
                f"the workdir's checkpoint (step {step}, {self.directory}) was trained with a different "
                "config; refusing to resume or overwrite it. Differences (saved -> now):\n  "
                + "\n  ".join(diff)
                + "\nUse another --workdir, or restore the saved values.")

    def save(self, step: int, state, data_state: Any, config: ml_collections.ConfigDict) -> None:
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_keys_to_data(state)),
                data=ocp.args.JsonSave({"hosts": gather_host_states(data_state)}),
                config=ocp.args.JsonSave(json.loads(config.to_json()))), force=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"could not write the checkpoint of step {step} to {self.directory}: "
                                  f"{_reason(e)}. Earlier checkpoints are intact "
                                  f"(latest: {self.latest_step()}).") from None

    def wait(self) -> None:
        """Block until an asynchronous save has finished; raise CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except (OSError, ValueError) as e:
            raise CheckpointError(f"a checkpoint write to {self.directory} failed: {_reason(e)}. "
                                  f"Earlier checkpoints are intact (latest: {self.latest_step()}).") from None

    def restore(self, step: int, abstract_state) -> tuple[Any, Any]:
        """(state, this host's data iterator state) of a step, placed as abstract_state's shardings say."""
        target = _abstract_key_data(abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        hosts = regroup_host_states(restored["data"]["hosts"], jax.process_count(), step)
        return _data_to_keys(restored["state"], abstract_state), hosts[jax.process_index()]

    def close(self) -> None:
        try:
            self.wait()  # a failed asynchronous save is a CheckpointError here too
        finally:
            self.manager.close()
