"""The two model kinds: a T5-style encoder-decoder (Switch, ST-MoE) and a decoder-only LM
(Mixtral, DeepSeekMoE). Both return float32 logits and a dict of auxiliary MoE outputs:
{'balance_loss', 'z_loss'} averaged over every MoE layer, and 'moe': the per-stack MoEAux whose
leaves have a leading [units] axis (one MoE layer per unit).

Token id 0 is padding; packed sequences carry segment ids (0 = padding) and per-segment
positions. Incremental decoding writes keys and values into a cache of fixed length M and routes
each step dropless (see MoELayer), so a decode-time token is never dropped.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.models.attention import make_mask
from moe_jax.models.blocks import Stack, mean_aux
from moe_jax.models.config import ModelConfig
from moe_jax.models.position import RelativePositionBias


class Embedding(nnx.Module):
    """Token embeddings [V, D] and the output projection (tied: E^T scaled by D^-0.5, as in T5)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.tied, self.dtype, self.d_model = cfg.tie_embeddings, cfg.activation_dtype, cfg.d_model
        self.table = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (cfg.vocab_size, cfg.d_model)),
                               out_sharding=("vocab", "embed"))
        if not self.tied:
            init = nnx.initializers.variance_scaling(cfg.init_scale, "fan_in", "truncated_normal")
            self.logits_kernel = nnx.Param(init(rngs.params(), (cfg.d_model, cfg.vocab_size)),
                                           out_sharding=("embed", "vocab"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.table[...][tokens].astype(self.dtype)  # [B, L] -> [B, L, D]

    def logits(self, x: jax.Array) -> jax.Array:
        if self.tied:
            y = jnp.einsum("bld,vd->blv", x, self.table[...].astype(self.dtype)) * self.d_model ** -0.5
        else:
            y = jnp.einsum("bld,dv->blv", x, self.logits_kernel[...].astype(self.dtype))
        return y.astype(jnp.float32)  # [B, L, V]


def _positions(tokens, positions):
    B, L = tokens.shape
    return jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)) if positions is None else positions


def _empty_cache(cfg: ModelConfig, stack: Stack, batch: int, max_len: int, period: int) -> list[dict]:
    """Per layer of a unit: {'k', 'v': [U, B, M, KVH, Dh]}, or MLA's {'latent': [U, B, M, R],
    'k_rope': [U, B, M, Dr]}."""
    period = period or 1
    if cfg.attention == "mla":
        rows = (stack.num_units, batch, max_len)
        return [{"latent": jnp.zeros(rows + (cfg.kv_lora_rank,), cfg.activation_dtype),
                 "k_rope": jnp.zeros(rows + (cfg.qk_rope_head_dim,), cfg.activation_dtype)}
                for _ in range(period)]
    shape = (stack.num_units, batch, max_len, cfg.kv_heads, cfg.head_size)
    return [{"k": jnp.zeros(shape, cfg.activation_dtype), "v": jnp.zeros(shape, cfg.activation_dtype)}
            for _ in range(period)]


