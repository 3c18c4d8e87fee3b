"""Transformer layers and scanned stacks of them (pre-norm T5.1.1 layout, Raffel et al. 2020).

A layer: x += attention(norm(x)); [x += cross_attention(norm(x), encoded)]; x += ffn(norm(x)),
where ffn is the dense FFN or the MoE layer, and ST-MoE (Zoph et al. 2022) adds a dense FFN right
after each sparse one. A unit is `moe_every` layers whose last FFN is sparse; a stack scans one
unit over its depth (jax.lax.scan through nnx.scan), so compile time does not grow with depth.
Which layers attend to a band only (model.sliding_window, gpt-oss's alternation) is data the
scan carries per layer, so banded and full layers still share one unit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.experts import EXPERT_MATMUL, FeedForward
from moe_jax.models.attention import Attention
from moe_jax.models.config import ModelConfig
from moe_jax.models.mla import LatentAttention
from moe_jax.models.norm import RMSNorm
from moe_jax.moe_layer import EXPERT_INPUTS, MoEAux, MoELayer


def remat_policy(name: str):
    """What a unit keeps for the backward pass under model.remat; the rest is recomputed there.

    'none': everything (no rematerialisation). 'minimal': the outputs of matmuls against weights
    (attention projections, FFNs, router, experts; MaxText's 'minimal') and the dispatched expert
    buffers, recomputing norms, activations, attention scores and routing decisions from them; the
    weights' compute-dtype casts are recomputed too instead of being stacked per layer. 'full':
    only the unit's input. (A stack of a single unit saves nothing: XLA removes its one-trip scan
    loop and may merge the recomputation back into the forward pass.)
    """
    if name == "minimal":
        return jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # [.., D] x [D, ..]: no batch axes
            # [E, G*C, D] buffers
            jax.checkpoint_policies.save_only_these_names(EXPERT_INPUTS, EXPERT_MATMUL))
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    raise ValueError(f"no remat policy {name!r}")


class Layer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, causal: bool, cross: bool, sparse: bool, rngs: nnx.Rngs):
        dt = cfg.activation_dtype

        def norm():
            return RMSNorm(cfg.d_model, cfg.norm_eps, dt)

        def dense_ffn():
            # T5's dropout on the FFN's hidden activations, at the model's rate (experts use
            # moe.expert_dropout).
            return FeedForward(cfg.d_model, cfg.d_ff, activation=cfg.activation,
                               dropout_rate=cfg.dropout_rate, init_scale=cfg.init_scale, dtype=dt, rngs=rngs)

        self_attention = LatentAttention if cfg.attention == "mla" else Attention
        self.attn_norm, self.attn = norm(), self_attention(cfg, rngs=rngs)
        self.cross_norm = norm() if cross else None
        self.cross = Attention(cfg, rngs=rngs) if cross else None
        self.ffn_norm = norm()
        self.ffn = (MoELayer(cfg.moe, cfg.d_model, causal=causal, init_scale=cfg.init_scale, dtype=dt,
                             rngs=rngs)
                    if sparse else dense_ffn())
        extra = sparse and cfg.moe_extra_dense_ffn
        self.extra_norm = norm() if extra else None
        self.extra_ffn = dense_ffn() if extra else None
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def __call__(self, x, *, mask, bias, positions, encoded=None, cross_mask=None, cache=None,
                 cache_index=None, dropless=False, band_mask=None, windowed=None):
        """x [B, L, D] -> (x [B, L, D], MoEAux or None, cache or None). band_mask bool [B, 1, L, M]
        replaces mask where windowed (a bool scalar) holds."""
        if band_mask is not None:
            mask = jnp.where(windowed, band_mask, mask)
        h, cache = self.attn(self.attn_norm(x), mask=mask, bias=bias, q_pos=positions, cache=cache,
                             cache_index=cache_index)
        x = x + self.dropout(h)
        if self.cross is not None:
            h, _ = self.cross(self.cross_norm(x), encoded, mask=cross_mask)
            x = x + self.dropout(h)
        aux = None
        if isinstance(self.ffn, MoELayer):
            h, aux = self.ffn(self.ffn_norm(x), dropless=dropless)
        else:
            h = self.ffn(self.ffn_norm(x))
        x = x + self.dropout(h)
        if self.extra_ffn is not None:
            x = x + self.dropout(self.extra_ffn(self.extra_norm(x)))
        return x, aux, cache


class Unit(nnx.Module):
    """`period` layers; the last one's FFN is sparse when the stack has MoE layers."""

    def __init__(self, cfg: ModelConfig, period: int, *, causal: bool, cross: bool, rngs: nnx.Rngs):
        sparse = period > 0
        size = max(period, 1)
        self.layers = nnx.List([Layer(cfg, causal=causal, cross=cross, sparse=sparse and i == size - 1,
                                      rngs=rngs)
                                for i in range(size)])

    def __call__(self, x, caches, windowed, **kwargs):
        """caches: None, or one cache dict per layer; windowed bool [period]: banded layers.
        Returns (x, MoEAux or None, caches)."""
        aux, new_caches = None, []
        for i, layer in enumerate(self.layers):
            x, layer_aux, cache = layer(x, cache=None if caches is None else caches[i], windowed=windowed[i],
                                        **kwargs)
            aux = layer_aux if layer_aux is not None else aux
            new_caches.append(cache)
        return x, aux, None if caches is None else new_caches


