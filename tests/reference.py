"""A plain, slow MoE reference: routing by explicit Python loops, experts by a loop over experts.

It shares no routing or dispatch code with moe_jax. Integer decisions (who goes where, what is
dropped) are made in NumPy by walking the fill order one assignment at a time; the weights and
the expert FFNs are plain jnp, so the reference is differentiable and its gradients can be
compared with the layer's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def fill_slots(expert_index: np.ndarray, capacity: int | None, num_experts: int, *, order="rank_major",
               token_rank: np.ndarray | None = None) -> np.ndarray:
    """expert_index int [S, K] (num_experts = not dispatched) -> position [S, K] (-1 dropped), by walking."""
    S, K = expert_index.shape
    tokens = list(range(S)) if token_rank is None else list(np.argsort(token_rank, kind="stable"))
    if order == "rank_major":
        walk = [(s, k) for k in range(K) for s in tokens]
    else:
        walk = [(s, k) for s in tokens for k in range(K)]
    used = [0] * num_experts
    position = -np.ones((S, K), np.int64)
    for s, k in walk:
        e = int(expert_index[s, k])
        if e == num_experts:
            continue
        if capacity is None or used[e] < capacity:
            position[s, k] = used[e]
        used[e] += 1
    return position


def bpr_rank(top1: np.ndarray) -> np.ndarray:
    """Rank of each token by descending top-1 score, ties by position."""
    order = sorted(range(len(top1)), key=lambda s: (-float(top1[s]), s))
    rank = np.empty(len(top1), np.int64)
    for r, s in enumerate(order):
        rank[s] = r
    return rank


def ffn(x, wi, wo, activation):
    """One expert: x [N, D], wi list of [D, F], wo [F, D]."""
    act = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "swiglu": jax.nn.silu, "geglu": jax.nn.gelu}[activation]
    h = act(x @ wi[0])
    if len(wi) == 2:
        h = h * (x @ wi[1])
    return h @ wo


def token_choice_decisions(probs: np.ndarray, k: int, capacity, *, order="rank_major",
                           batch_prioritized=False):
    """probs [G, S, E] -> (expert_index [G, S, K], kept [G, S, K]) by loops."""
    G, S, E = probs.shape
    expert_index = np.zeros((G, S, k), np.int64)
    kept = np.zeros((G, S, k), bool)
    for g in range(G):
        for s in range(S):
            expert_index[g, s] = np.argsort(-probs[g, s], kind="stable")[:k]
        rank = bpr_rank(probs[g].max(-1)) if batch_prioritized else None
        kept[g] = fill_slots(expert_index[g], capacity, E, order=order, token_rank=rank) >= 0
    return expert_index, kept


def tokens_choose_loops(logits: np.ndarray, k: int, capacity, *, order="rank_major", batch_prioritized=False,
                        renormalize=False, choice_bias=None, second_uniform=None, weight_scale=1.0):
    """Every option of token-choice top-k, one token at a time in float64: logits [G, S, E] ->
    (expert_index, position, weight), each [G, S, K]. second_uniform [G, S]: GShard's U[0, 1) draws."""
    G, S, E = logits.shape
    z = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    probs = z / z.sum(-1, keepdims=True)
    bias = np.zeros(E) if choice_bias is None else np.asarray(choice_bias, np.float64)
    index = np.zeros((G, S, k), np.int64)
    weight = np.zeros((G, S, k))
    position = np.zeros((G, S, k), np.int64)
    for g in range(G):
        dispatched, top1 = np.zeros((S, k), np.int64), np.zeros(S)
        for s in range(S):
            scores = probs[g, s] + bias
            index[g, s] = sorted(range(E), key=lambda e: (-scores[e], e))[:k]
            w = probs[g, s, index[g, s]]
            weight[g, s] = (w / w.sum() if renormalize else w) * weight_scale
            dispatched[s] = index[g, s]
            if second_uniform is not None and not 2 * w[1] / (w[0] + w[1]) > second_uniform[g, s]:
                dispatched[s, 1] = E  # the second choice is not dispatched
            top1[s] = scores[index[g, s, 0]]
        rank = bpr_rank(top1) if batch_prioritized else None
        position[g] = fill_slots(dispatched, capacity, E, order=order, token_rank=rank)
    return index, position, np.where(position >= 0, weight, 0.0)


