"""Prove a training step fits a Cloud TPU before renting one: lower and compile the real step for a
TPU topology on any machine (libtpu's ahead-of-time compiler, via jax.experimental.topologies),
then report per-device memory against the chip's HBM and the compiler's cost estimate.

    pip install -e ".[tpu]"
    JAX_PLATFORMS=cpu python -m moe_jax.aot --config=configs/switch_base.py --topology=v5e-16

Exits 1, saying by how much, when the step does not fit. Accelerator types are Cloud TPU's names:
v4-N and v5p-N count TensorCores (two per chip), v5e-N (v5litepod-N) and v6e-N count chips.
"""
from __future__ import annotations

import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from moe_jax import configuration, sharding
from moe_jax.data import options as data_options
from moe_jax.trainer import Trainer

# Compiling needs no TPU: let libtpu load while another process (a second check, a TPU test) holds
# /tmp/libtpu_lockfile, instead of refusing and telling the user to reinstall it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
GIB = 1024 ** 3
# generation -> (topology name prefix, HBM per chip in GiB, TensorCores per chip counted in the type name)
GENERATIONS = {"v4": ("v4", 32, 2), "v5p": ("v5p", 95, 2), "v5e": ("v5e", 16, 1), "v5litepod": ("v5e", 16, 1),
               "v6e": ("v6e", 32, 1)}
GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
           512: "8x8x8", 1024: "8x8x16"}


class TopologyError(ValueError):
    pass


def parse_accelerator_type(name: str) -> tuple[str, int, float]:
    """'v5e-16' -> (libtpu topology name 'v5e:4x4', chips 16, HBM GiB per chip 16)."""
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not match:
        raise TopologyError(f"--topology must be a Cloud TPU accelerator type such as v4-8, v5e-16, "
                            f"v5p-32 or v6e-8; got {name!r}")
    generation, count = match.group(1), int(match.group(2))
    prefix, hbm, cores_per_chip = GENERATIONS[generation]
    chips = count // cores_per_chip
    grid = (GRID_3D if prefix in ("v4", "v5p") else GRID_2D).get(chips)
    if grid is None or count % cores_per_chip:
        raise TopologyError(
            f"no known slice shape for {name!r} ({chips} chips); known sizes: "
            f"{sorted(g * cores_per_chip for g in (GRID_3D if prefix in ('v4', 'v5p') else GRID_2D))}")
    return f"{prefix}:{grid}", chips, hbm


def abstract_batch(trainer: Trainer, config) -> dict:
    """Shapes of one global batch of the config's objective, laid out over the batch shards."""
    plan = data_options.plan(config)
    shapes = trainer.model_cfg.family.feature_shapes(config.batch_size, plan.inputs_len, plan.targets_len)
    return {name: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=trainer.batch_sharding)
            for name, (shape, dtype) in shapes.items()}


def per_device_bytes(abstract_tree) -> int:
    """Bytes of the largest shard of each array, summed: one device's share."""
    total = 0
    for a in jax.tree.leaves(abstract_tree):
        shard = a.sharding.shard_shape(a.shape)
        total += math.prod(shard) * jnp.dtype(a.dtype).itemsize
    return total


COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-reduce", "all-gather", "reduce-scatter",
               "collective-permute")


