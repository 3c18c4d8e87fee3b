"""The TPU compiler's cost model as a benchmark, on any machine: compile a program for a Cloud TPU
topology (libtpu through jax.experimental.topologies; accelerator types as moe_jax.aot parses them),
read the compiler's time estimate, and set it against a roofline floor of the MoE layer on that chip
(Williams, Waterman and Patterson 2009, "Roofline"; the layer is GShard's, Lepikhin et al. 2020).

Caveats of the estimate (libtpu 0.0.42, jax 0.10.2): each ConcatBitcast custom call the compiler
inserts, and each PrepareAsyncCallStart and PrepareAsyncCallDone (multi-chip programs), lowers
`optimal_seconds` by exactly 1 s, so their count is added back; Pallas kernels are
costed only by their declared pl.CostEstimate; collectives carry no inter-chip time.

Roofline of one forward + backward: every matmul (C[M, N] = A[M, K] B[K, N], and the backward's
dA = dC B^T and dB = A^T dC, the same FLOPs and bytes) costs the larger of its FLOPs over the chip's
peak and its operands read once plus its result written once over the HBM bandwidth, at its actual
shapes: the router's [T, D] x [D, E] in float32, and each expert's [G*C, D] x [D, F] and
[G*C, F] x [F, D] in the compute dtype. Each move of the tokens (dispatch and combine, forward and
backward) adds one read of the rows it moves from and one write of the rows it moves to.
"""
from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp

from moe_jax import accounting, aot, configuration, sharding

# Google's published per-chip figures (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): peak dense
# bfloat16 FLOP/s and HBM bytes/s. A JAX device is one chip (v4 and v5p: both TensorCores, megacore).
CHIP_PEAKS = {"v4": (275e12, 1200e9), "v5e": (197e12, 819e9), "v5p": (459e12, 2765e9),
              "v6e": (918e12, 1640e9)}
INSTALL = "pip install -e .[tpu]"
# Custom calls the compiler inserts and its cost model cannot cost: each lowers optimal_seconds by 1 s.
UNCOSTED = re.compile(r'custom_call_target="(?:ConcatBitcast|PrepareAsyncCallStart|PrepareAsyncCallDone)"')


def tpu_devices(accelerator_type: str) -> list:
    """The TPU devices of a Cloud TPU accelerator type ('v5e-1', 'v5e-16'), to compile for."""
    topo_name, chips, _ = aot.parse_accelerator_type(accelerator_type)
    from jax.experimental import topologies  # noqa: PLC0415

    host = {"chips_per_host_bounds": (1, 1, 1)} if chips == 1 else {}  # one chip is its own host
    try:
        return list(topologies.get_topology_desc(topology_name=topo_name, platform="tpu", **host).devices)
    except Exception as e:  # libtpu missing or refusing the name: say what to do
        raise aot.TopologyError(f"cannot describe TPU topology {topo_name!r} for --topology="
                                f"{accelerator_type}: {e}. The TPU compiler is libtpu: install it with "
                                f"`{INSTALL}`.") from None


def chip_peaks(accelerator_type: str) -> tuple[float, float]:
    """(peak bf16 FLOP/s, HBM bytes/s) of one chip of the accelerator type."""
    return CHIP_PEAKS[aot.parse_accelerator_type(accelerator_type)[0].split(":")[0]]


def uncosted_calls(hlo_text: str) -> int:
    """How many ConcatBitcast and PrepareAsyncCall{Start,Done} custom calls the compiled program holds
    (each costs -1 s of estimate)."""
    return len(UNCOSTED.findall(hlo_text))


CYCLES, OP_NAME = re.compile(r'estimated_cycles":"(\d+)"'), re.compile(r'op_name="([^"]*)"')
LAYOUT, SHAPE = re.compile(r"\{[^}]*\}"), re.compile(r"\([^)]*\)|\S+")  # layout; (tuple) or array


def breakdown(hlo_text: str, top: int) -> list[dict]:
    """The `top` instructions of the compiled program's entry computation with the most estimated
    cycles (the figure the compiler writes in each fusion's backend config): cycles, share of all
    such cycles, result shape and the JAX operation it came from. Custom calls (Pallas kernels,
    ConcatBitcast) carry no figure and are not listed; the estimate is not the cycles' sum (the
    model overlaps copies and compute)."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    rows = []
    for line in entry.splitlines():
        cycles = CYCLES.search(line)
        if cycles:
            op = OP_NAME.search(line)
            shape = SHAPE.match(LAYOUT.sub("", line.strip().split(" = ", 1)[1])).group(0)
            rows.append(dict(cycles=int(cycles.group(1)), shape=shape, op=op.group(1) if op else "?"))
    total = sum(r["cycles"] for r in rows) or 1
    rows.sort(key=lambda r: -r["cycles"])
    return [dict(r, share=r["cycles"] / total) for r in rows[:top]]


def breakdown_lines(rows: list[dict]) -> list[str]:
    return [f"#   {r['share']:6.1%} {r['cycles']:>9,} cycles  {r['shape']:<24} {r['op']}" for r in rows]


def estimate(compiled) -> dict:
    """The compiler's cost analysis of a compiled program, its time corrected for uncosted calls."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n = uncosted_calls(compiled.as_text())
    return dict(est_ms=1e3 * (cost["optimal_seconds"] + n), flops=float(cost["flops"]),
                bytes_accessed=float(cost["bytes accessed"]), uncosted_calls=n)


