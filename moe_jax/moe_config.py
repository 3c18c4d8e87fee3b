"""Options of one MoE layer, validated before anything is built.

Each routing semantic on which papers differ is a named option here (the papers are cited where
each is implemented, in moe_jax/routing/); `MoEConfig.from_dict` builds one from an ml_collections
`config.moe` and refuses unknown fields. An option the chosen router does not read
(one of routers.ROUTER_OPTIONS outside the router's `reads`) is refused unless it keeps its
default; the router kind validates its own options.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from moe_jax import grouped, routers, validation
from moe_jax.dispatch import STRATEGIES
from moe_jax.experts import ACTIVATIONS
from moe_jax.routing.capacity import CAPACITY_FORMULAS, CAPACITY_ROUNDINGS, FILL_ORDERS
from moe_jax.routing.token_choice import SECOND_CHOICE_POLICIES

DISPATCHES = ("auto",) + STRATEGIES
ROUTER_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8
    k: int = 1  # choices per token (for 'hierarchical': experts chosen inside each chosen group)
    router: str = "top_k"
    d_ff: int = 2048  # hidden width of one expert
    activation: str = "relu"
    # Capacity: slots per expert and group; a factor <= 0 means dropless (nothing is dropped).
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    # 'assignments': cf*k*S/E (GShard, V-MoE); 'tokens': cf*S/E (Flaxformer)
    capacity_formula: str = "assignments"
    capacity_rounding: str = "ceil"
    min_capacity: int = 1  # Flaxformer uses 4
    capacity_multiple_of: int = 1
    # > 0: a fixed number of slots per expert and group in training and evaluation, in place of the
    # factors (Hugging Face SwitchTransformers' absolute expert_capacity, one group per sequence).
    expert_capacity: int = 0
    group_size: int = 0  # most tokens per routing group (see MoELayer.group_shape); 0: one sequence
    # Fill order of expert buffers (see routing/capacity.py).
    order: str = "rank_major"
    batch_prioritized: bool = False  # V-MoE BPR: non-causal
    renormalize: bool = False  # divide the k weights by their sum (GShard, Mixtral) or not (Switch, V-MoE)
    second_choice: str = "all"  # 'random': GShard's stochastic second expert (k=2)
    # Router.
    # 'bfloat16': Switch Table 2's unstable low-precision router (ablations only)
    router_dtype: str = "float32"
    router_init_scale: float = 0.1  # truncated normal, std sqrt(scale / d_model) (Switch Table 3)
    jitter_eps: float = 0.0  # multiply router inputs by U[1-eps, 1+eps] in training (Switch)
    bias_update_rate: float = 0.0  # > 0: DeepSeek-V3 auxiliary-loss-free balancing bias
    # A per-expert bias added to the scores that choose experts (DeepSeek-V3's e_score_correction_bias),
    # kept as a variable; bias_update_rate > 0 implies it and nudges it, 0 keeps it fixed (an import).
    selection_bias: bool = False
    routed_scaling_factor: float = 1.0  # multiplies the combine weights (DeepSeek-V2/V3)
    router_bias: bool = False  # 'top_k': a learned [E] bias on the router logits (gpt-oss)
    num_expert_groups: int = 1  # 'hierarchical': E1 groups of num_experts / E1 experts
    k_groups: int = 1  # 'hierarchical': groups chosen per token
    soft_slots_per_expert: int = 1  # 'soft': slots P per expert
    # Experts.
    dispatch: str = "auto"
    # dispatch 'dropless': the grouped matmul's backend (moe_jax/grouped.py); 'auto' by platform.
    grouped_matmul: str = "auto"
    # Expert-parallel dropless (moe_jax/expert_parallel.py): each device's receive buffer as a multiple
    # of its own rows (tokens x k); rows past it are dropped (statistic ep_dropped_fraction). 0: room
    # for every row of every device of the expert axis, so nothing is dropped, at that many times the
    # memory and, on the TPU cost model, the grouped kernel's declared cost.
    ep_buffer_factor: float = 0.0
    expert_dropout: float = 0.0
    num_shared_experts: int = 0  # DeepSeekMoE always-on experts, each of width d_ff
    expert_bias: bool = False  # biases on the routed experts' input and output matmuls (gpt-oss)

    def __post_init__(self):
        kind = routers.get(self.router)
        self._refuse_ignored_options(kind)
        for field, allowed in (("activation", ACTIVATIONS), ("capacity_formula", CAPACITY_FORMULAS),
                               ("capacity_rounding", CAPACITY_ROUNDINGS), ("order", FILL_ORDERS),
                               ("second_choice", SECOND_CHOICE_POLICIES), ("dispatch", DISPATCHES),
                               ("grouped_matmul", ("auto",) + grouped.BACKENDS),
                               ("router_dtype", ROUTER_DTYPES)):
            validation.choice("moe", field, getattr(self, field), allowed)
        for field, low in (("num_experts", 1), ("k", 1), ("d_ff", 1), ("min_capacity", 0),
                           ("expert_capacity", 0), ("capacity_multiple_of", 1), ("group_size", 0),
                           ("num_expert_groups", 1), ("k_groups", 1), ("soft_slots_per_expert", 1),
                           ("num_shared_experts", 0)):
            validation.integer("moe", field, getattr(self, field), low)
        for field in ("train_capacity_factor", "eval_capacity_factor", "router_init_scale", "jitter_eps",
                      "bias_update_rate", "routed_scaling_factor", "expert_dropout", "ep_buffer_factor"):
            validation.number("moe", field, getattr(self, field))
        if not 0 <= self.expert_dropout < 1 or not 0 <= self.jitter_eps < 1:
            raise ValueError(f"moe.expert_dropout and moe.jitter_eps must be in [0, 1), "
                             f"got {self.expert_dropout}, {self.jitter_eps}")
        if self.dispatch != "auto" and self.dispatch not in kind.dispatches:
            raise ValueError(f"moe.dispatch={self.dispatch!r} does not apply to "
                             f"moe.router={self.router!r}, which "
                             + (f"supports {kind.dispatches}" if kind.dispatches
                                else "mixes the experts itself")
                             + ": choose one of them or 'auto'")
        self._check_ep_buffer_factor(kind)
        if self.grouped_matmul != "auto" and self.dispatch not in ("auto", "dropless"):
            raise ValueError(f"moe.grouped_matmul={self.grouped_matmul!r} applies to dispatch 'dropless' "
                             f"only, not moe.dispatch={self.dispatch!r}: leave it at 'auto'")
        self._check_expert_capacity(kind)
        kind.validate(self)

    def _check_ep_buffer_factor(self, kind: routers.RouterKind) -> None:
        if not self.ep_buffer_factor:
            return
        no_capacity = self.train_capacity_factor <= 0 and self.eval_capacity_factor <= 0
        dropless = self.dispatch == "dropless" or (self.dispatch == "auto" and no_capacity)
        if self.ep_buffer_factor < 1 or not dropless or "dropless" not in kind.dispatches:
            raise ValueError(f"moe.ep_buffer_factor={self.ep_buffer_factor} sizes the receive buffers of "
                             "expert-parallel dropless dispatch: it must be 0 (no drops) or >= 1, with "
                             "moe.dispatch='dropless' (or 'auto' and both capacity factors <= 0) and a "
                             "router that supports it")

    def _check_expert_capacity(self, kind: routers.RouterKind) -> None:
        if not self.expert_capacity:
            return
        if not kind.has_capacity:
            raise ValueError(f"moe.expert_capacity={self.expert_capacity} does not apply to "
                             f"moe.router={self.router!r}, which has no expert buffers: leave it at 0")
        if self.train_capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            raise ValueError(f"moe.expert_capacity={self.expert_capacity} fixes the capacity, and a "
                             "capacity factor <= 0 asks for none (dropless): set expert_capacity=0 or both "
                             "factors > 0")

    def _refuse_ignored_options(self, kind: routers.RouterKind) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for field in routers.ROUTER_OPTIONS:
            if field not in kind.reads and getattr(self, field) != defaults[field]:
                raise ValueError(f"moe.{field}={getattr(self, field)!r} does not apply to "
                                 f"moe.router={self.router!r}, which does not read it: leave it at its "
                                 f"default {defaults[field]!r}")

    @property
    def has_selection_bias(self) -> bool:
        return self.selection_bias or self.bias_update_rate > 0

    @property
    def kind(self) -> routers.RouterKind:
        return routers.get(self.router)

    @property
    def choices_per_token(self) -> int:
        """K: assignments per token."""
        return self.kind.choices_per_token(self)

    def drops_tokens(self) -> bool:
        return self.kind.has_capacity and (self.train_capacity_factor > 0 or self.eval_capacity_factor > 0)

    def check_causal(self) -> None:
        """Refuse options that let a later token change an earlier token's output."""
        if not self.kind.causal_safe:
            safe = tuple(name for name in routers.NAMES if routers.get(name).causal_safe)
            raise ValueError(f"moe.router={self.router!r} looks at the whole group when routing, "
                             f"which breaks causality: use it in the encoder only, or choose one of "
                             f"{safe} in a causal layer")
        if self.batch_prioritized:
            raise ValueError("moe.batch_prioritized=True orders tokens by the whole group's router scores, "
                             "which breaks causality: set it to False in a causal layer")
        if self.order == "rank_major" and self.choices_per_token > 1 and self.drops_tokens():
            raise ValueError("moe.order='rank_major' with more than one choice per token and dropping lets a "
                             "later token's first choice evict an earlier token's second choice, which "
                             "breaks causality: set moe.order='token_major', or make both capacity "
                             "factors <= 0 (dropless)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MoEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown field(s) moe.{', moe.'.join(unknown)}; known fields: {sorted(known)}")
        return cls(**values)