class DecoderOnly(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embedding(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
        self.position_bias = (RelativePositionBias(cfg.relative_buckets, cfg.relative_max_distance,
                                                   cfg.num_heads, bidirectional=False, rngs=rngs)
                              if cfg.position == "relative" else None)
        # DeepSeek's first_k_dense_replace: dense layers before the MoE units, scanned on their own.
        prefix = cfg.first_dense_layers
        self.dense_prefix = (Stack(cfg, prefix, 0, causal=True, cross=False, rngs=rngs, final_norm=False)
                             if prefix else None)
        self.decoder = Stack(cfg, cfg.num_decoder_layers - prefix, cfg.decoder_moe_every, causal=True,
                             cross=False, rngs=rngs, first_layer=prefix)

    def _stacks(self, x, caches, **kwargs):
        """The dense prefix (if any), then the decoder stack: (x, decoder MoEAux, caches)."""
        new = {}
        for name, stack in (("dense_prefix", self.dense_prefix), ("decoder", self.decoder)):
            if stack is not None:
                x, aux, new[name] = stack(x, caches=None if caches is None else caches[name], **kwargs)
        return x, aux, None if caches is None else new

    def _bias(self, q_pos, k_pos):
        return None if self.position_bias is None else self.position_bias(q_pos, k_pos)

    def _band(self, mask, q_pos, k_pos):
        """mask bool [B, 1, Lq, Lk] narrowed to keys fewer than model.sliding_window positions back,
        or None without banded layers."""
        window = self.cfg.sliding_window
        return mask & (q_pos[:, None, :, None] - k_pos[:, None, None, :] < window) if window else None

    def __call__(self, tokens, *, segment_ids=None, positions=None, dropless=False):
        """tokens int [B, L] -> (logits float32 [B, L, V], aux)."""
        pos = _positions(tokens, positions)
        seg = jnp.ones_like(tokens) if segment_ids is None else segment_ids
        mask = make_mask(seg, seg, causal=True, q_pos=pos, k_pos=pos)
        x = self.dropout(self.embed(tokens))
        x, aux, _ = self._stacks(x, None, mask=mask, bias=self._bias(pos, pos), positions=pos,
                                 dropless=dropless, band_mask=self._band(mask, pos, pos))
        return self.embed.logits(x), {**mean_aux([aux]), "moe": {"decoder": aux}}

    def init_cache(self, batch: int, max_len: int) -> dict[str, list[dict]]:
        """{'decoder': the decoder stack's cache, 'dense_prefix': the prefix's, if there is one}."""
        cache = {"decoder": _empty_cache(self.cfg, self.decoder, batch, max_len, self.cfg.decoder_moe_every)}
        if self.dense_prefix is not None:
            cache["dense_prefix"] = _empty_cache(self.cfg, self.dense_prefix, batch, max_len, 0)
        return cache

    def decode(self, tokens, cache, *, index, key_valid):
        """One incremental call: tokens int [B, Lq] at positions index ... index + Lq - 1.

        key_valid bool [B, M]: cache positions that hold real tokens, these ones included.
        Returns (logits float32 [B, Lq, V], cache).
        """
        q_pos, k_pos = _decode_positions(tokens, key_valid, index)
        mask = make_mask(jnp.ones_like(tokens), key_valid.astype(jnp.int32), causal=True, q_pos=q_pos,
                         k_pos=k_pos)
        x = self.embed(tokens)
        x, _, cache = self._stacks(x, cache, mask=mask, bias=self._bias(q_pos, k_pos), positions=q_pos,
                                   cache_index=index, dropless=True, band_mask=self._band(mask, q_pos, k_pos))
        return self.embed.logits(x), cache


def _decode_positions(tokens, key_valid, index):
    B, Lq = tokens.shape
    q_pos = jnp.broadcast_to(index + jnp.arange(Lq, dtype=jnp.int32), (B, Lq))
    k_pos = jnp.broadcast_to(jnp.arange(key_valid.shape[1], dtype=jnp.int32), key_valid.shape)
    return q_pos, k_pos


class EncoderDecoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embedding(cfg, rngs=rngs)  # shared by encoder and decoder, as in T5
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
        relative = cfg.position == "relative"
        self.encoder_bias = (RelativePositionBias(cfg.relative_buckets, cfg.relative_max_distance,
                                                  cfg.num_heads, bidirectional=True, rngs=rngs)
                             if relative else None)
        self.decoder_bias = (RelativePositionBias(cfg.relative_buckets, cfg.relative_max_distance,
                                                  cfg.num_heads, bidirectional=False, rngs=rngs)
                             if relative else None)
        self.encoder = Stack(cfg, cfg.num_encoder_layers, cfg.encoder_moe_every, causal=False, cross=False,
                             rngs=rngs)
        self.decoder = Stack(cfg, cfg.num_decoder_layers, cfg.decoder_moe_every, causal=True, cross=True,
                             rngs=rngs)

    def encode(self, inputs, *, segment_ids=None, positions=None):
        """inputs int [B, Li] -> (encoded [B, Li, D], encoder MoEAux or None)."""
        pos = _positions(inputs, positions)
        seg = (inputs != 0).astype(jnp.int32) if segment_ids is None else segment_ids
        bias = None if self.encoder_bias is None else self.encoder_bias(pos, pos)
        x = self.dropout(self.embed(inputs))
        x, aux, _ = self.encoder(x, mask=make_mask(seg, seg, causal=False), bias=bias, positions=pos)
        return self.dropout(x), aux

    def __call__(self, inputs, decoder_inputs, *, input_segment_ids=None, input_positions=None,
                 decoder_segment_ids=None, decoder_positions=None, dropless=False):
        """inputs int [B, Li], decoder_inputs int [B, Lt] (targets shifted right, starting with 0)
        -> (logits float32 [B, Lt, V], aux)."""
        encoded, enc_aux = self.encode(inputs, segment_ids=input_segment_ids, positions=input_positions)
        in_seg = (inputs != 0).astype(jnp.int32) if input_segment_ids is None else input_segment_ids
        pos = _positions(decoder_inputs, decoder_positions)
        seg = jnp.ones_like(decoder_inputs) if decoder_segment_ids is None else decoder_segment_ids
        bias = None if self.decoder_bias is None else self.decoder_bias(pos, pos)
        x = self.dropout(self.embed(decoder_inputs))
        x, dec_aux, _ = self.decoder(x, mask=make_mask(seg, seg, causal=True, q_pos=pos, k_pos=pos),
                                     bias=bias, positions=pos, encoded=encoded,
                                     cross_mask=make_mask(seg, in_seg, causal=False),
                                     dropless=dropless)
        x = self.dropout(x)
        return self.embed.logits(x), {**mean_aux([enc_aux, dec_aux]),
                                      "moe": {"encoder": enc_aux, "decoder": dec_aux}}

    def init_cache(self, batch: int, max_len: int) -> list[dict]:
        return _empty_cache(self.cfg, self.decoder, batch, max_len, self.cfg.decoder_moe_every)

    def decode(self, tokens, cache, *, index, key_valid, encoded, input_valid):
        """Incremental decoder call (see DecoderOnly.decode); encoded [B, Li, D], input_valid bool [B, Li]."""
        q_pos, k_pos = _decode_positions(tokens, key_valid, index)
        ones = jnp.ones_like(tokens)
        mask = make_mask(ones, key_valid.astype(jnp.int32), causal=True, q_pos=q_pos, k_pos=k_pos)
        bias = None if self.decoder_bias is None else self.decoder_bias(q_pos, k_pos)
        x = self.embed(tokens)
        x, _, cache = self.decoder(x, mask=mask, bias=bias, positions=q_pos, encoded=encoded,
                                   cross_mask=make_mask(ones, input_valid.astype(jnp.int32), causal=False),
                                   caches=cache, cache_index=index, dropless=True)
        return self.embed.logits(x), cache


MODELS = {"encoder_decoder": EncoderDecoder, "decoder": DecoderOnly}  # model.kind -> its module


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> DecoderOnly | EncoderDecoder:
    return MODELS[cfg.kind](cfg, rngs=rngs)
