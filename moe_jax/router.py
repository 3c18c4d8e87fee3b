"""The router module: the parameters of the configured router kind (moe_jax.routers), in float32.

Switch (Fedus et al. 2021, Table 2) found a bfloat16 router unstable and a float32 router inside
a bfloat16 model stable: parameters are float32 and the input is cast to float32, whatever the
model's dtype. Training-only input jitter (Switch) multiplies router inputs by U[1-eps, 1+eps].
With moe.bias_update_rate > 0 it keeps DeepSeek-V3's auxiliary-loss-free selection bias (Wang et
al. 2024), nudged toward balance after every training step; moe.selection_bias keeps one without
updates (an imported checkpoint's e_score_correction_bias). What the parameters are and how they
become a routing decision is the router kind's: this module is the same for every router.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import routers
from moe_jax.moe_config import MoEConfig


class BalanceBias(nnx.Variable):
    """DeepSeek-V3's per-expert selection bias: not trained by gradients, nudged toward balance."""


class Router(nnx.Module):
    def __init__(self, cfg: MoEConfig, d_model: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.kind = routers.get(cfg.router)
        for name, param in self.kind.init_params(cfg, d_model, rngs).items():
            setattr(self, name, param)
        if cfg.has_selection_bias:
            self.balance_bias = BalanceBias(jnp.zeros((cfg.num_experts,), jnp.float32))
        self.rng = rngs["router"].fork()  # its own stream (falls back to 'default'), as nnx.Dropout does

    def choice_bias(self) -> jax.Array | None:
        """The auxiliary-loss-free bias [E] added to the scores that choose experts, or None."""
        return self.balance_bias[...] if self.cfg.has_selection_bias else None

    def __call__(self, x: jax.Array, *, capacity: int | None, train: bool):
        """x [G, S, D] -> the router kind's routing decision."""
        cfg = self.cfg
        x = x.astype(jnp.float32)
        if train and cfg.jitter_eps > 0:
            x = x * jax.random.uniform(self.rng(), x.shape, jnp.float32,
                                       1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)  # [G, S, D]
        decision = self.kind.route(self, x, capacity=capacity, train=train)
        if train and cfg.bias_update_rate > 0:
            self._update_balance_bias(decision)
        return decision

    def _update_balance_bias(self, decision) -> None:
        """b_e += rate * sign(mean load - load_e), from this batch's routed assignments (DeepSeek-V3)."""
        load = jax.lax.stop_gradient(decision.stats()["routed_per_expert"])  # [E]
        self.balance_bias[...] = (self.balance_bias[...]
                                  + self.cfg.bias_update_rate * jnp.sign(jnp.mean(load) - load))
