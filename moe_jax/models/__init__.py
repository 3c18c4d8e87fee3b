"""Transformers built from the MoE layer: T5-style encoder-decoder and decoder-only LMs."""
from moe_jax.models.config import ModelConfig
from moe_jax.models.decoding import generate
from moe_jax.models.transformer import DecoderOnly, EncoderDecoder, build_model

__all__ = ["DecoderOnly", "EncoderDecoder", "ModelConfig", "build_model", "generate"]
