"""The MoE layer: group tokens, route, dispatch, run the experts, combine (GShard, Lepikhin et al.
2020; Switch, Fedus et al. 2021), plus DeepSeekMoE's always-on shared experts (Dai et al. 2024).

x [B, L, D] -> y [B, L, D] and an MoEAux with the router's losses and routing statistics. A token
dropped by every expert leaves the layer as zero; the caller's residual connection carries it.
Train mode uses train_capacity_factor and the stochastic options (jitter, noise, random second
choice, bias updates); `module.eval()` (deterministic=True) uses eval_capacity_factor and none.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from moe_jax import dispatch as dispatch_lib
from moe_jax import expert_parallel, routing, sharding
from moe_jax.experts import FeedForward
from moe_jax.moe_config import MoEConfig
from moe_jax.router import Router


# The expert buffers after the dispatch's all-to-all: remat 'minimal' keeps them, so the backward
# pass does not repeat that all-to-all to recompute them.
EXPERT_INPUTS = "expert_inputs"


@struct.dataclass
class MoEAux:
    balance_loss: jax.Array  # float32 []
    z_loss: jax.Array  # float32 []
    stats: dict  # see moe_jax.routing.stats


# moe.dispatch='auto': routing without capacity (factor <= 0) takes 'dropless', which pads no expert
# to S slots; otherwise the fastest dispatch measured for the platform (`python -m moe_jax.bench layer`,
# with --topology for the TPU compiler's cost model; benchmarks/README.md). On XLA:CPU 'index': the
# einsum costs 2-2.5x more at S = 1024. On the v5e cost model 'einsum': index costs 3-35% more at
# E = 8-128, capacity factor 1.0, groups of 512, while at groups of 4,096 'einsum' costs 7-38% more:
# its one-hot products add 2 E C / (k n F) of the experts' FLOPs (n matmuls per expert), 1/6 to 1/5 at
# S = 512 and 0.9 to 1.3 at S = 4,096, so on TPU 'einsum' is taken up to EINSUM_WORK of them.
# GPU has no measurement yet and takes the CPU's choice.
FASTEST_DISPATCH = {"cpu": "index", "tpu": "einsum", "gpu": "index"}
EINSUM_WORK = 0.5


class MoELayer(nnx.Module):
    def __init__(self, cfg: MoEConfig, d_model: int, *, causal: bool = False, init_scale: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        """init_scale: variance scale of the experts' weights (model.init_scale); the router has its own."""
        if causal:
            cfg.check_causal()
        self.cfg, self.d_model, self.dtype = cfg, d_model, dtype
        self.router = Router(cfg, d_model, rngs=rngs)
        self.experts = FeedForward(d_model, cfg.d_ff, num_experts=cfg.num_experts, activation=cfg.activation,
                                   dropout_rate=cfg.expert_dropout, init_scale=init_scale, dtype=dtype,
                                   param_dtype=param_dtype, bias=cfg.expert_bias, rngs=rngs)
        self.shared = (FeedForward(d_model, cfg.d_ff * cfg.num_shared_experts, activation=cfg.activation,
                                   init_scale=init_scale, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                       if cfg.num_shared_experts else None)
        self.deterministic = False

    def group_shape(self, batch: int, length: int) -> tuple[int, int]:
        """(G, S) for a [batch, length] input; moe.group_size is the largest S allowed (Flaxformer's
        max_group_size), 0 meaning one sequence. Groups hold whole sequences when several fit
        (S = j * length, j dividing batch), else an equal share of one sequence (S dividing length)."""
        limit = self.cfg.group_size or length
        if limit >= length:
            j = max(j for j in range(1, batch + 1) if batch % j == 0 and j * length <= limit)
            S = j * length
        else:
            S = max(s for s in range(1, limit + 1) if length % s == 0)
        return batch * length // S, S

    def capacity(self, group_size: int) -> int | None:
        cfg, kind = self.cfg, self.router.kind
        cf = cfg.eval_capacity_factor if self.deterministic else cfg.train_capacity_factor
        if not kind.has_capacity:
            return None
        if cfg.expert_capacity:  # a fixed count; S slots already hold every token
            return min(cfg.expert_capacity, group_size)
        return routing.compute_capacity(group_size, cfg.num_experts, kind.capacity_choices(cfg), cf,
                                        formula=cfg.capacity_formula,
                                        rounding=cfg.capacity_rounding, min_capacity=cfg.min_capacity,
                                        multiple_of=cfg.capacity_multiple_of)

    def __call__(self, x: jax.Array, *, dropless: bool = False) -> tuple[jax.Array, MoEAux]:
        """x [B, L, D]. dropless=True (incremental decoding) routes each sequence as one group and
        drops nothing, whatever the capacity factors: a decode step's groups are tiny."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoE layer input must have shape [B, L, {self.d_model}], got {x.shape}")
        B, L, D = x.shape
        G, S = (B, L) if dropless else self.group_shape(B, L)
        x = x.astype(self.dtype)
        groups = sharding.constrain(x.reshape(G, S, D), ("batch", None, "embed"))  # [B, L, D] -> [G, S, D]
        capacity = None if dropless else self.capacity(S)
        decision = self.router(groups, capacity=capacity, train=not self.deterministic)
        stats = decision.stats()
        strategy = None if self.router.kind.own_path else self.dispatch_for(capacity)
        if strategy is None:
            y = self.router.kind.mix(groups, decision, self.experts)
        elif strategy == "dropless" and expert_parallel.applies(self.experts):
            y, dropped = expert_parallel.dropless(
                groups, decision, self.experts, self.cfg.grouped_matmul, self.cfg.ep_buffer_factor)
            if sharding.expert_axis() is not None:
                stats["ep_dropped_fraction"] = dropped
        else:
            y = self._dispatched(groups, decision, strategy)
        y = y.reshape(B, L, D).astype(self.dtype)
        if self.shared is not None:
            y = y + self.shared(x)
        return y, MoEAux(balance_loss=decision.balance_loss, z_loss=decision.z_loss, stats=stats)

    def dispatch_for(self, capacity: int | None) -> str:
        """The dispatch strategy this call uses (moe.dispatch, or 'auto' resolved at trace time)."""
        if self.cfg.dispatch != "auto":
            return self.cfg.dispatch
        if capacity is None and "dropless" in self.router.kind.dispatches:
            return "dropless"
        fastest = FASTEST_DISPATCH.get(sharding.target_platform(), "index")
        if fastest == "einsum" and capacity is not None:
            n_mats = len(self.experts.wi) + 1  # the input projections and the output one
            if 2 * self.cfg.num_experts * capacity > EINSUM_WORK * self.cfg.k * n_mats * self.cfg.d_ff:
                return "index"
        return fastest

    def _dispatched(self, groups: jax.Array, decision, strategy: str) -> jax.Array:
        """groups [G, S, D] -> [G, S, D] through the experts by `strategy`."""
        if strategy == "dropless":
            y = dispatch_lib.dropless_apply(groups, decision, self.experts, self.cfg.grouped_matmul)
            return sharding.constrain(y, ("batch", None, "embed"))  # [G, S, D]
        send, receive = dispatch_lib.get(strategy)
        inputs, ctx = send(groups, decision)
        # Token-major -> expert-major: with experts sharded, XLA moves tokens by an all-to-all here.
        # [G, E*C, D] -> [E, G*C, D]
        inputs = checkpoint_name(sharding.constrain(inputs, sharding.EXPERT_MAJOR), EXPERT_INPUTS)
        outputs = sharding.constrain(self.experts(inputs), sharding.EXPERT_MAJOR)  # [E, G*C, D]
        return sharding.constrain(receive(outputs, ctx), ("batch", None, "embed"))  # [G, S, D]
