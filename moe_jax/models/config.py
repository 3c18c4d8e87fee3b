"""Options of a transformer, validated before anything is built.

Two kinds: 'encoder_decoder' (T5.1.1 / Switch / ST-MoE, Raffel et al. 2020, Fedus et al. 2021,
Zoph et al. 2022) and 'decoder' (decoder-only LM; Mixtral, Jiang et al. 2024; DeepSeekMoE,
Dai et al. 2024). Layers come in scanned units of `*_moe_every` layers whose last FFN is the MoE
layer (Switch: every 2nd, ST-MoE: every 4th, Switch-C: every layer; 0 = a dense model).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from moe_jax import validation
from moe_jax.experts import ACTIVATIONS
from moe_jax.models import families
from moe_jax.moe_config import MoEConfig

KINDS = tuple(families.FAMILIES)
POSITIONS = ("relative", "rope")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = ("none", "minimal", "full")  # see models.blocks.remat_policy
ATTENTIONS = ("mha", "mla")  # multi-head (grouped-query) attention; multi-head latent (models.mla)
ROPE_SCALINGS = ("none", "yarn")  # models.position: plain RoPE, or YaRN's context extension
YARN_DEFAULTS = {"yarn_factor": 1.0, "yarn_original_length": 4096, "yarn_beta_fast": 32.0,
                 "yarn_beta_slow": 1.0, "yarn_mscale": 0.0, "yarn_mscale_all_dim": 0.0, "yarn_truncate": True}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: str = "encoder_decoder"
    vocab_size: int = 32128
    d_model: int = 768
    num_heads: int = 12
    num_kv_heads: int = 0  # 0: as many as num_heads; fewer: grouped-query attention
    head_dim: int = 64  # 0: d_model // num_heads
    d_ff: int = 2048  # dense FFN width
    activation: str = "geglu"  # T5.1.1: gated GELU; T5 / Switch: relu; Mixtral: swiglu
    num_encoder_layers: int = 12  # ignored by decoder-only models
    num_decoder_layers: int = 12
    encoder_moe_every: int = 2
    decoder_moe_every: int = 2
    moe_extra_dense_ffn: bool = False  # ST-MoE: a dense FFN right after each sparse one
    # DeepSeek-V3's first_k_dense_replace (DeepSeekMoE: 1, V3: 3): the first k of the decoder's
    # num_decoder_layers are dense (FFN width d_ff), a stack of their own before the MoE units.
    first_dense_layers: int = 0
    position: str = "relative"  # T5 relative position bias, or rotary embeddings
    relative_buckets: int = 32
    relative_max_distance: int = 128
    rope_theta: float = 10000.0
    # YaRN (Peng et al. 2023; models.position) with rope_scaling='yarn': the context
    # yarn_original_length stretched yarn_factor times; 0 for an mscale means "not given".
    rope_scaling: str = "none"
    yarn_factor: float = 1.0
    yarn_original_length: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 0.0
    yarn_mscale_all_dim: float = 0.0
    yarn_truncate: bool = True
    qk_norm: bool = False  # Qwen3: RMSNorm over Dh of each head's query and key (models/attention.py)
    # gpt-oss (OpenAI 2025): biases on the q/k/v/o projections; a learned per-head sink logit in
    # each softmax's denominator; banded attention over the last sliding_window positions (0: none)
    # in every layer but each full_attention_every-th (0: every layer banded; gpt-oss: 2).
    attention_bias: bool = False
    attention_sinks: bool = False
    sliding_window: int = 0
    full_attention_every: int = 0
    tie_embeddings: bool = False  # T5: tied (logits scaled by d_model^-0.5); T5.1.1: untied
    dropout_rate: float = 0.0
    norm_eps: float = 1e-6
    dtype: str = "float32"  # activations; parameters stay float32
    scan_layers: bool = True
    remat: str = "none"  # recompute activations in the backward pass: "none", "minimal" or "full"
    # Variance scale s of every fan-in-initialised weight matrix (std sqrt(s / fan_in)): attention,
    # dense FFNs, experts, output projection. Switch (Sec. 2.4) uses 0.1; T5 1.0. Embedding tables
    # keep their own init, and the router its moe.router_init_scale.
    init_scale: float = 1.0
    # Multi-head latent attention (DeepSeek-V2/V3, models.mla) with model.attention='mla'.
    attention: str = "mha"
    q_lora_rank: int = 0  # 0: a direct query projection (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)

    def __post_init__(self):
        def fail(field, message):
            raise ValueError(f"model.{field}{'' if message.startswith('=') else ' '}{message}")

        for field, allowed in (("kind", KINDS), ("position", POSITIONS), ("activation", ACTIVATIONS),
                               ("dtype", DTYPES), ("remat", REMAT_POLICIES), ("attention", ATTENTIONS),
                               ("rope_scaling", ROPE_SCALINGS)):
            validation.choice("model", field, getattr(self, field), allowed)
        for field in ("vocab_size", "d_model", "num_heads", "d_ff", "num_decoder_layers", "relative_buckets",
                      "relative_max_distance"):
            validation.integer("model", field, getattr(self, field), 1)
        for field in ("num_kv_heads", "head_dim", "num_encoder_layers", "encoder_moe_every",
                      "decoder_moe_every", "first_dense_layers"):
            validation.integer("model", field, getattr(self, field), 0)
        if not isinstance(self.qk_norm, bool):
            fail("qk_norm", f"must be True or False, got {self.qk_norm!r}")
        validation.number("model", "init_scale", self.init_scale, above=0)
        if not 0 <= self.dropout_rate < 1:
            fail("dropout_rate", f"must be in [0, 1), got {self.dropout_rate}")
        if self.head_dim == 0 and self.d_model % self.num_heads:
            fail("num_heads", f"={self.num_heads} must divide model.d_model={self.d_model} "
                 "when model.head_dim=0 (or set model.head_dim)")
        if self.kv_heads > self.num_heads or self.num_heads % self.kv_heads:
            fail("num_kv_heads", f"={self.num_kv_heads} must divide model.num_heads={self.num_heads}")
        if self.position == "rope" and self.head_size % 2:
            fail("head_dim", f"must be even for rotary embeddings, got {self.head_size}")
        self._check_yarn(fail)
        self._check_gpt_oss_attention(fail)
        if self.attention == "mla":
            self._check_mla(fail)
        if self.first_dense_layers:
            self._check_dense_prefix(fail)
        if "encoder" in self.family.streams and self.num_encoder_layers < 1:
            fail("num_encoder_layers", "must be >= 1 for an encoder-decoder model")
        prefix = f" - model.first_dense_layers={self.first_dense_layers}" if self.first_dense_layers else ""
        for name, depth, every in self.family.stacks(self):
            if every and depth % every:
                fail(f"{name}_moe_every", f"={every} must divide model.num_{name}_layers{prefix}={depth}: "
                     f"layers are scanned in units of {every} whose last FFN is sparse")
        if self.decoder_moe_every:
            # Decoders are causal: refuse routing that lets a later token change an earlier output.
            try:
                self.moe.check_causal()
            except ValueError as e:
                raise ValueError(f"{e} (the decoder stack is causal; in an encoder-decoder model, "
                                 "model.decoder_moe_every=0 keeps such a router "
                                 "in the encoder only)") from None

    def _check_dense_prefix(self, fail):
        if self.kind != "decoder" or not self.decoder_moe_every:
            fail("first_dense_layers", f"={self.first_dense_layers} needs a decoder-only model with MoE "
                 f"layers (model.kind='decoder', model.decoder_moe_every >= 1), got kind={self.kind!r}, "
                 f"decoder_moe_every={self.decoder_moe_every}")
        if self.first_dense_layers >= self.num_decoder_layers:
            fail("first_dense_layers", f"={self.first_dense_layers} must be below model.num_decoder_layers="
                 f"{self.num_decoder_layers}: it counts the dense layers among them")

    def _check_gpt_oss_attention(self, fail):
        for field in ("attention_bias", "attention_sinks"):
            if not isinstance(getattr(self, field), bool):
                fail(field, f"must be True or False, got {getattr(self, field)!r}")
        for field in ("sliding_window", "full_attention_every"):
            validation.integer("model", field, getattr(self, field), 0)
        if self.full_attention_every and not self.sliding_window:
            fail("full_attention_every", f"={self.full_attention_every} spaces the full-attention layers "
                 "among banded ones: set model.sliding_window > 0, or leave it at 0")
        used = [f for f in ("attention_bias", "attention_sinks", "sliding_window") if getattr(self, f)]
        if used and (self.kind != "decoder" or self.attention != "mha"):
            fail(used[0], f"applies to decoder-only multi-head attention (model.kind='decoder', "
                 f"model.attention='mha'), got kind={self.kind!r}, attention={self.attention!r}")

    def windowed(self, layer: int) -> bool:
        """Whether decoder layer `layer` (counting the dense prefix) attends to a band only."""
        every = self.full_attention_every
        return bool(self.sliding_window) and not (every and (layer + 1) % every == 0)

    def _check_yarn(self, fail):
        if self.rope_scaling == "none":
            for field, default in YARN_DEFAULTS.items():
                if getattr(self, field) != default:
                    fail(field, f"={getattr(self, field)!r} applies to model.rope_scaling='yarn' only: leave "
                         f"it at {default!r} or set model.rope_scaling='yarn'")
            return
        if self.position != "rope":
            fail("rope_scaling", "='yarn' scales rotary embeddings: it needs model.position='rope'")
        validation.number("model", "yarn_factor", self.yarn_factor, above=0)
        validation.integer("model", "yarn_original_length", self.yarn_original_length, 1)
        for field in ("yarn_beta_fast", "yarn_beta_slow"):
            validation.number("model", field, getattr(self, field), above=0)
        for field in ("yarn_mscale", "yarn_mscale_all_dim"):
            if validation.number("model", field, getattr(self, field)) < 0:
                fail(field, f"must be >= 0 (0: not given), got {getattr(self, field)}")
        if not isinstance(self.yarn_truncate, bool):
            fail("yarn_truncate", f"must be True or False, got {self.yarn_truncate!r}")

    def _check_mla(self, fail):
        if self.kind != "decoder":
            fail("attention", f"='mla' needs model.kind='decoder', got {self.kind!r}")
        if self.position != "rope":
            fail("position", f"must be 'rope' with model.attention='mla', got {self.position!r}")
        validation.integer("model", "q_lora_rank", self.q_lora_rank, 0)
        for field in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            validation.integer("model", field, getattr(self, field), 1)
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", f"must be even for rotary embeddings, got {self.qk_rope_head_dim}")
        if self.qk_norm:
            fail("qk_norm", "does not apply to model.attention='mla', which normalises its latents instead: "
                 "set it to False")

    @property
    def family(self) -> families.Family:
        return families.get(self.kind)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def activation_dtype(self):
        return DTYPES[self.dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown field(s) model.{', model.'.join(unknown)}; "
                             f"known fields: {sorted(known)}")
        if isinstance(values.get("moe"), dict):
            values["moe"] = MoEConfig.from_dict(values["moe"])
        return cls(**values)
