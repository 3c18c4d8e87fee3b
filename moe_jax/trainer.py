"""The training and evaluation steps, as pure functions of a TrainState.

Objective (Switch, Fedus et al. 2021; ST-MoE, Zoph et al. 2022): token cross-entropy over the
targets' non-padding positions + balance_loss_weight x the mean balancing loss of the MoE layers
+ z_loss_weight x their mean router z-loss. A step with grad_accum_steps = A splits the global
batch into A micro-batches and sums their gradients, each micro-batch's cross-entropy divided by
the whole batch's target count, so the update equals the one-shot batch's exactly.

The model lives as (graphdef, params, rest): params are the trained nnx.Params; rest holds the
other variables (RNG stream counters, DeepSeek-V3's balance bias), threaded through steps so a
resumed run draws the same random numbers.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_jax import optim, sharding
from moe_jax.models import ModelConfig, build_model, generate
from moe_jax.moe_layer import MoEAux


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # nested dict of the nnx.Params' arrays
    rest: Any  # nested dict of every other variable's arrays (RNG keys and counts, balance bias)
    opt_state: Any


def routing_metrics(moe_aux: dict[str, MoEAux | None]) -> dict[str, dict]:
    """{'routing': {stack: {statistic: [units, ...]}}}: each stack's statistics and per-layer losses,
    with a leading [units] axis (moe_jax.metrics.layer_stats turns them into per-layer records)."""
    return {"routing": {stack: {"balance_loss": aux.balance_loss, "z_loss": aux.z_loss, **aux.stats}
                        for stack, aux in moe_aux.items() if aux is not None}}


class Trainer:
    """Builds the model abstractly once and holds the static pieces of the step functions, the
    mesh and the shardings of the state and the batch."""

    def __init__(self, config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh: Mesh | None = None):
        self.config, self.model_cfg = config, model_cfg
        self.tx = optim.make_optimizer(config)
        self.schedule = optim.learning_rate_schedule(config)
        abstract = nnx.eval_shape(lambda: self._build(0))
        self.graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
        self.param_logical_axes = sharding.logical_axes(abstract)
        abstract.eval()
        self.eval_graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
        self.mesh = sharding.make_mesh(config.mesh_shape) if mesh is None else mesh
        self.rules = sharding.rules_for(config)
        self._check_divisibility()
        self.state_sharding = self._state_sharding()
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, sharding.mesh_spec(("batch",), (config.batch_size,),
                                                                          self.mesh, self.rules))

    def _check_divisibility(self) -> None:
        shards = math.prod(self.mesh.shape[a] for a in sharding.MESH_AXES
                           if a in (self.rules.get("batch") or ()))
        per_step = self.config.batch_size // self.config.grad_accum_steps
        if per_step % shards:
            raise sharding.ShardingError(
                f"config.batch_size={self.config.batch_size} (per micro-batch {per_step}) must be divisible "
                f"by the {shards} batch shards of config.mesh_shape={tuple(self.mesh.shape.values())}")

    def _state_sharding(self) -> TrainState:
        abstract = self.abstract_state()
        params = sharding.tree_shardings(abstract.params, self.param_logical_axes, self.mesh,
                                         self.rules)
        replicate = NamedSharding(self.mesh, PartitionSpec())
        return TrainState(step=replicate, params=params,
                          rest=jax.tree.map(lambda _: replicate, abstract.rest),
                          opt_state=sharding.matching_shardings(abstract.opt_state, abstract.params, params,
                                                                self.mesh))

    def _under_mesh(self, fn):
        def traced(*args):
            with sharding.use_mesh(self.mesh, self.rules):
                return fn(*args)
        return traced

    def create_state(self, seed: int) -> TrainState:
        """A fresh state, created directly in its shards (no full copy on one device)."""
        return jax.jit(self._under_mesh(lambda: self.init_state(seed)), out_shardings=self.state_sharding)()

    def jit_train_step(self):
        return jax.jit(self._under_mesh(self.train_step),
                       in_shardings=(self.state_sharding, self.batch_sharding),
                       out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)

    def jit_loss_and_grads(self):
        """(loss, gradients) of one batch taken as a single micro-batch, sharded like the state: for
        checks and debugging (the train step's objective when grad_accum_steps is 1)."""
        def loss_and_grads(state, batch):
            total_weight = jnp.maximum(jnp.sum(batch["decoder_loss_weights"]), 1.0)
            (loss, _), grads = jax.value_and_grad(self._micro_loss, has_aux=True)(
                state.params, state.rest, batch, total_weight)
            return loss, grads
        return jax.jit(self._under_mesh(loss_and_grads),
                       in_shardings=(self.state_sharding, self.batch_sharding),
                       out_shardings=(self.replicated, self.state_sharding.params))

    def jit_eval_step(self):
        return jax.jit(self._under_mesh(self.eval_step),
                       in_shardings=(self.state_sharding, self.batch_sharding),
                       out_shardings=self.replicated)

    def jit_generate(self, **options):
        """moe_jax.models.generate on the mesh, so the MoE layers decode expert-parallel as they train:
        (params, rest, prompts int [B, P], valid bool [B, P], rng) -> int32 [B, max_new_tokens]."""
        def run(params, rest, prompts, valid, rng):
            model = nnx.merge(self.eval_graphdef, params, rest)
            return generate(model, prompts, valid, rng=rng, **options)
        shardings = self.state_sharding
        return jax.jit(self._under_mesh(run), out_shardings=self.replicated,
                       in_shardings=(shardings.params, shardings.rest, *[self.replicated] * 3))

    def shard_batch(self, local_batch: dict) -> dict:
        """Host-local rows -> global arrays laid out over the batch shards."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in local_batch.items()}

    def abstract_sharded_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings (the target of a restore)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state(), self.state_sharding)

    def _build(self, seed: int):
        return build_model(self.model_cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1, router=seed + 2))

    def init_state(self, seed: int) -> TrainState:
        """A fresh state; call under jax.jit (with out_shardings) to create it in place."""
        _, params, rest = nnx.split(self._build(seed), nnx.Param, ...)
        params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                          opt_state=self.tx.init(params))

    def abstract_state(self) -> TrainState:
        return jax.eval_shape(lambda: self.init_state(0))

    def _forward(self, graphdef, params, rest, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        args, kwargs = self.model_cfg.family.model_inputs(batch)
        logits, aux = model(*args, **kwargs)
        return logits, aux, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))

    def _micro_loss(self, params, rest, batch, total_weight):
        logits, aux, rest = self._forward(self.graphdef, params, rest, batch)
        targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, L]
        ce_sum = jnp.sum(ce * weights)
        A = self.config.grad_accum_steps
        aux_loss = (self.config.balance_loss_weight * aux["balance_loss"]
                    + self.config.z_loss_weight * aux["z_loss"]) / A
        correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
        metrics = {"ce_sum": ce_sum, "correct": correct, "balance_loss": aux["balance_loss"] / A,
                   "z_loss": aux["z_loss"] / A,
                   **jax.tree.map(lambda v: v / A, routing_metrics(aux["moe"]))}
        return ce_sum / total_weight + aux_loss, (metrics, rest)

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        A = self.config.grad_accum_steps
        total_weight = jnp.maximum(jnp.sum(batch["decoder_loss_weights"]), 1.0)
        # [B, ...] -> [A, B / A, ...]
        micro = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), batch)
        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)

        def accumulate(carry, mb):
            grads, metrics, rest = carry
            (_, (m, rest)), g = grad_fn(state.params, rest, mb, total_weight)
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m), rest), None

        zero_grads = jax.tree.map(jnp.zeros_like, state.params)
        first = jax.tree.map(lambda x: x[0], micro)
        metric_shapes = jax.eval_shape(
            lambda: self._micro_loss(state.params, state.rest, first, total_weight))[1][0]
        zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
        (grads, metrics, rest), _ = jax.lax.scan(accumulate, (zero_grads, zero_metrics, state.rest), micro)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
        loss = metrics["ce_sum"] / total_weight
        metrics = {**{k: v for k, v in metrics.items() if k not in ("ce_sum", "correct")},
                   "ce": loss, "accuracy": metrics["correct"] / total_weight,
                   "loss": loss + self.config.balance_loss_weight * metrics["balance_loss"]
                   + self.config.z_loss_weight * metrics["z_loss"],
                   "grad_norm": optax.tree.norm(grads), "learning_rate": self.schedule(state.step),
                   "target_tokens": total_weight}
        return new_state, metrics

    def eval_step(self, state: TrainState, batch: dict) -> dict:
        """Sums over the batch (divide by 'target_tokens' after summing over batches)."""
        logits, aux, _ = self._forward(self.eval_graphdef, state.params, state.rest, batch)
        targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return {"ce_sum": jnp.sum(ce * weights),
                "correct": jnp.sum((jnp.argmax(logits, -1) == targets) * weights),
                "target_tokens": jnp.sum(weights), "balance_loss": aux["balance_loss"],
                "z_loss": aux["z_loss"], **routing_metrics(aux["moe"])}


def summarize_eval(sums: dict, num_batches: int) -> dict:
    """Token-weighted loss, negative log perplexity and accuracy; batch-mean routing metrics."""
    tokens = max(float(sums["target_tokens"]), 1.0)
    out = {"loss": sums["ce_sum"] / tokens, "accuracy": sums["correct"] / tokens}
    out["neg_log_perplexity"] = -out["loss"]
    out.update({k: jax.tree.map(lambda v: v / num_batches, v) for k, v in sums.items()
                if k not in ("ce_sum", "correct", "target_tokens")})
    return out
