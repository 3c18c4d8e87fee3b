"""Benchmarks that print figures (the test suite times nothing): one MoE layer against its
FLOP-matched dense FFN, and the real training step of any config.

    JAX_PLATFORMS=cpu python -m moe_jax.bench layer [--json] [--dispatch=einsum,index,dropless]
        [--experts=8,32,128] [--k=1,2] [--capacity_factor=1.0,1.25,2.0] [--group_size=1024,8192]
        [--activation=relu,swiglu] [--tokens=32768] [--d_model=128] [--d_ff=512] [--seq_len=512]
    JAX_PLATFORMS=cpu python -m moe_jax.bench train --config=configs/switch_tiny.py \\
        [--baseline=configs/dense_tiny.py] [--steps=10] [--compile_only] [--compile_reps=3] [--json]
    JAX_PLATFORMS=cpu python -m moe_jax.bench {layer,train} --topology=v5e-1 [flags]  # TPU cost model

layer: forward + backward (gradients of the parameters and of the input; loss = <y, probe> +
1e-2 x balance loss + 1e-3 x z-loss) of MoELayer on x [B, L, D] (B x L = --tokens), and in the
same run of the dense FFN of width F x k with the same activation. Each time is the median of
--reps jitted calls after a warm-up, the MoE and dense calls interleaved so that a busy machine
slows both alike; ratio = ms / dense_ms, paired = the median over rounds of each MoE call's
time over the dense call's next to it (steadier when the load swings). temp_bytes is the
compiled program's temporary memory (memory_analysis()). floor = 1 + E / (n k F), n = 2 matmuls
per plain expert and 3 per gated one: the router's D x E matmul against the dense twin's; it is
the least `ms / dense_ms` can be at capacity factor 1. tok/exp = T k / E; with few tokens per
expert, reading (and packing) the E x D x F weights and writing their gradients is a cost per
expert that the rows no longer amortise; `--dispatch=experts` times the batched experts alone
(input reshaped to [E, T / E, D], no router, no dispatch) to show that share. A point whose
estimated time exceeds --max_seconds (from its FLOPs and the dense twin's measured speed) is
skipped and said so.

train: lower and compile time, step time and tokens/s (encoder + decoder tokens of a synthetic
batch) of Trainer's jitted train step. --baseline times a second config in the same process,
steps interleaved, and prints the ratios; --compile_only compiles on abstract state only (any
size fits: nothing is allocated) and reports compile times. Lower and compile times are medians
of --compile_reps rounds, the configs interleaved within each round: the first compile in a
process also pays the compiler's own warm-up (about 2 s on XLA:CPU), which a single round would
charge to whichever config comes first.

--topology (a Cloud TPU accelerator type; libtpu, `pip install -e .[tpu]`): compile for one chip
(layer) or the whole slice (train) instead of running, and report the TPU compiler's estimate against
the dense twin (or --baseline) and, per layer point, the chip's roofline (moe_jax.cost_model) and
with --breakdown=N its N costliest instructions; train: the stacks unrolled, FLOPs over the accounting's.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from moe_jax import configuration, cost_model, validation
from moe_jax.experts import FeedForward, is_gated
from moe_jax.moe_config import MoEConfig
from moe_jax.moe_layer import MoELayer

_FLAGS = flags.FLAGS
flags.DEFINE_string("topology", None, "Report the TPU cost model of this accelerator type (v5e-1, ...).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "layer: activation and compute dtype.")
flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "layer: weights' storage dtype.")
flags.DEFINE_bool("json", False, "Print one JSON object per line instead of a table.")
flags.DEFINE_integer("reps", 5, "Timed calls (layer) or steps (train, see --steps) after the warm-up.")
# layer
flags.DEFINE_list("dispatch", ["einsum", "index", "dropless"], "layer: strategies, or 'experts' alone.")
flags.DEFINE_list("experts", ["8", "32", "128"], "layer: numbers of experts E.")
flags.DEFINE_list("k", ["1", "2"], "layer: choices per token.")
flags.DEFINE_list("capacity_factor", ["1.0", "1.25", "2.0"], "layer: capacity factors (<= 0: dropless).")
flags.DEFINE_list("group_size", ["1024", "8192"], "layer: largest routing group S (moe.group_size).")
flags.DEFINE_list("activation", ["relu"], "layer: expert activations (relu, gelu; gated: swiglu, geglu).")
flags.DEFINE_integer("tokens", 32768, "layer: tokens T per call.")
flags.DEFINE_integer("seq_len", 512, "layer: sequence length L (the input is [T / L, L, D]).")
flags.DEFINE_integer("d_model", 128, "layer: model width D.")
flags.DEFINE_integer("d_ff", 512, "layer: expert width F.")
flags.DEFINE_float("max_seconds", 60.0, "layer: skip a point estimated to take longer (compile excluded).")
flags.DEFINE_integer("breakdown", 0, "layer --topology: list each point's N costliest instructions.")
# train
config_flags.DEFINE_config_file("config", None, "train: experiment config file.", lock_config=True)
config_flags.DEFINE_config_file("baseline", None, "train: a second config to compare with.", lock_config=True)
flags.DEFINE_integer("steps", 0, "train: timed steps (0: --reps).")
flags.DEFINE_bool("compile_only", False, "train: only lower and compile the step on abstract state.")
flags.DEFINE_integer("compile_reps", 3, "train: rounds of lowering and compiling each config (medians).")


def device_line() -> str:
    d = jax.devices()[0]
    return f"{jax.default_backend()}: {len(jax.devices())} x {d.device_kind}, {os.cpu_count()} host CPUs"


def emit(record: dict) -> None:
    if _FLAGS.json:
        print(json.dumps(record), flush=True)


def time_interleaved(fns, reps: int, budget: float | None = None) -> list[list[float]] | None:
    """Seconds of each call of each callable over `reps` rounds, one call of each per round, after
    a warm-up round. None when the warm-up round says the rounds would exceed `budget` seconds."""
    start = time.perf_counter()
    for f in fns:
        f()
    if budget is not None and (time.perf_counter() - start) * reps > budget:
        return None
    times = [[] for _ in fns]
    for _ in range(reps):
        for f, t in zip(fns, times):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- layer
def grad_program(module: nnx.Module, x: jax.Array):
    """The jitted forward + backward of `module` at x and its arguments (params, x, probe)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    probe = jax.random.normal(jax.random.key(1), x.shape, x.dtype)  # a random output cotangent

    def loss(params, x, probe):
        out = nnx.merge(graphdef, params, rest, copy=True)(x)
        if isinstance(out, tuple):  # the MoE layer: (y, aux), with its auxiliary losses
            y, aux = out
            return jnp.sum(y * probe) + 1e-2 * aux.balance_loss + 1e-3 * aux.z_loss, y
        return jnp.sum(out * probe), out

    # y is returned, as a layer inside a network hands it on (else XLA drops the last matmul).
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True)), (params, x, probe)


