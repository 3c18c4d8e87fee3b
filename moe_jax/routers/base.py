"""The router contract: what every router declares and does, so the layer, the config, the
accounting and the dispatch ask the router instead of testing its name (V-MoE's "router returns
a dispatcher" seam, Riquelme et al. 2021).

A router is one `RouterKind` object in the registry (moe_jax/routers/__init__.py). It declares
the router options it reads (any other of ROUTER_OPTIONS must keep its default), whether it is
causal-safe, the dispatch strategies it supports, its parameters (shapes for the accounting, and
their initialisation) and its FLOPs, and it turns router inputs into a routing decision
(moe_jax.routing). A router whose decision the generic dispatch cannot carry (soft MoE) sets
`own_path` and mixes the experts itself in `mix`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.experts import fan_in_init

if TYPE_CHECKING:
    from moe_jax.moe_config import MoEConfig

# moe.* options that belong to some routers only: a router that does not read one refuses a value
# other than its default. Options outside this list (experts, capacity, groups, jitter) are common.
ROUTER_OPTIONS = ("k", "order", "batch_prioritized", "renormalize", "second_choice", "router_dtype",
                  "router_init_scale", "bias_update_rate", "selection_bias", "routed_scaling_factor",
                  "num_expert_groups", "k_groups", "soft_slots_per_expert", "router_bias")
# Read by every router whose choices fill expert buffers token by token.
TOKEN_ORDER = ("k", "order", "batch_prioritized")
KERNEL = ("router_dtype", "router_init_scale")  # read by routers with a [D, E] logits kernel
BALANCE_BIAS = ("bias_update_rate", "selection_bias")  # read by routers that choose by biased scores


def project(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """[G, S, D] x [D, ...] -> [G, S, ...] as one [G*S, D] matmul. Not a backend-specific form: the
    TPU v5e cost model compiles it and the [G, S, D] einsum to the same program, and XLA:CPU times them
    within 2% (benchmarks/router_projection.py, recorded in benchmarks/README.md)."""
    G, S, D = x.shape
    out = x.reshape(G * S, D) @ kernel.reshape(D, -1)  # [G*S, D] x [D, E] -> [G*S, E]
    return out.reshape(G, S, *kernel.shape[1:])


def logits(cfg: MoEConfig, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [G, S, D] float32 -> logits [G, S, E]; moe.router_dtype='bfloat16' rounds input, kernel and
    logits to bfloat16 (Switch Table 2's unstable low-precision router, for that ablation only)."""
    if cfg.router_dtype == "bfloat16":
        return project(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    return project(x, kernel)  # [G, S, E]


def fan_in_params(cfg: MoEConfig, shapes: dict[str, tuple[int, ...]], rngs: nnx.Rngs) -> dict[str, nnx.Param]:
    """[D, ...] kernels drawn in order: truncated normal, std sqrt(moe.router_init_scale / D) (Switch);
    one-axis [E] biases start at 0."""
    init = fan_in_init(cfg.router_init_scale)

    def param(shape):
        if len(shape) == 1:
            return nnx.Param(jnp.zeros(shape, jnp.float32), out_sharding=(None,))
        return nnx.Param(init(rngs.params(), shape, jnp.float32),
                         out_sharding=("embed",) + (None,) * (len(shape) - 1))
    return {name: param(shape) for name, shape in shapes.items()}


class RouterKind:
    """One router. Subclasses set the class attributes and implement `route`."""

    name: str = ""
    paper: str = ""  # who introduced it, cited in the README's router table
    reads: tuple[str, ...] = ()  # the ROUTER_OPTIONS it reads
    causal_safe = True  # False: it looks at the whole group when it decides (never in a decoder)
    dispatches: tuple[str, ...] = ("einsum", "index", "dropless")  # () with own_path
    has_capacity = True  # False: nothing is ever dropped (soft MoE, the dense mixture)
    own_path = False

    def validate(self, cfg: MoEConfig) -> None:
        """Refuse option values this router cannot serve, naming the field."""
        if "k" in self.reads and cfg.k > cfg.num_experts:
            raise ValueError(f"moe.k={cfg.k} must be <= moe.num_experts={cfg.num_experts}")

    def choices_per_token(self, cfg: MoEConfig) -> int:
        """K: assignments per token."""
        return cfg.k

    def capacity_choices(self, cfg: MoEConfig) -> int:
        """The k of the capacity formula (expert choice: 1, each expert takes cf * S / E tokens)."""
        return self.choices_per_token(cfg)

    def experts_per_token(self, cfg: MoEConfig, group_tokens: int) -> float:
        """Routed experts' worth of work one token gets, on average (for the accounting)."""
        return float(self.choices_per_token(cfg))

    def param_shapes(self, cfg: MoEConfig, d_model: int) -> dict[str, tuple[int, ...]]:
        """Every trained parameter of the router, by name, as stored."""
        return {"kernel": (d_model, cfg.num_experts)}

    def init_params(self, cfg: MoEConfig, d_model: int, rngs: nnx.Rngs) -> dict[str, nnx.Variable]:
        """The parameters of param_shapes, initialised in that order."""
        return fan_in_params(cfg, self.param_shapes(cfg, d_model), rngs)

    def flops_per_token(self, cfg: MoEConfig, d_model: int) -> float:
        """Forward FLOPs per token: a multiply and an add per kernel weight (biases' adds uncounted,
        as everywhere in the accounting)."""
        return float(sum(2 * math.prod(shape) for shape in self.param_shapes(cfg, d_model).values()
                         if len(shape) > 1))

    def route(self, router: Any, x: jax.Array, *, capacity: int | None, train: bool):
        """x float32 [G, S, D] -> a routing decision. `router` is the moe_jax.router.Router module:
        its parameters are attributes, `router.rng()` draws a key, `router.choice_bias()` is the
        auxiliary-loss-free bias (or None)."""
        raise NotImplementedError

    def mix(self, groups: jax.Array, decision, experts) -> jax.Array:
        """own_path only: groups [G, S, D] -> y [G, S, D] through the experts."""
        raise NotImplementedError
