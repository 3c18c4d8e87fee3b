"""Optimisers and learning-rate schedules (optax).

Default, as T5 and Switch (Raffel et al. 2020; Fedus et al. 2021): Adafactor (Shazeer & Stern
2018) with parameter-scaled updates and the inverse-square-root schedule: a linear warmup to the
peak rate over warmup_steps, then peak * sqrt(warmup / step). (T5 itself held the rate constant
during warmup; a linear ramp is the more common choice today and is what we use.) AdamW with a
cosine schedule is the alternative (Mixtral- and DeepSeek-style runs). Gradients are clipped by
global norm when grad_clip_norm > 0.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("rsqrt", "cosine", "constant")
# optax factors Adafactor's second moments over an array's two largest axes only when the second
# largest has at least this many entries. Attention kernels are stored [units, D, H, Dh] with
# Dh = 64 in T5-sized models; optax's default of 128 would keep their full second moments.
ADAFACTOR_MIN_DIM_TO_FACTOR = 32


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    peak, warmup, total = config.learning_rate, max(config.warmup_steps, 1), config.num_train_steps
    if config.schedule == "constant":
        return (optax.linear_schedule(0.0, peak, warmup) if config.warmup_steps
                else optax.constant_schedule(peak))
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1),
                                                  end_value=0.1 * peak)

    def rsqrt(step):
        step = jnp.asarray(step, jnp.float32) + 1.0
        return peak * jnp.minimum(step / warmup, 1.0) * jnp.sqrt(warmup / jnp.maximum(step, warmup))
    return rsqrt


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(config)
    if config.optimizer == "adafactor":
        tx = optax.adafactor(schedule, min_dim_size_to_factor=ADAFACTOR_MIN_DIM_TO_FACTOR,
                             weight_decay_rate=config.weight_decay or None)
    else:
        tx = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=config.weight_decay)
    if config.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx
