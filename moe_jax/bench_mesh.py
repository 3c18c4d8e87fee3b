"""The MoE layer across several TPU chips on the compiler's cost model: experts over every chip
(GShard's expert parallelism, Lepikhin et al. 2020), against its data-parallel dense twin.

    JAX_PLATFORMS=cpu python -m moe_jax.bench_mesh --topology=v5e-4 --tokens=32768 --experts=8,32,128 \\
        --k=2 --capacity_factor=0 --group_size=512 --activation=swiglu --d_model=768 --d_ff=3072

takes the flags of `moe_jax.bench layer`. Per point: the compiler's estimate for one chip of the mesh
(`optimal_seconds`, uncosted custom calls added back; collectives carry no inter-chip time), the dense
twin's (width F x k, batch split over the chips, weights replicated), their ratio, the per-chip
roofline floor (T / n tokens through the router, E / n experts of T k / E rows each, four token
moves) and the cross-chip operations the compiled program holds. A point that does not fit a chip's
HBM is listed with the compiler's error. Compile only: no TPU is needed (libtpu, `pip install -e .[tpu]`).
"""
from __future__ import annotations

import itertools
import json
import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding

from moe_jax import aot, bench, cost_model, sharding  # noqa: F401 (bench: its flags)
from moe_jax.experts import FeedForward, is_gated
from moe_jax.moe_config import MoEConfig
from moe_jax.moe_layer import MoELayer

_F = flags.FLAGS  # the flags of moe_jax.bench layer: --topology, --tokens, --experts, --k, ...
flags.DEFINE_float("ep_buffer_factor", 0.0, "dropless points: moe.ep_buffer_factor (0: nothing dropped)")


def on_mesh(state, mesh, rules):
    """nnx State of Params -> the same tree of ShapeDtypeStructs sharded by their logical axes."""
    def one(v):
        spec = sharding.mesh_spec(v.get_metadata().get("out_sharding"), v.shape, mesh, rules)
        return v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, spec)))
    return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def compiled_point(module, mesh, rules, shape: tuple[int, int, int]) -> dict:
    """module's forward + backward at x [B, L, D] = shape, on the mesh: estimate and collectives."""
    jitted, (params, _, _) = bench.grad_program(module, jnp.zeros(shape, jnp.bfloat16))
    tokens = NamedSharding(mesh, sharding.mesh_spec(("batch", None, "embed"), shape, mesh, rules))
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=tokens)
    with sharding.use_mesh(mesh, rules):
        compiled = jitted.lower(on_mesh(params, mesh, rules), x, x).compile()
    return dict(**cost_model.estimate(compiled), collectives=aot.collective_counts(compiled.as_text()))


_DENSE: dict = {}


def _shape() -> tuple[int, int, int]:
    return _F.tokens // _F.seq_len, _F.seq_len, _F.d_model


def dense_point(activation: str, k: int, mesh, rules, n: int) -> dict:
    """The data-parallel dense twin (width F x k), compiled once per (activation, k)."""
    if (activation, k) not in _DENSE:
        ffn = nnx.eval_shape(lambda: FeedForward(_F.d_model, _F.d_ff * k, activation=activation,
                                                 dtype=jnp.bfloat16, param_dtype=jnp.dtype(_F.param_dtype),
                                                 rngs=nnx.Rngs(0)))
        floor = cost_model.dense_roofline_ms(
            tokens=_F.tokens // n, d_model=_F.d_model, d_ff=_F.d_ff * k,
            n_mats=3 if is_gated(activation) else 2,
            itemsize=2, peaks=cost_model.chip_peaks(_F.topology))
        _DENSE[activation, k] = dict(**compiled_point(ffn, mesh, rules, _shape()), roofline_ms=floor)
    return _DENSE[activation, k]


