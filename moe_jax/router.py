"""The router module: parameters that score tokens against experts, in float32.

Switch (Fedus et al. 2021, Table 2) found a bfloat16 router unstable and a float32 router inside
a bfloat16 model stable: the kernel is float32 and the input is cast to float32, whatever the
model's dtype (moe.router_dtype='bfloat16' rounds the router matmul, for that ablation only). Init: truncated normal with std sqrt(scale / d_model), scale 0.1 (Switch Table 3).
Training-only input jitter (Switch) multiplies router inputs by U[1-eps, 1+eps]. The routing
decision itself is made by the pure functions in moe_jax.routing; `fast_tokens_choose` is
routing.tokens_choose's common case (no choice bias, every choice dispatched) in fewer passes
over the [G, S, E] logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import routing
from moe_jax.experts import fan_in_init
from moe_jax.moe_config import MoEConfig
from moe_jax.routing import losses
from moe_jax.routing.token_choice import TokenChoice, bpr_token_order, check_capacity, check_logits, route_choices

MAX_K_BY_MAX = 2  # top-k by k rounds of max up to this k, lax.top_k beyond


def project(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """[G, S, D] x [D, ...] -> [G, S, ...] as one [G*S, D] matmul: with two leading axes XLA:CPU
    transposes x to form the kernel's gradient."""
    G, S, D = x.shape
    out = x.reshape(G * S, D) @ kernel.reshape(D, -1)  # [G*S, D] x [D, E] -> [G*S, E]
    return out.reshape(G, S, *kernel.shape[1:])


def fast_tokens_choose(logits: jax.Array, *, k: int, capacity: int | None, renormalize: bool = False,
                       order: str = "rank_major", batch_prioritized: bool = False) -> TokenChoice:
    """routing.tokens_choose(logits, ...) without choice_bias or random second choices: the same
    decision, weights and losses, in fewer passes over logits [G, S, E].

    One max / exp / sum pass yields the probabilities, the combine weights and the z-loss's
    logsumexp (tokens_choose computes softmax and logsumexp apart). Choices are k rounds of max,
    the lowest index winning ties as in lax.top_k, which with argmax is several times slower than
    a max on XLA:CPU.
    """
    check_logits(logits)
    check_capacity(capacity)
    G, S, E = logits.shape
    if not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in [1, num_experts={E}], got {k!r}")
    logits = logits.astype(jnp.float32)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # [G, S, 1]
    exp = jnp.exp(logits - top)  # [G, S, E]
    denom = jnp.sum(exp, axis=-1, keepdims=True)  # [G, S, 1]
    probs = exp / denom  # [G, S, E]
    if k <= MAX_K_BY_MAX:
        iota = jnp.arange(E, dtype=jnp.int32)
        scores, picks = jax.lax.stop_gradient(logits), []
        for i in range(k):
            best = top if i == 0 else jnp.max(scores, axis=-1, keepdims=True)  # [G, S, 1]
            pick = jnp.min(jnp.where(scores == best, iota, E - 1), axis=-1, keepdims=True)  # [G, S, 1]
            picks.append(pick)
            if i + 1 < k:
                scores = jnp.where(iota == pick, -jnp.inf, scores)  # [G, S, E]
        expert_index = jnp.concatenate(picks, axis=-1)  # [G, S, K]
    else:
        expert_index = jax.lax.top_k(jax.lax.stop_gradient(logits), k)[1]  # [G, S, K]
    weight = jnp.exp(jnp.take_along_axis(logits, expert_index, axis=-1) - top) / denom  # [G, S, K]
    token_order = bpr_token_order(1.0 / denom[..., 0]) if batch_prioritized else None  # by top-1 probability
    if renormalize:
        weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
    position, weight = route_choices(expert_index, weight, num_experts=E, capacity=capacity, order=order,
                                     token_order=token_order)
    return TokenChoice(
        expert_index=expert_index,
        position=position,
        weight=weight,
        probs=probs,
        balance_loss=losses.load_balancing_loss(probs, expert_index),
        z_loss=jnp.mean(jnp.square(top[..., 0] + jnp.log(denom[..., 0]))),  # logsumexp^2
        capacity=capacity,
    )


class BalanceBias(nnx.Variable):
    """DeepSeek-V3's per-expert selection bias: not trained by gradients, nudged toward balance."""