def grad_step(module: nnx.Module, x: jax.Array):
    """A compiled forward + backward of `module` at x: returns (call, compiled)."""
    jitted, args = grad_program(module, x)
    compiled = jitted.lower(*args).compile()
    return (lambda: jax.block_until_ready(compiled(*args))), compiled


def make(build):  # build() -> a module; abstract under --topology (compiled only, nothing allocated)
    return nnx.eval_shape(build) if _FLAGS.topology else build()


def temp_bytes(compiled) -> int:
    mem = compiled.memory_analysis()
    return int(mem.temp_size_in_bytes) if mem is not None else -1


def matmul_flops(dispatch: str, *, T, D, F, E, k, rows, n_mats, einsum_slots) -> float:
    """FLOPs of one forward + backward (3 x forward): experts, router, one-hot dispatch/combine."""
    if dispatch == "dropless" and jax.default_backend() == "cpu":
        rows = T * k * E  # XLA:CPU runs ragged_dot as a dense product over every expert
    flops = 2 * rows * D * F * n_mats + 2 * T * D * E
    if dispatch == "einsum":
        flops += 2 * 2 * T * einsum_slots * D  # [G, S, E, C] x [G, S, D] both ways
    return 3.0 * flops


EXPERTS_ONLY = "experts"  # a pseudo-dispatch: the batched experts alone, no router and no dispatch


class ExpertsOnly(nnx.Module):
    """The layer's experts on its input reshaped to [E, T / E, D]: what the expert matmuls cost in
    the buffer shapes of top-1 routing at capacity factor 1, whatever the dispatch."""

    def __init__(self, experts: FeedForward, num_experts: int):
        self.experts, self.num_experts = experts, num_experts

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.experts(x.reshape(self.num_experts, -1, x.shape[-1])).reshape(x.shape)  # [B, L, D]


# Skip einsum points whose masks alone would take a quarter of the host's memory.
MEMORY_LIMIT = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4 if hasattr(os, "sysconf")
                else 2 ** 33)