def compile_on(jitted, args, device):
    """jitted compiled for `device` at the shapes and dtypes of args (a pytree): nothing is allocated."""
    where = jax.sharding.SingleDeviceSharding(device)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where), args)
    with sharding.compiling_for(device.platform):
        return jitted.lower(*abstract).compile()


# ----------------------------------------------------------------------------- roofline
def matmul_seconds(m: int, k: int, n: int, itemsize: int, peaks: tuple[float, float]) -> float:
    """[M, K] x [K, N]: the larger of FLOPs / peak and (A + B read, C written) / bandwidth."""
    flops_per_s, bytes_per_s = peaks
    return max(2 * m * k * n / flops_per_s, (m * k + k * n + m * n) * itemsize / bytes_per_s)


def trained_matmul_seconds(m: int, k: int, n: int, itemsize: int, peaks) -> float:
    """Forward C = A B and backward dA = dC B^T, dB = A^T dC: three products of the same cost."""
    return 3 * matmul_seconds(m, k, n, itemsize, peaks)


def ffn_seconds(rows: int, d_model: int, d_ff: int, n_mats: int, itemsize: int, peaks) -> float:
    """One FFN's n_mats matmuls (n_mats - 1 inputs D -> F, one output F -> D), forward + backward."""
    return ((n_mats - 1) * trained_matmul_seconds(rows, d_model, d_ff, itemsize, peaks)
            + trained_matmul_seconds(rows, d_ff, d_model, itemsize, peaks))


def layer_roofline_ms(*, tokens: int, d_model: int, d_ff: int, experts: int, rows_per_expert: int,
                      n_mats: int, itemsize: int, peaks, routed: bool = True) -> float:
    """The MoE layer's floor (see the module doc): router, E experts of G*C rows, four token moves;
    routed=False: the experts alone."""
    ffns = experts * ffn_seconds(rows_per_expert, d_model, d_ff, n_mats, itemsize, peaks)
    if not routed:
        return 1e3 * ffns
    router = trained_matmul_seconds(tokens, d_model, experts, 4, peaks)  # float32 router
    moves = 4 * (tokens + experts * rows_per_expert) * d_model * itemsize / peaks[1]
    return 1e3 * (router + ffns + moves)


def dense_roofline_ms(*, tokens: int, d_model: int, d_ff: int, n_mats: int, itemsize: int, peaks) -> float:
    return 1e3 * ffn_seconds(tokens, d_model, d_ff, n_mats, itemsize, peaks)


# ----------------------------------------------------------------------------- benchmark points
def program_estimate(jitted, args, accelerator_type: str, top: int = 0) -> dict:
    """jitted(*args) compiled for one chip of the topology: the compiler's figures and compile time;
    top > 0: also its `breakdown` (that many instructions)."""
    device = tpu_devices(accelerator_type)[0]
    start = time.perf_counter()
    compiled = compile_on(jitted, args, device)
    rec = dict(topology=accelerator_type, compile_s=time.perf_counter() - start, **estimate(compiled))
    return {**rec, "breakdown": breakdown(compiled.as_text(), top)} if top else rec


def dense_point(program, accelerator_type: str, tokens, d_model, d_ff, n_mats, itemsize) -> dict:
    """The dense FFN's (jitted, args) on the cost model, with its roofline."""
    return dict(**program_estimate(*program, accelerator_type), roofline_ms=dense_roofline_ms(
        tokens=tokens, d_model=d_model, d_ff=d_ff, n_mats=n_mats, itemsize=itemsize,
        peaks=chip_peaks(accelerator_type)))