class Router(nnx.Module):
    def __init__(self, cfg: MoEConfig, d_model: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        E = cfg.num_experts
        init = fan_in_init(cfg.router_init_scale)

        def kernel(*out_shape, names=(None,)):
            return nnx.Param(init(rngs.params(), (d_model, *out_shape), jnp.float32),
                             out_sharding=("embed", *names))

        if cfg.router == "soft":
            P = cfg.soft_slots_per_expert
            self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (d_model, E * P), jnp.float32)
                                    .reshape(d_model, E, P), out_sharding=("embed", None, None))
            self.scale = nnx.Param(jnp.ones((), jnp.float32))  # soft MoE's learned scale of normalized logits
        else:
            self.kernel = kernel(E)
        if cfg.router == "hierarchical":
            self.group_kernel = kernel(cfg.num_expert_groups)
        if cfg.router == "noisy_top_k":  # Shazeer et al. initialise the noise weights to zero.
            self.noise_kernel = nnx.Param(jnp.zeros((d_model, E), jnp.float32), out_sharding=("embed", None))
        if cfg.bias_update_rate > 0:
            self.balance_bias = BalanceBias(jnp.zeros((E,), jnp.float32))
        self.rng = rngs["router"].fork()  # its own stream (falls back to 'default'), as nnx.Dropout does

    def __call__(self, x: jax.Array, *, capacity: int | None, train: bool):
        """x [G, S, D] -> a routing decision (TokenChoice, ExpertChoice or SoftRouting)."""
        cfg = self.cfg
        x = x.astype(jnp.float32)
        if train and cfg.jitter_eps > 0:
            x = x * jax.random.uniform(self.rng(), x.shape, jnp.float32,
                                       1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)  # [G, S, D]
        if cfg.router == "soft":
            # Soft MoE's normalization (Puigcerver et al. 2023, Sec. 2.3): l2-normalized tokens and slots.
            phi = self.kernel[...] / jnp.linalg.norm(self.kernel[...], axis=0, keepdims=True)  # [D, E, P]
            xn = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)  # [G, S, D]
            return routing.soft_route(self.scale[...] * jnp.einsum("gsd,dep->gsep", xn, phi))
        if cfg.router_dtype == "bfloat16":  # input, kernel and logits rounded to bfloat16 (Switch Table 2)
            logits = project(x.astype(jnp.bfloat16), self.kernel[...].astype(jnp.bfloat16))
        else:
            logits = project(x, self.kernel[...])  # [G, S, E]
        opts = dict(order=cfg.order, batch_prioritized=cfg.batch_prioritized)
        if cfg.router == "top_k":
            bias = self.balance_bias[...] if cfg.bias_update_rate > 0 else None
            random_second = train and cfg.second_choice == "random"  # evaluation dispatches every choice
            if bias is None and not random_second:
                decision = fast_tokens_choose(logits, k=cfg.k, capacity=capacity, renormalize=cfg.renormalize, **opts)
            else:
                decision = routing.tokens_choose(
                    logits, k=cfg.k, capacity=capacity, renormalize=cfg.renormalize,
                    second_choice="random" if random_second else "all", choice_bias=bias,
                    rng=self.rng() if random_second else None, **opts)
            if train and cfg.bias_update_rate > 0:
                self._update_balance_bias(decision)
            return decision
        if cfg.router == "expert_choice":
            return routing.experts_choose(logits, capacity=capacity)
        if cfg.router == "dense":
            return routing.dense_choose(logits)
        if cfg.router == "noisy_top_k":
            noise_logits = project(x, self.noise_kernel[...])  # [G, S, E]
            return routing.noisy_tokens_choose(logits, noise_logits, k=cfg.k, capacity=capacity,
                                               rng=self.rng() if train else None, **opts)
        # hierarchical
        G, S, E = logits.shape
        outer = project(x, self.group_kernel[...])  # [G, S, E1]
        inner = logits.reshape(G, S, cfg.num_expert_groups, E // cfg.num_expert_groups)  # [G, S, E1, E2]
        return routing.hierarchical_choose(outer, inner, k_outer=cfg.k_groups, k_inner=cfg.k, capacity=capacity,
                                           renormalize=cfg.renormalize, **opts)

    def _update_balance_bias(self, decision: routing.TokenChoice) -> None:
        """b_e += rate * sign(mean load - load_e), from this batch's routed assignments (DeepSeek-V3)."""
        load = jax.lax.stop_gradient(routing.routing_stats(decision)["routed_per_expert"])  # [E]
        self.balance_bias[...] = self.balance_bias[...] + self.cfg.bias_update_rate * jnp.sign(jnp.mean(load) - load)