def layer_point(dispatch, E, k, cf, max_group, activation, dense) -> dict:
    T, L, D, F = _FLAGS.tokens, _FLAGS.seq_len, _FLAGS.d_model, _FLAGS.d_ff
    n_mats = 3 if is_gated(activation) else 2
    cfg = MoEConfig(num_experts=E, k=k, d_ff=F, activation=activation, train_capacity_factor=cf,
                    group_size=max_group, dispatch="index" if dispatch == EXPERTS_ONLY else dispatch)
    layer = make(lambda: MoELayer(cfg, D, dtype=jnp.dtype(_FLAGS.dtype),
                                  param_dtype=jnp.dtype(_FLAGS.param_dtype), rngs=nnx.Rngs(0)))
    G, S = layer.group_shape(T // L, L)
    C = layer.capacity(S)
    if dispatch == EXPERTS_ONLY:
        layer = ExpertsOnly(layer.experts, E)
    rec = dict(dispatch=dispatch, num_experts=E, k=k, capacity_factor=cf, group_size=S, capacity=C, tokens=T,
               d_model=D, d_ff=F, activation=activation, gated=is_gated(activation),
               tokens_per_expert=T * k / E, dtype=_FLAGS.dtype, param_dtype=_FLAGS.param_dtype,
               floor=1.0 if dispatch == EXPERTS_ONLY else 1 + E / (n_mats * k * F), device=device_line())
    slots = E * (S if C is None else C)  # slots per group
    flops = matmul_flops(dispatch, T=T, D=D, F=F, E=E, k=k,
                         rows=G * slots if dispatch != "dropless" else T * k,
                         n_mats=n_mats, einsum_slots=slots)
    if dispatch == EXPERTS_ONLY and G * slots != T:
        return {**rec, "skipped": "experts-only needs buffers of T rows (k = 1, capacity factor 1, C = S/E)"}
    if _FLAGS.topology:
        return cost_model.layer_point(rec, grad_program(layer, dense["x"]), dense, _FLAGS.topology,
                                      T * k // E if C is None else G * C, routed=dispatch != EXPERTS_ONLY,
                                      top=_FLAGS.breakdown)
    estimate = flops / dense["flops"] * dense["seconds"] * (_FLAGS.reps + 1)
    if estimate > _FLAGS.max_seconds:
        return {**rec, "skipped": f"estimated {estimate:.0f} s > --max_seconds={_FLAGS.max_seconds:.0f}"}
    masks = 4 * 4 * T * slots if dispatch == "einsum" else 0  # float32 [G, S, E, C] x (2 masks + 2 gradients)
    if masks > MEMORY_LIMIT:
        return {**rec, "skipped": f"one-hot masks need about {masks / 2 ** 30:.1f} GiB"}
    x = dense["x"]
    start = time.perf_counter()
    call, compiled = grad_step(layer, x)
    compile_s = time.perf_counter() - start
    times = time_interleaved([call, dense["call"]], _FLAGS.reps, budget=_FLAGS.max_seconds)
    if times is None:
        return {**rec, "skipped": f"warm-up round x {_FLAGS.reps} > --max_seconds={_FLAGS.max_seconds:.0f}"}
    ms, dense_ms = (1e3 * statistics.median(t) for t in times)
    # Each round's MoE call runs next to its dense call: the median of their quotients shrugs off
    # the load swings of a shared machine better than the quotient of the medians.
    paired = statistics.median(a / b for a, b in zip(*times))
    return {**rec, "ms": ms, "dense_ms": dense_ms, "ratio": ms / dense_ms, "paired_ratio": paired,
            "temp_bytes": temp_bytes(compiled), "dense_temp_bytes": dense["temp_bytes"],
            "compile_s": compile_s}


def dense_twin(k: int, activation: str) -> dict:
    T, L, D, F = _FLAGS.tokens, _FLAGS.seq_len, _FLAGS.d_model, _FLAGS.d_ff
    if T % L:
        raise app.UsageError(f"--tokens={T} must be a multiple of --seq_len={L}")
    dtype, n_mats = jnp.dtype(_FLAGS.dtype), 3 if is_gated(activation) else 2
    x = jax.random.normal(jax.random.key(0), (T // L, L, D), jnp.float32).astype(dtype)
    ffn = make(lambda: FeedForward(D, F * k, activation=activation, dtype=dtype,
                                   param_dtype=jnp.dtype(_FLAGS.param_dtype), rngs=nnx.Rngs(0)))
    flops = 3.0 * 2 * T * D * F * k * n_mats
    if _FLAGS.topology:
        return dict(x=x, **cost_model.dense_point(grad_program(ffn, x), _FLAGS.topology,
                                                      T, D, F * k, n_mats, dtype.itemsize))
    call, compiled = grad_step(ffn, x)
    seconds = time_interleaved([call], 1)[0][0]
    return dict(x=x, call=call, seconds=seconds, flops=flops, temp_bytes=temp_bytes(compiled))


KEYS = ("{dispatch:>8} {activation:>6} {num_experts:>4} {k:>2} {capacity_factor:>5} {group_size:>6} "
        "{capacity!s:>5} {tokens_per_expert:>8.0f} ")
TABLE = KEYS + "{ms:>9} {dense_ms:>9} {ratio:>6} {paired_ratio:>6} {floor:>6.3f} {temp:>9}"
HEADER = dict(dispatch="dispatch", activation="act", num_experts="E", k="k", capacity_factor="cf",
              group_size="S", capacity="C", tokens_per_expert="tok/exp")
TIMED = dict(ms="ms", dense_ms="dense ms", ratio="ratio", paired_ratio="paired", floor="floor",
             temp="temp MiB")


def print_row(rec: dict) -> None:
    if _FLAGS.json:
        return emit(rec)
    if _FLAGS.topology and "skipped" not in rec:
        return print(cost_model.row_text(KEYS, rec), flush=True)
    if "skipped" in rec:
        cells = dict(ms="-", dense_ms="-", ratio="-", paired_ratio="-", temp="skipped: " + rec["skipped"])
    else:
        cells = dict(ms=f"{rec['ms']:.1f}", dense_ms=f"{rec['dense_ms']:.1f}", ratio=f"{rec['ratio']:.3f}",
                     paired_ratio=f"{rec['paired_ratio']:.3f}", temp=f"{rec['temp_bytes'] / 2 ** 20:.1f}")
    print(TABLE.format(**{**rec, **cells}), flush=True)


def run_layer() -> None:
    if not _FLAGS.json:
        cost = _FLAGS.topology is not None
        print(f"# {f'TPU cost model, one chip of {_FLAGS.topology}, on ' if cost else ''}{device_line()}; "
              f"T={_FLAGS.tokens} D={_FLAGS.d_model} F={_FLAGS.d_ff} L={_FLAGS.seq_len} {_FLAGS.dtype}, "
              f"weights {_FLAGS.param_dtype}; "
              f"{'' if cost else f'median of {_FLAGS.reps} interleaved calls '}(forward + backward)")
        table, names = (KEYS + cost_model.TABLE_TAIL, cost_model.HEADER_TAIL) if cost else (TABLE, TIMED)
        print(re.sub(r":>(\d+)\.\df", r":>\1", table).format(**HEADER, **names))
    for activation in _FLAGS.activation:
        for k in map(int, _FLAGS.k):
            dense = dense_twin(k, activation)
            for cf in map(float, _FLAGS.capacity_factor):
                for group in map(int, _FLAGS.group_size):
                    for E in map(int, _FLAGS.experts):
                        for dispatch in _FLAGS.dispatch:
                            print_row(layer_point(dispatch, E, k, cf, group, activation, dense))


# ----------------------------------------------------------------------------- train
def synthetic_batch(trainer, config, seed: int = 0) -> dict:
    """One global batch of random tokens shaped like the config's data (numpy, host-local)."""
    from moe_jax.data import options as data_options  # noqa: PLC0415

    plan = data_options.plan(config)
    rng = np.random.default_rng(seed)
    V = config.model.vocab_size
    batch = {}
    for name, (shape, dtype) in trainer.model_cfg.family.feature_shapes(
            config.batch_size, plan.inputs_len, plan.targets_len).items():
        if name.endswith("_tokens"):  # inputs and targets: random ids
            batch[name] = rng.integers(1, V, shape, dtype=np.int32)
        elif name.endswith("_positions"):  # [B, L]: 0 .. L - 1 in every row
            batch[name] = np.tile(np.arange(shape[1], dtype=np.int32), (shape[0], 1))
        else:  # segment ids and loss weights: one unpadded example per row
            batch[name] = np.ones(shape, dtype)
    return batch


class TrainBench:
    """One config's jitted train step: compiled on abstract state, then optionally run."""

    def __init__(self, name: str, config):
        from moe_jax.trainer import Trainer  # noqa: PLC0415

        self.name, self.config = name, config
        self.trainer = Trainer(config, configuration.validate(config))
        self.batch = synthetic_batch(self.trainer, config)
        self.tokens = sum(v.size for k, v in self.batch.items() if k.endswith("_input_tokens"))
        self.record = dict(config=name, device=device_line(), tokens_per_step=self.tokens,
                           params=sum(math.prod(a.shape) for a in jax.tree.leaves(
                               self.trainer.abstract_state().params)))
        self.abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.trainer.batch_sharding)
                               for k, v in self.batch.items()}
        self.compile_times: list[tuple[float, float]] = []

    def compile(self) -> None:
        """Lower and compile the step afresh (a new jit, so nothing is cached); times appended."""
        t0 = time.perf_counter()
        lowered = self.trainer.jit_train_step().lower(self.trainer.abstract_sharded_state(),
                                                      self.abstract_batch)
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        self.compile_times.append((t1 - t0, time.perf_counter() - t1))
        lower_s, compile_s = zip(*self.compile_times)
        self.record.update(lower_s=statistics.median(lower_s), compile_s=statistics.median(compile_s),
                           compile_reps=len(self.compile_times), compile_s_rounds=list(compile_s),
                           temp_bytes=temp_bytes(self.compiled))

    def start(self) -> None:
        self.state = self.trainer.create_state(self.config.seed)
        self.device_batch = self.trainer.shard_batch(self.batch)

    def __call__(self) -> None:
        self.state, metrics = self.compiled(self.state, self.device_batch)
        jax.block_until_ready(metrics)


def config_name(flag: str) -> str:
    name = config_flags.get_config_filename(_FLAGS[flag])
    overrides = config_flags.get_override_values(_FLAGS[flag])
    flat = [f"{k}={v}" for k, v in sorted(validation.flatten(overrides).items())]
    return " ".join([name] + flat)


def run_train() -> None:
    if _FLAGS.config is None:
        raise app.UsageError("train needs --config=configs/<experiment>.py")
    if _FLAGS.compile_reps < 1:
        raise app.UsageError(f"--compile_reps must be >= 1, got {_FLAGS.compile_reps}")
    named = [(config_name("config"), _FLAGS.config)]
    if _FLAGS.baseline is not None:
        named.append((config_name("baseline"), _FLAGS.baseline))
    if _FLAGS.topology:
        for r in cost_model.train_records(named, _FLAGS.topology):
            emit(r) if _FLAGS.json else print(cost_model.train_line(r), flush=True)
        return
    benches = [TrainBench(name, config) for name, config in named]
    for _ in range(_FLAGS.compile_reps):
        for b in benches:
            b.compile()
    if not _FLAGS.compile_only:
        for b in benches:
            b.start()
        times = time_interleaved(benches, _FLAGS.steps or _FLAGS.reps)
        for b, seconds in zip(benches, map(statistics.median, times)):
            b.record.update(step_ms=1e3 * seconds, tokens_per_s=b.tokens / seconds,
                            examples_per_s=b.config.batch_size / seconds, steps=_FLAGS.steps or _FLAGS.reps)
    for b in benches:
        r = b.record
        emit(r)
        if not _FLAGS.json:
            line = (f"{r['config']}: {r['params'] / 1e6:.1f}M parameters, lower {r['lower_s']:.1f} s, "
                    f"compile {r['compile_s']:.1f} s (medians of {r['compile_reps']}; compile rounds "
                    f"{', '.join(f'{t:.1f}' for t in r['compile_s_rounds'])} s), "
                    f"temp {r['temp_bytes'] / 2 ** 20:.0f} MiB")
            if "step_ms" in r:
                line += (f", step {r['step_ms']:.1f} ms (median of {r['steps']}), "
                         f"{r['tokens_per_s']:,.0f} tokens/s, {r['examples_per_s']:.1f} examples/s")
            print(line, flush=True)
    if len(benches) == 2:
        a, b = (x.record for x in benches)
        ratio = {"compile_s_ratio": (a["lower_s"] + a["compile_s"]) / (b["lower_s"] + b["compile_s"])}
        if "tokens_per_s" in a:
            ratio["tokens_per_s_ratio"] = a["tokens_per_s"] / b["tokens_per_s"]
        emit({"config": a["config"], "baseline": b["config"], **ratio})
        if not _FLAGS.json:
            print(f"{a['config']} / {b['config']}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))


def main(argv) -> None:
    if len(argv) != 2 or argv[1] not in ("layer", "train"):
        raise app.UsageError("usage: python -m moe_jax.bench {layer,train} [flags]")
    if not _FLAGS.json:
        print(f"# {' '.join(['python -m moe_jax.bench'] + sys.argv[1:])}")
    run_layer() if argv[1] == "layer" else run_train()


def run() -> None:
    configuration.make_configs_importable(sys.argv)
    try:
        app.run(main)
    except cost_model.aot.TopologyError as e:  # a wrong accelerator type, or libtpu missing
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run()
