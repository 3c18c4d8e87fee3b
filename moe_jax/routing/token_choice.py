"""Token-choice top-k routing: Switch (k=1, Fedus et al. 2021), GShard (k=2, Lepikhin et al. 2020),
Mixtral (k=2 of 8, renormalized; Jiang et al. 2024).

Each token picks its k most probable experts; the experts' buffers are filled in a priority
order and assignments beyond the capacity are dropped. Options that differ between papers:
- renormalize: divide the k chosen probabilities by their sum (GShard, Mixtral) or not
  (Flaxformer, V-MoE: for k=2, p1 + p2 < 1).
- order / batch_prioritized: see capacity.fill_rank; BPR is V-MoE's Batch Prioritized Routing.
- second_choice='random': GShard's stochastic second expert, dispatched only when
  2 * p2 / (p1 + p2) > u, u ~ U[0, 1).
- choice_bias: auxiliary-loss-free balancing (DeepSeek-V3, Wang et al. 2024): a per-expert bias
  added to the scores that choose experts, never to the combine weights.
"""
from __future__ import annotations

import typing
from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax.routing import capacity as capacity_lib
from moe_jax.routing import losses, stats
from moe_jax.routing.stats import SlotMaps

SecondChoice = Literal["all", "random"]
SECOND_CHOICE_POLICIES = typing.get_args(SecondChoice)


@struct.dataclass
class TokenChoice:
    """A token-choice routing decision for G groups of S tokens, K choices each."""

    expert_index: jax.Array  # int32 [G, S, K]: chosen experts, by descending score
    position: jax.Array  # int32 [G, S, K]: slot in that expert's buffer, -1 when dropped
    weight: jax.Array  # float32 [G, S, K]: combine weight, exactly 0 when dropped
    probs: jax.Array  # float32 [G, S, E]: router probabilities (for statistics)
    balance_loss: jax.Array  # float32 []: the router's balancing loss
    z_loss: jax.Array  # float32 []: router z-loss
    capacity: int | None = struct.field(pytree_node=False)  # slots per expert and group; None: dropless

    dropless_ok = True  # its assignments can be sorted by expert (dispatch='dropless')

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    def stats(self) -> dict[str, jax.Array]:
        E = self.num_experts
        routed = jnp.sum(losses.expert_counts(self.expert_index, E), axis=0)  # [G, E] -> [E]
        kept_index = jnp.where(self.position >= 0, self.expert_index, E)  # [G, S, K]
        dropped = (self.position < 0).astype(jnp.float32)  # [G, S, K]
        return {
            "tokens_per_expert": jnp.sum(losses.expert_counts(kept_index, E), axis=0),  # [E]
            "routed_per_expert": routed,
            "max_mean_load": stats.max_over_mean(routed),
            "dropped_fraction": jnp.mean(dropped),
            "dropped_fraction_per_rank": jnp.mean(dropped, axis=(0, 1)),  # [K]
            "router_entropy": stats.entropy(self.probs),
        }

    def masks(self, capacity: int) -> tuple[jax.Array, jax.Array]:
        """The einsum dispatch's one-hot dispatch mask and combine weights, both float32 [G, S, E, C].

        A sum of K compares of each choice's slot e*C + c with the slots (dropped: none), not an
        einsum of one-hots over k: a contraction of length K is a matmul the TPU runs at K / 128 of
        its width (0.45 ms of a 7.7 ms top-2 layer at S = 512, E = 8, C = 160 on the v5e cost model)."""
        G, S, K = self.position.shape
        E, C = self.num_experts, capacity
        slot = self.flat_slot(C)  # [G, S, K]
        slots = jnp.arange(E * C, dtype=jnp.int32)  # [E*C]
        hits = [slot[..., k, None] == slots for k in range(K)]  # K x [G, S, E*C]
        dispatch = sum(h.astype(jnp.float32) for h in hits)  # [G, S, E*C]
        combine = sum(jnp.where(h, self.weight[..., k, None], 0.0) for k, h in enumerate(hits))
        return dispatch.reshape(G, S, E, C), combine.reshape(G, S, E, C)

    def flat_slot(self, capacity: int) -> jax.Array:
        """int32 [G, S, K]: each choice's slot e*C + position, or the out-of-range E*C when dropped."""
        kept = (self.position >= 0) & (self.position < capacity)  # [G, S, K]
        return jnp.where(kept, self.expert_index * capacity + self.position, self.num_experts * capacity)

    def slots(self, capacity: int) -> SlotMaps:
        """Per-group slot maps; every index stays inside its group, so a group-sharded batch gathers
        locally."""
        G, S, K = self.position.shape
        E, C = self.num_experts, capacity
        token_slot = self.flat_slot(C)  # [G, S, K]
        choice_id = jnp.arange(S * K, dtype=jnp.int32)

        def invert(slots):  # [K*S] -> [E*C]: the choice held by each slot, S*K where empty
            return jnp.full((E * C,), S * K, jnp.int32).at[slots].set(choice_id, mode="drop")

        # choices numbered choice-major, k*S + s: [G, S, K] -> [G, K*S]
        slot_choice = jax.vmap(invert)(jnp.moveaxis(token_slot, -1, 1).reshape(G, K * S))  # [G, E*C]
        slot_token = jnp.where(slot_choice < S * K, slot_choice % S, S)  # [G, E*C]
        return SlotMaps(token_slot, slot_token, slot_choice, self.weight)