def points() -> list[dict]:
    mesh = sharding.make_mesh((1, -1, 1), cost_model.tpu_devices(_F.topology))
    rules, n = sharding.rules_dict(sharding.DEFAULT_RULES), mesh.shape["expert"]
    peaks = cost_model.chip_peaks(_F.topology)
    out = []
    grid = itertools.product(_F.activation, map(int, _F.k), map(float, _F.capacity_factor),
                             map(int, _F.group_size), map(int, _F.experts), _F.dispatch)
    for act, k, cf, S, E, strategy in grid:
        n_mats = 3 if is_gated(act) else 2
        dense = dense_point(act, k, mesh, rules, n)
        floor = cost_model.layer_roofline_ms(
            tokens=_F.tokens // n, d_model=_F.d_model, d_ff=_F.d_ff, experts=E // n,
            rows_per_expert=_F.tokens * k // E, n_mats=n_mats, itemsize=2, peaks=peaks)
        buffer = _F.ep_buffer_factor if strategy == "dropless" else 0.0
        cfg = MoEConfig(num_experts=E, k=k, d_ff=_F.d_ff, activation=act, dispatch=strategy,
                        train_capacity_factor=cf, group_size=S,
                        eval_capacity_factor=cf if cf <= 0 else MoEConfig.eval_capacity_factor,
                        ep_buffer_factor=buffer)
        layer = nnx.eval_shape(lambda: MoELayer(cfg, _F.d_model, dtype=jnp.bfloat16,
                                                param_dtype=jnp.dtype(_F.param_dtype), rngs=nnx.Rngs(0)))
        rec = dict(topology=_F.topology, chips=n, dispatch=strategy, num_experts=E, k=k, capacity_factor=cf,
                   ep_buffer_factor=buffer, group_size=S, activation=act, tokens=_F.tokens,
                   d_model=_F.d_model, d_ff=_F.d_ff, param_dtype=_F.param_dtype)
        try:
            est = compiled_point(layer, mesh, rules, _shape())
        except jax.errors.JaxRuntimeError as e:  # e.g. RESOURCE_EXHAUSTED: the step does not fit a chip
            out.append({**rec, "error": str(e).splitlines()[0]})
            continue
        out.append(dict(**rec, **est, dense_est_ms=dense["est_ms"],
                        ratio=est["est_ms"] / dense["est_ms"], roofline_ms=floor,
                        dense_roofline_ms=dense["roofline_ms"], est_over_roofline=est["est_ms"] / floor))
    return out


def main(argv) -> None:
    del argv
    if not _F.topology:
        raise app.UsageError("--topology is required: the Cloud TPU accelerator type to compile for")
    print(f"# {' '.join(['python -m moe_jax.bench_mesh'] + sys.argv[1:])}")
    print(f"# TPU cost model, per chip; experts over all chips, bfloat16, weights {_F.param_dtype}, "
          "forward + backward")
    print(f"{'dispatch':>9} {'act':>6} {'k':>2} {'cf':>5} {'E':>4} {'est ms':>9} {'dense est':>9} "
          f"{'ratio':>6} {'roof ms':>8} "
          f"{'est/roof':>8}  collectives")
    for r in points():
        if _F.json:
            print(json.dumps(r))
            continue
        if "error" in r:
            print(f"{r['dispatch']:>9} {r['activation']:>6} {r['k']:>2} {r['capacity_factor']:>5} "
                  f"{r['num_experts']:>4}  not compiled: {r['error']}")
            continue
        ops = ", ".join(f"{op} x{c}" for op, c in sorted(r["collectives"].items()))
        print(f"{r['dispatch']:>9} {r['activation']:>6} {r['k']:>2} {r['capacity_factor']:>5} "
              f"{r['num_experts']:>4} {r['est_ms']:>9.3f} {r['dense_est_ms']:>9.3f} "
              f"{r['ratio']:>6.3f} {r['roofline_ms']:>8.3f} {r['est_over_roofline']:>8.3f}  {ops}")


if __name__ == "__main__":
    try:
        app.run(main)
    except aot.TopologyError as e:  # a wrong accelerator type, or libtpu missing
        sys.exit(f"error: {e}")