def _router_probs(params, xg, cfg):
    """Differentiable router probabilities: [G, S, E] (and the hierarchical factors). With
    params['noise'] (standard normal draws [G, S, E]) the noisy top-k router's training logits:
    clean + (softplus(x W_noise) + 0.01) * noise (Shazeer et al. 2017)."""
    logits = jnp.einsum("gsd,de->gse", xg.astype(jnp.float32), params["kernel"])
    if "noise" in params:
        noise_logits = jnp.einsum("gsd,de->gse", xg.astype(jnp.float32), params["noise_kernel"])
        std = jax.nn.softplus(noise_logits) + 1e-2
        logits = logits + std * params["noise"]
    if cfg.router != "hierarchical":
        return jax.nn.softmax(logits, -1), None, None
    G, S, E = logits.shape
    E1 = cfg.num_expert_groups
    p_outer = jax.nn.softmax(jnp.einsum("gsd,dh->gsh", xg.astype(jnp.float32), params["group_kernel"]), -1)
    p_inner = jax.nn.softmax(logits.reshape(G, S, E1, E // E1), -1)
    return None, p_outer, p_inner


def _groups(x, cfg):
    B, L, D = x.shape
    S = cfg.group_size or L
    return x.reshape(B * L // S, S, D)


def decide(params: dict, x: jax.Array, cfg, capacity) -> dict:
    """The integer routing decisions, by loops over concrete values (call outside jax.grad)."""
    xg = _groups(x, cfg)
    G, S, _ = xg.shape
    E = cfg.num_experts
    if cfg.router == "soft":
        return {}
    probs, p_outer, p_inner = (None if a is None else np.asarray(a) for a in _router_probs(params, xg, cfg))
    if cfg.router == "expert_choice":
        return {"chosen": np.stack([[np.argsort(-probs[g, :, e], kind="stable")[:capacity] for e in range(E)]
                                    for g in range(G)])}
    if cfg.router == "hierarchical":
        E2 = E // cfg.num_expert_groups
        expert_index = np.array([[[h * E2 + i
                                   for h in np.argsort(-p_outer[g, s], kind="stable")[: cfg.k_groups]
                                   for i in np.argsort(-p_inner[g, s, h], kind="stable")[: cfg.k]]
                                  for s in range(S)] for g in range(G)])
        kept = np.stack([fill_slots(expert_index[g], capacity, E, order=cfg.order) >= 0 for g in range(G)])
        return {"expert_index": expert_index, "kept": kept}
    K = E if cfg.router == "dense" else cfg.k
    expert_index, kept = token_choice_decisions(probs, K, capacity, order=cfg.order,
                                                batch_prioritized=cfg.batch_prioritized)
    return {"expert_index": expert_index, "kept": kept}


def apply(params: dict, x: jax.Array, cfg, decision: dict) -> jax.Array:
    """y [B, L, D] from fixed integer decisions; differentiable in params and x.

    params: {'kernel', 'group_kernel'?, 'scale'?, 'wi': [list of [E, D, F]], 'wo': [E, F, D]}.
    """
    B, L, D = x.shape
    xg = _groups(x, cfg)
    G, S, _ = xg.shape
    E = cfg.num_experts
    wi, wo = params["wi"], params["wo"]
    # The loop over experts: every expert on every token, [E] x [G, S, D].
    outs = [ffn(xg.reshape(G * S, D), [w[e] for w in wi], wo[e], cfg.activation).reshape(G, S, D)
            for e in range(E)]
    y = jnp.zeros((G, S, D), jnp.float32)

    if cfg.router == "soft":
        kernel = params["kernel"]  # [D, E, P]
        phi = kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True)
        x32 = xg.astype(jnp.float32)
        xn = x32 / (jnp.linalg.norm(x32, axis=-1, keepdims=True) + 1e-6)
        logits = params["scale"] * jnp.einsum("gsd,dep->gsep", xn, phi)
        P = logits.shape[-1]
        for g in range(G):
            combine = jax.nn.softmax(logits[g].reshape(S, E * P), axis=-1)  # over all slots
            for e in range(E):
                for p in range(P):
                    slot_in = jax.nn.softmax(logits[g, :, e, p]) @ xg[g]  # over tokens: [D]
                    slot_out = ffn(slot_in[None], [w[e] for w in wi], wo[e], cfg.activation)[0]
                    y = y.at[g].add(combine[:, e * P + p][:, None] * slot_out[None])
        return y.reshape(B, L, D)

    probs, p_outer, p_inner = _router_probs(params, xg, cfg)
    if cfg.router == "expert_choice":
        taken = np.zeros((G, S, E))  # taken[g, s, e] = 1 iff expert e chose token s
        for g in range(G):
            for e in range(E):
                taken[g, decision["chosen"][g, e], e] = 1.0
        gate = probs * taken  # [G, S, E]
    else:
        if cfg.router == "hierarchical":
            probs = (p_outer[..., None] * p_inner).reshape(G, S, E)  # p(group) * p(expert | group)
        one_hot = np.eye(E)[decision["expert_index"]]  # [G, S, K, E], constant
        w = jnp.einsum("gse,gske->gsk", probs, one_hot)  # probability of each choice
        if cfg.renormalize or cfg.router == "noisy_top_k":
            w = w / jnp.sum(w, axis=-1, keepdims=True)
        gate = jnp.einsum("gsk,gske->gse", w * decision["kept"], one_hot)  # [G, S, E]
    for e in range(E):
        y = y + gate[..., e:e + 1] * outs[e]
    return y.reshape(B, L, D)