class Stack(nnx.Module):
    """A stack of identical units, scanned (or unrolled, for comparison), then a final norm (unless
    another stack follows it: a decoder's dense prefix)."""

    def __init__(self, cfg: ModelConfig, depth: int, period: int, *, causal: bool, cross: bool,
                 rngs: nnx.Rngs, final_norm: bool = True, first_layer: int = 0):
        self.num_units = depth // max(period, 1)
        self.scan, self.remat = cfg.scan_layers, cfg.remat
        size = max(period, 1)
        # bool [U, period]: which layers attend to a band (first_layer: the stack's first layer's index)
        self.windowed = tuple(tuple(cfg.windowed(first_layer + u * size + j) for j in range(size))
                              for u in range(self.num_units))

        def make_unit(rngs):
            return Unit(cfg, period, causal=causal, cross=cross, rngs=rngs)

        if self.scan:
            make_units = nnx.split_rngs(splits=self.num_units)(
                nnx.vmap(make_unit, in_axes=(0,), out_axes=0,
                         transform_metadata={nnx.PARTITION_NAME: "layers"}))
            self.units = make_units(rngs)
        else:
            self.units = nnx.List([make_unit(rngs) for _ in range(self.num_units)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.activation_dtype) if final_norm else None

    def __call__(self, x, *, caches=None, **kwargs):
        """x [B, L, D]; caches: None, or per-layer caches stacked over units ([U, ...] leaves).

        Returns (y [B, L, D], MoEAux with a leading [U] axis or None, caches).
        """
        def run(unit, x, caches, windowed):
            return unit(x, caches, windowed, **kwargs)

        if self.remat != "none":
            # prevent_cse only matters outside a scan (JAX's advice for scanned remat).
            run = nnx.remat(run, policy=remat_policy(self.remat), prevent_cse=not self.scan)
        windowed = jnp.asarray(self.windowed, bool)  # [U, period]
        if self.scan:
            @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))
            def step(x, unit, caches, windowed):
                x, aux, caches = run(unit, x, caches, windowed)
                return x, (aux, caches)

            x, (aux, caches) = step(x, self.units, caches, windowed)
        else:
            auxes, unit_caches = [], []
            for u, unit in enumerate(self.units):
                x, aux, cache = run(unit, x, None if caches is None else jax.tree.map(lambda c: c[u], caches),
                                    windowed[u])
                auxes.append(aux)
                unit_caches.append(cache)
            aux = None if auxes[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *auxes)
            caches = None if caches is None else jax.tree.map(lambda *a: jnp.stack(a), *unit_caches)
        return (x if self.final_norm is None else self.final_norm(x)), aux, caches


def mean_aux(auxes: list[MoEAux | None]) -> dict:
    """Average balance and z losses over every MoE layer of the model: {'balance_loss', 'z_loss'}."""
    present = [a for a in auxes if a is not None]
    if not present:
        return {"balance_loss": jnp.zeros((), jnp.float32), "z_loss": jnp.zeros((), jnp.float32)}
    return {name: jnp.mean(jnp.concatenate([jnp.ravel(getattr(a, name)) for a in present]))
            for name in ("balance_loss", "z_loss")}