def collective_counts(hlo_text: str) -> dict[str, int]:
    """How many of each cross-device operation the compiled program holds (async pairs counted once):
    expert parallelism shows up as all-to-all, the batch's gradients as all-reduce/reduce-scatter."""
    ops = re.findall(r" (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo_text)
    return {op: ops.count(op) for op in COLLECTIVES if op in ops}


def compile_check(config, topology: str) -> dict:
    """Compile config's train step for `topology`; returns the memory and cost report."""
    topo_name, chips, hbm_per_chip = parse_accelerator_type(topology)
    from jax.experimental import topologies  # noqa: PLC0415

    try:
        # A single-chip slice is its own host (libtpu's default host is 2x2 chips).
        host = {"chips_per_host_bounds": (1, 1, 1)} if chips == 1 else {}
        devices = topologies.get_topology_desc(topology_name=topo_name, platform="tpu", **host).devices
    except Exception as e:  # libtpu missing or refusing the name: say what to do
        raise TopologyError(f"cannot describe TPU topology {topo_name!r}: {e}. Install libtpu with "
                            "`pip install -e .[tpu]`.") from None
    model_cfg = configuration.validate(config)
    mesh = sharding.make_mesh(config.mesh_shape, devices)
    trainer = Trainer(config, model_cfg, mesh=mesh)
    state = trainer.abstract_sharded_state()
    batch = abstract_batch(trainer, config)
    hbm_per_device = hbm_per_chip * chips * GIB / len(devices)
    refused = {"topology": f"{topology} ({topo_name}, {len(devices)} devices)", "mesh": dict(mesh.shape),
               "fits": False, "params_bytes": per_device_bytes(state.params),
               "opt_state_bytes": per_device_bytes(state.opt_state), "hbm_bytes": hbm_per_device}
    if refused["params_bytes"] + refused["opt_state_bytes"] > hbm_per_device:
        # Hopeless before compiling: the state alone overflows a device.
        return {**refused, "reason": "parameters and optimizer state alone exceed a device's HBM"}
    start = time.perf_counter()
    try:
        compiled = trainer.jit_train_step().lower(state, batch).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The TPU compiler refuses programs that cannot fit; report it as a failed check.
        return {**refused, "reason": "the TPU compiler refused the step: " + str(e).split("\n")[0]}
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    collectives = collective_counts(compiled.as_text())
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    return {
        "topology": f"{topology} ({topo_name}, {len(devices)} devices, {devices[0].device_kind})",
        "mesh": dict(mesh.shape), "compile_seconds": seconds,
        "params_bytes": per_device_bytes(state.params), "opt_state_bytes": per_device_bytes(state.opt_state),
        "batch_bytes": per_device_bytes(batch), "arguments_bytes": mem.argument_size_in_bytes,
        "outputs_bytes": mem.output_size_in_bytes, "aliased_bytes": mem.alias_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes, "code_bytes": mem.generated_code_size_in_bytes,
        "peak_bytes": peak, "hbm_bytes": hbm_per_device,
        "flops_per_device": float(cost.get("flops", float("nan"))),
        "bytes_accessed_per_device": float(cost.get("bytes accessed", float("nan"))),
        "collectives": collectives, "fits": peak <= hbm_per_device,
    }


def format_report(r: dict) -> str:
    def gib(b):
        return f"{b / GIB:8.3f} GiB" if b >= GIB / 10 else f"{b / 1024 ** 2:8.3f} MiB"

    if "reason" in r:
        return (f"train step for {r['topology']}, mesh {r['mesh']}: {r['reason']}\n"
                f"per device: parameters {gib(r['params_bytes'])}, "
                f"optimizer state {gib(r['opt_state_bytes'])}, HBM {gib(r['hbm_bytes'])}")
    lines = [f"train step compiled for {r['topology']} in {r['compile_seconds']:.1f} s, mesh {r['mesh']}",
             "per device:",
             f"  parameters        {gib(r['params_bytes'])}",
             f"  optimizer state   {gib(r['opt_state_bytes'])}",
             f"  batch             {gib(r['batch_bytes'])}",
             f"  temporaries       {gib(r['temp_bytes'])}",
             f"  code              {gib(r['code_bytes'])}",
             f"  peak (args + outputs - donated + temps + code) {gib(r['peak_bytes'])} "
             f"of {gib(r['hbm_bytes'])} HBM ({100 * r['peak_bytes'] / r['hbm_bytes']:.1f}%)",
             f"compiler cost estimate per device, loop bodies counted once (one unit of a scanned stack, "
             f"one micro-batch): {r['flops_per_device'] / 1e12:.3f} TFLOPs, "
             f"{r['bytes_accessed_per_device'] / GIB:.2f} GiB accessed",
             "collectives in the step: "
             + (", ".join(f"{op} x{n}" for op, n in r["collectives"].items()) or "none")]
    return "\n".join(lines)


_FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command line's flags, defined when it runs: importing this module (moe_jax.cost_model does)
    defines none, so another tool's --config and --topology do not clash with these."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("topology", "v5e-16",
                        "Cloud TPU accelerator type (v4-8, v5e-16, v5p-32, v6e-8, ...).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    report = compile_check(_FLAGS.config, _FLAGS.topology)
    print(format_report(report))
    if not report["fits"]:
        over = ("" if "peak_bytes" not in report
                else f" needs {(report['peak_bytes'] - report['hbm_bytes']) / GIB:.2f} GiB more than "
                     "a device's HBM and")
        fsdp = "" if _FLAGS.config.fsdp else "set config.fsdp=True (every weight over every device), "
        sys.exit(f"error: the step{over} does not fit: shard more (config.mesh_shape), {fsdp}"
                 "lower config.batch_size, raise config.grad_accum_steps, "
                 "or set config.model.remat='minimal' or 'full'")


def run() -> None:
    _define_flags()
    configuration.make_configs_importable(sys.argv)
    try:
        app.run(main)
    except (ValueError, TopologyError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run()
