"""The router projection in its two forms, forward + backward: one [G*S, D] x [D, E] matmul (what
moe_jax.routers.base.project does) against the [G, S, D] einsum, on the TPU v5e compiler's cost model
(libtpu, compile only) and timed on this machine's XLA:CPU.

    JAX_PLATFORMS=cpu python benchmarks/router_projection.py [--experts=32] [--reps=20]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: another libtpu user may run

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

G, S, D = 16, 512, 768


def flat(x, kernel):
    return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:2], -1)  # [G*S, D] x [D, E] -> [G, S, E]


def einsum(x, kernel):
    return jnp.einsum("gsd,de->gse", x, kernel)  # [G, S, D] x [D, E] -> [G, S, E]


def step(form):
    return jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(form(x, k))), argnums=(0, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    shapes = (jax.ShapeDtypeStruct((G, S, D), jnp.float32),
              jax.ShapeDtypeStruct((D, args.experts), jnp.float32))
    device = topologies.get_topology_desc(topology_name="v5e:1x1", platform="tpu",
                                          chips_per_host_bounds=(1, 1, 1)).devices[0]
    where = jax.sharding.SingleDeviceSharding(device)
    x, kernel = jnp.ones(shapes[0].shape), jnp.ones(shapes[1].shape)
    print(f"# G={G} S={S} D={D} E={args.experts}, float32, forward + backward")
    print("form     tpu_v5e_est_us  tpu_flops  tpu_bytes  cpu_ms")
    for name, form in (("flat", flat), ("einsum", einsum)):
        compiled = jax.jit(step(form), in_shardings=(where, where)).lower(*shapes).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        fn = step(form)
        jax.block_until_ready(fn(x, kernel))
        start = time.perf_counter()
        for _ in range(args.reps):
            jax.block_until_ready(fn(x, kernel))
        ms = (time.perf_counter() - start) / args.reps * 1e3
        print(f"{name:8s} {cost['optimal_seconds'] * 1e6:14.1f} {cost['flops']:10.3g} "
              f"{cost['bytes accessed']:10.3g} {ms:7.2f}")


if __name__ == "__main__":
    main()