def layer_point(rec: dict, program, dense: dict, accelerator_type: str, rows_per_expert: int, *,
                routed: bool, top: int = 0) -> dict:
    """A bench layer record (rec) with the layer's (jitted, args) on the cost model, against the
    dense twin's dense_point and the roofline: est_ms, dense_est_ms, ratio, roofline_ms, ..."""
    roofline = layer_roofline_ms(
        tokens=rec["tokens"], d_model=rec["d_model"], d_ff=rec["d_ff"], experts=rec["num_experts"],
        rows_per_expert=rows_per_expert, n_mats=3 if rec["gated"] else 2,
        itemsize=jnp.dtype(rec["dtype"]).itemsize, peaks=chip_peaks(accelerator_type), routed=routed)
    est = program_estimate(*program, accelerator_type, top)
    return {**rec, **est, "roofline_ms": roofline, "dense_est_ms": dense["est_ms"],
            "dense_roofline_ms": dense["roofline_ms"], "ratio": est["est_ms"] / dense["est_ms"],
            "est_over_roofline": est["est_ms"] / roofline}


def train_step_estimate(config, accelerator_type: str) -> dict:
    """Compile config's train step for the topology (its mesh over all chips): the per-device estimate.

    XLA's cost analysis counts a loop's body once, so the layer stacks are unrolled here
    (model.scan_layers=False: the same computation) and gradient accumulation is refused."""
    from moe_jax.trainer import Trainer  # noqa: PLC0415

    if config.grad_accum_steps != 1:
        raise ValueError(f"config.grad_accum_steps={config.grad_accum_steps}: the cost model counts the "
                         "accumulation loop's body once; set --config.grad_accum_steps=1 (and lower "
                         "--config.batch_size to one micro-batch if it does not fit)")
    config = config.copy_and_resolve_references()
    config.model.scan_layers = False
    devices = tpu_devices(accelerator_type)
    trainer = Trainer(config, configuration.validate(config),
                      mesh=sharding.make_mesh(config.mesh_shape, devices))
    start = time.perf_counter()
    compiled = trainer.jit_train_step().lower(trainer.abstract_sharded_state(),
                                              aot.abstract_batch(trainer, config)).compile()
    est = estimate(compiled)
    # The accounting's model FLOPs of the step (3x the forward's, active experts only) per device:
    # the compiler's count over it is the padding and recomputation (remat) the program adds.
    model_flops = accounting.account_config(config).training_flops_per_example * config.batch_size
    return dict(topology=accelerator_type, devices=len(devices), compile_s=time.perf_counter() - start,
                **est, examples_per_s=config.batch_size / (est["est_ms"] / 1e3),
                model_flops=model_flops / len(devices),
                flops_over_model=est["flops"] * len(devices) / model_flops)


def train_records(named_configs: list, accelerator_type: str) -> list[dict]:
    """One record per (name, config), then with two configs their est_ms and examples/s ratios."""
    records = [dict(config=name, **train_step_estimate(config, accelerator_type))
               for name, config in named_configs]
    if len(records) == 2:
        a, b = records
        records.append({"config": a["config"], "baseline": b["config"],
                        "est_ms_ratio": a["est_ms"] / b["est_ms"],
                        "examples_per_s_ratio": a["examples_per_s"] / b["examples_per_s"]})
    return records


def train_line(r: dict) -> str:
    if "est_ms_ratio" in r:
        return (f"{r['config']} / {r['baseline']}: est_ms_ratio {r['est_ms_ratio']:.3f}, "
                f"examples/s ratio {r['examples_per_s_ratio']:.3f}")
    return (f"{r['config']}: TPU cost model, {r['topology']} ({r['devices']} chips), compile "
            f"{r['compile_s']:.1f} s, {r['examples_per_s']:,.1f} examples/s; per device: est "
            f"{r['est_ms']:.3f} ms, {r['flops'] / 1e12:.3f} TFLOP, "
            f"{r['bytes_accessed'] / 1e9:.2f} GB accessed, {r['flops_over_model']:.3f}x the accounting's "
            f"{r['model_flops'] / 1e12:.3f} TFLOP")


# ----------------------------------------------------------------------------- table
TABLE_TAIL = ("{est_ms:>9.3f} {dense_est_ms:>9.3f} {ratio:>6.3f} {roofline_ms:>8.3f} "
              "{dense_roofline_ms:>8.3f} {est_over_roofline:>8.3f} {gflop:>8.1f} {gb:>7.2f}")
HEADER_TAIL = dict(est_ms="est ms", dense_est_ms="dense est", ratio="ratio", roofline_ms="roof ms",
                   dense_roofline_ms="dense rf", est_over_roofline="est/roof", gflop="GFLOP", gb="GB")


def row_text(keys: str, rec: dict) -> str:
    """A layer record's table row (keys: the format of its leading columns), then its breakdown."""
    row = (keys + TABLE_TAIL).format(**rec, gflop=rec["flops"] / 1e9, gb=rec["bytes_accessed"] / 1e9)
    return "\n".join([row] + breakdown_lines(rec.get("breakdown", [])))
