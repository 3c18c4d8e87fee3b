"""DeepSeek-V3's sigmoid gating (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", Sec. 2.1).

Affinities s = sigmoid(x W) [G, S, E]. Experts are chosen by s + b, where b is the
auxiliary-loss-free balancing bias (moe.bias_update_rate > 0, or moe.selection_bias for a fixed
one such as an imported e_score_correction_bias; Wang et al. 2024) and is used for selection only.
With moe.num_expert_groups > 1 the choice is group-limited: each group of
E / num_expert_groups experts is scored by the sum of its two highest s + b, and only the
moe.k_groups best groups may be chosen (masked with -inf, as DeepSeek's reference code and
transformers 5 do; earlier ports filled 0, which differs only when a biased score is negative). The combine
weights are the chosen affinities, divided by their sum when moe.renormalize (V3 does), times
moe.routed_scaling_factor (2.5 in V3). The balancing loss is V3's sequence-wise one,
(E / (K S)) sum_e count_e * mean_s(s_e / sum_j s_j), per group (a sequence when moe.group_size=0),
whose minimum under uniform routing is 1; weight it with the training loss's balance weight.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.routers import base
from moe_jax.routing import losses
from moe_jax.routing.token_choice import (TokenChoice, bpr_token_order, check_capacity, one_hot_take,
                                         route_choices)


def group_limited_scores(scores: jax.Array, num_groups: int, k_groups: int) -> jax.Array:
    """scores [G, S, E] -> [G, S, E] with every expert outside the k_groups best groups at -inf."""
    G, S, E = scores.shape
    grouped = scores.reshape(G, S, num_groups, E // num_groups)  # [G, S, H, E/H]
    group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [G, S, H]: sum of each group's top two
    _, top_groups = jax.lax.top_k(group_score, k_groups)  # [G, S, k_groups]
    keep = jnp.sum(jax.nn.one_hot(top_groups, num_groups, dtype=jnp.int32), axis=-2) > 0  # [G, S, H]
    return jnp.where(keep[..., None], grouped, -jnp.inf).reshape(G, S, E)


def sigmoid_choose(logits: jax.Array, *, k: int, capacity: int | None, choice_bias: jax.Array | None = None,
                   num_groups: int = 1, k_groups: int = 1, renormalize: bool = True, scale: float = 1.0,
                   order: str = "token_major", batch_prioritized: bool = False) -> TokenChoice:
    """logits float [G, S, E] -> a TokenChoice routed by sigmoid affinities (see the module doc)."""
    check_capacity(capacity)
    logits = logits.astype(jnp.float32)
    G, S, E = logits.shape
    affinity = jax.nn.sigmoid(logits)  # [G, S, E]
    scores = jax.lax.stop_gradient(affinity if choice_bias is None else affinity + choice_bias)  # [G, S, E]
    if num_groups > 1:
        scores = group_limited_scores(scores, num_groups, k_groups)
    top_scores, expert_index = jax.lax.top_k(scores, k)  # [G, S, K] x2
    weight = one_hot_take(affinity, expert_index)  # [G, S, K]
    if renormalize:
        weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
    token_order = bpr_token_order(top_scores[..., 0]) if batch_prioritized else None
    position, weight = route_choices(expert_index, weight * scale, num_experts=E, capacity=capacity,
                                     order=order, token_order=token_order)
    probs = affinity / jnp.sum(affinity, axis=-1, keepdims=True)  # [G, S, E]: s' of the balance loss
    return TokenChoice(expert_index=expert_index.astype(jnp.int32), position=position, weight=weight,
                       probs=probs,
                       balance_loss=losses.load_balancing_loss(probs, expert_index) / k,
                       z_loss=losses.router_z_loss(logits), capacity=capacity)


class Sigmoid(base.RouterKind):
    name = "sigmoid"
    paper = "DeepSeek-V3 (DeepSeek-AI 2024)"
    reads = base.TOKEN_ORDER + base.KERNEL + base.BALANCE_BIAS + ("renormalize", "routed_scaling_factor",
                                                                  "num_expert_groups", "k_groups")

    def validate(self, cfg) -> None:
        super().validate(cfg)
        H = cfg.num_expert_groups
        if H > 1 and (cfg.num_experts % H or cfg.num_experts // H < 2 or cfg.k_groups > H
                      or cfg.k > cfg.k_groups * (cfg.num_experts // H)):
            raise ValueError(f"group-limited sigmoid routing needs moe.num_experts={cfg.num_experts} "
                             f"divisible by moe.num_expert_groups={H} into groups of >= 2 experts, "
                             f"moe.k_groups <= {H} and "
                             f"moe.k <= k_groups * experts per group; got k_groups={cfg.k_groups}, k={cfg.k}")

    def route(self, router, x, *, capacity, train):
        cfg = router.cfg
        return sigmoid_choose(base.logits(cfg, x, router.kernel[...]), k=cfg.k, capacity=capacity,
                              choice_bias=router.choice_bias(), num_groups=cfg.num_expert_groups,
                              k_groups=cfg.k_groups, renormalize=cfg.renormalize,
                              scale=cfg.routed_scaling_factor, order=cfg.order,
                              batch_prioritized=cfg.batch_prioritized)