def check_logits(logits: jax.Array, name: str = "logits") -> None:
    if logits.ndim != 3:
        raise ValueError(f"{name} must have shape [G, S, E] (groups, tokens, experts), "
                         f"got shape {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {logits.dtype}")


def check_capacity(capacity: int | None) -> None:
    if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
        raise ValueError(
            f"capacity must be an int >= 1 (slots per expert and group), or None for dropless routing; "
            f"got {capacity!r}")


def bpr_token_order(top1: jax.Array) -> jax.Array:
    """Batch Prioritized Routing: rank of each token by descending top-1 score, ties by position.

    top1: float [G, S] -> int32 [G, S] (0 = served first).
    """
    by_priority = jnp.argsort(-top1, axis=-1, stable=True)  # [G, S] token ids, highest first
    return jnp.argsort(by_priority, axis=-1, stable=True).astype(jnp.int32)  # inverse permutation


def route_choices(
    expert_index: jax.Array,
    weight: jax.Array,
    *,
    num_experts: int,
    capacity: int | None,
    order: capacity_lib.FillOrder,
    token_order: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Assign slots to chosen experts and zero the weights of dropped assignments.

    expert_index int [G, S, K] (num_experts marks "not dispatched"), weight float [G, S, K],
    token_order int [G, S] or None. Returns (position int32 [G, S, K], weight float32 [G, S, K]).
    """
    G, S, K = expert_index.shape
    if token_order is None:
        rank = capacity_lib.fill_rank(S, K, order)  # [S, K]
    else:
        rank = jax.vmap(lambda t: capacity_lib.fill_rank(S, K, order, t))(token_order)  # [G, S, K]
    position = capacity_lib.assign_slots(expert_index, rank, num_experts, capacity)  # [G, S, K]
    return position, jnp.where(position >= 0, weight, 0.0).astype(jnp.float32)


def top_k_by_max_rounds(k: int) -> bool:
    """Whether top-k is taken as k rounds of max (lowest index winning ties, as in lax.top_k) instead
    of lax.top_k: on XLA:CPU argmax and the top_k custom call each cost several passes over [G, S, E]
    (benchmarks/README.md, "Router in one softmax pass, top-k by max"). The decisions are the same."""
    return k <= 2


def _top_k(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """scores [G, S, E] -> (values, indices) [G, S, K] x2, by descending score, lowest index first on ties."""
    if not top_k_by_max_rounds(k):
        return jax.lax.top_k(scores, k)
    E = scores.shape[-1]
    iota = jnp.arange(E, dtype=jnp.int32)
    values, picks = [], []
    for i in range(k):
        best = jnp.max(scores, axis=-1, keepdims=True)  # [G, S, 1]
        pick = jnp.min(jnp.where(scores == best, iota, E - 1), axis=-1, keepdims=True)  # [G, S, 1]
        values.append(best)
        picks.append(pick)
        if i + 1 < k:
            scores = jnp.where(iota == pick, -jnp.inf, scores)  # [G, S, E]
    return jnp.concatenate(values, axis=-1), jnp.concatenate(picks, axis=-1)


def one_hot_take(values: jax.Array, index: jax.Array) -> jax.Array:
    """values [..., E] at int index [..., K] -> [..., K]: take_along_axis's numbers as a one-hot select,
    whose gradient is a select too. take_along_axis's gradient is a scatter, which the TPU v5e cost
    model charges 5.9 ms at G=16 S=512 E=32 K=2 against 0.016 ms for this (benchmarks/README.md)."""
    hit = index[..., :, None] == jnp.arange(values.shape[-1], dtype=index.dtype)  # [..., K, E]
    return jnp.sum(jnp.where(hit, values[..., None, :], 0), axis=-1)  # [..., K, E] -> [..., K]


def softmax_top_k(logits: jax.Array, k: int, choice_bias: jax.Array | None = None):
    """The router's probabilities and top-k in one max / exp / sum pass over float32 logits [G, S, E].

    Experts are chosen by the logits (the probabilities' order), or by probabilities plus
    choice_bias when one is given. Returns probs [G, S, E], expert_index [G, S, K], weight
    [G, S, K] (the chosen probabilities), priority [G, S] (BPR's: the top-1 probability, plus its
    bias when choices are biased) and logsumexp [G, S] (for the z-loss).
    """
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # [G, S, 1]
    exp = jnp.exp(logits - top)  # [G, S, E]
    denom = jnp.sum(exp, axis=-1, keepdims=True)  # [G, S, 1]
    probs = exp / denom  # [G, S, E]
    scores = logits if choice_bias is None else probs + choice_bias.astype(jnp.float32)  # [G, S, E]
    top_scores, expert_index = _top_k(jax.lax.stop_gradient(scores), k)  # [G, S, K] x2
    weight = jnp.exp(one_hot_take(logits, expert_index) - top) / denom  # [G, S, K]
    priority = (1.0 / denom[..., 0]) if choice_bias is None else top_scores[..., 0]  # [G, S]
    return probs, expert_index, weight, priority, top[..., 0] + jnp.log(denom[..., 0])


def _check_options(k, num_experts, capacity, order, second_choice, rng) -> None:
    if not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an int in [1, num_experts={num_experts}], got {k!r}")
    check_capacity(capacity)
    if order not in capacity_lib.FILL_ORDERS:
        raise ValueError(f"order must be one of {capacity_lib.FILL_ORDERS}, got {order!r}")
    if second_choice not in SECOND_CHOICE_POLICIES:
        raise ValueError(f"second_choice must be one of {SECOND_CHOICE_POLICIES}, got {second_choice!r}")
    if second_choice == "random" and (k != 2 or rng is None):
        raise ValueError("second_choice='random' (GShard) needs k=2 and an rng key; "
                         f"got k={k}, rng={'set' if rng is not None else 'None'}")


def _random_second(expert_index: jax.Array, weight: jax.Array, rng: jax.Array, num_experts: int) -> jax.Array:
    """GShard's stochastic second expert: [G, S, 2] choices with each second one replaced by E (not
    dispatched) unless 2 * p2 / (p1 + p2) > u, u ~ U[0, 1)."""
    gate2 = weight[..., 1] / (weight[..., 0] + weight[..., 1])  # [G, S]
    keep2 = 2.0 * gate2 > jax.random.uniform(rng, gate2.shape)  # [G, S]
    return expert_index.at[..., 1].set(jnp.where(keep2, expert_index[..., 1], num_experts))


def tokens_choose(
    logits: jax.Array,
    *,
    k: int,
    capacity: int | None,
    batch_prioritized: bool = False,
    renormalize: bool = False,
    order: capacity_lib.FillOrder = "rank_major",
    second_choice: SecondChoice = "all",
    choice_bias: jax.Array | None = None,
    rng: jax.Array | None = None,
    weight_scale: float = 1.0,
) -> TokenChoice:
    """Route every token of every group to its top-k experts.

    logits: float [G, S, E], cast to float32. capacity: slots per expert and group (see
    capacity.compute_capacity), or None to drop nothing. weight_scale multiplies the combine
    weights (DeepSeek's routed_scaling_factor). Returns a TokenChoice.

    Probabilities and choices come from softmax_top_k (one pass, no scatter in the backward pass).
    """
    check_logits(logits)
    G, S, E = logits.shape
    _check_options(k, E, capacity, order, second_choice, rng)
    probs, expert_index, weight, priority, logsumexp = softmax_top_k(logits.astype(jnp.float32), k,
                                                                     choice_bias)
    if renormalize:
        weight = weight / jnp.sum(weight, axis=-1, keepdims=True)  # [G, S, K]
    weight = weight * weight_scale if weight_scale != 1.0 else weight

    dispatched = expert_index if second_choice == "all" else _random_second(expert_index, weight, rng, E)
    token_order = bpr_token_order(priority) if batch_prioritized else None
    position, weight = route_choices(dispatched, weight, num_experts=E, capacity=capacity, order=order,
                                     token_order=token_order)
    return TokenChoice(
        expert_index=expert_index.astype(jnp.int32),
        position=position,
        weight=weight,
        probs=probs,
        balance_loss=losses.load_balancing_loss(probs, expert_index),
        z_loss=jnp.mean(jnp.square(logsumexp)),  # [G, S] -> []
        capacity=capacity,
    )


def dense_choose(logits: jax.Array) -> TokenChoice:
    """Dense mixture of experts (Jacobs et al. 1991): every token goes to every expert, weighted by
    the softmax gate. Nothing is dropped and there is nothing to balance (balance_loss is 0)."""
    check_logits(logits)
    decision = tokens_choose(logits, k=logits.shape[-1], capacity=None)
    return decision.replace(balance_loss=jnp.zeros((), jnp.float32))
