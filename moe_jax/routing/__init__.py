"""Routing decisions: who goes where, with what weight. They never touch activations.

Public contract: tokens_choose (Switch/GShard/Mixtral top-k) and experts_choose (expert choice);
also noisy top-k, hierarchical, soft MoE and dense-mixture routing, capacity formulas and
auxiliary losses. Every decision reports its own statistics (`decision.stats()`, see stats.py).
The routers that own parameters and read moe.* options are in moe_jax.routers.
"""
from moe_jax.routing.capacity import assign_slots, compute_capacity, fill_rank
from moe_jax.routing.expert_choice import ExpertChoice, experts_choose
from moe_jax.routing.hierarchical import hierarchical_choose
from moe_jax.routing.losses import load_balancing_loss, router_z_loss
from moe_jax.routing.noisy import noisy_tokens_choose
from moe_jax.routing.soft import SoftRouting, soft_route
from moe_jax.routing.stats import SlotMaps
from moe_jax.routing.token_choice import TokenChoice, dense_choose, tokens_choose

__all__ = [
    "ExpertChoice", "SlotMaps", "SoftRouting", "TokenChoice", "assign_slots", "compute_capacity",
    "dense_choose",
    "experts_choose", "fill_rank", "hierarchical_choose", "load_balancing_loss", "noisy_tokens_choose",
    "router_z_loss", "soft_route", "tokens_choose",
]
