"""T5 (Raffel et al. 2020) checkpoints of Hugging Face transformers (`T5ForConditionalGeneration`):
T5 v1.0 (ReLU FFN, tied embeddings, decoder output scaled by d_model^-0.5 before the tied
projection) and T5.1.1 (gated GELU, untied output projection, no scaling); also the encoder-decoder
layout that Switch Transformers (switch.py) shares.

Differences from moe_jax's EncoderDecoder, and how they are mapped:
- HF's T5 attention does not scale q.k by 1/sqrt(d_kv) (Mesh TensorFlow folded it into the
  initialisation); ours does, so sqrt(d_kv) is folded into the query weights on import and taken
  out on export (exact when sqrt(d_kv) is a power of two, as for every published T5: d_kv=64).
- Embeddings. transformers 5.x's T5Config always sets tie_word_embeddings=True and keeps the old
  meaning in `scale_decoder_outputs` (from config.json, else tie_word_embeddings is not False);
  lm_head.weight stays separate when the file holds one that differs from shared.weight. So:
  scaled + tied -> model.tie_embeddings=True; not scaled -> untied (lm_head, or a copy of
  shared.weight); scaled with a different lm_head is refused (we scale only the tied projection).
  Encoder and decoder input embeddings must equal shared.weight (ours are one table).
- HF lets a padded encoder query attend to the real tokens, ours (segment masks) to nothing:
  only padded positions' encoder outputs differ, and the decoder never attends to them.
"""
from __future__ import annotations

import math

import numpy as np

from moe_jax.convert import mapping
from moe_jax.convert.hf_io import ConversionError, field, refuse
from moe_jax.convert.mapping import Target

# T5's feed_forward_proj <-> model.activation (HF's gelu_new is the tanh GELU, jax.nn.gelu's default).
T5_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "gated-gelu": "geglu", "gated-gelu_new": "geglu",
                  "gated-silu": "swiglu"}
T5_EXPORT_ACTIVATIONS = {"relu": "relu", "gelu": "gelu_new", "geglu": "gated-gelu", "swiglu": "gated-silu"}
EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def input_embedding(tensors: dict, names, source: str) -> np.ndarray:
    """Pop the tensors `names` (aliases of one input embedding [V, D]) and return it; all present
    must be equal, since our encoder and decoder share one table."""
    present = [(n, tensors.pop(n)) for n in names if n in tensors]
    if not present:
        raise ConversionError(f"{source} holds none of {list(names)} (the input embedding)")
    first_name, first = present[0]
    for name, array in present[1:]:
        if not np.array_equal(array, first):
            raise ConversionError(
                f"{source}: {name} differs from {first_name}. moe_jax's encoder-decoder has one input "
                "embedding for the encoder and the decoder (transformers 5.x unties them when "
                "tie_word_embeddings=False); this checkpoint cannot be reproduced")
    return first


def output_projection(tensors: dict, shared: np.ndarray, scaled: bool, source: str) -> bool:
    """Decide model.tie_embeddings from lm_head.weight and the scaling; leaves 'lm_head.weight' in
    `tensors` iff the model is untied (a copy of shared.weight when HF ties without scaling)."""
    lm = tensors.pop("lm_head.weight", None)
    untied = lm is not None and not np.array_equal(lm, shared)
    if scaled and untied:
        raise ConversionError(f"{source}: lm_head.weight differs from shared.weight while the decoder "
                              "output is scaled by d_model^-0.5; moe_jax scales only a tied projection")
    if not scaled:
        tensors["lm_head.weight"] = shared if lm is None else lm
    return scaled


def stack_config(config, hf: dict) -> None:
    """The encoder-decoder fields T5 and Switch share: config.model.* from config.json."""
    m = config.model
    m.kind, m.position = "encoder_decoder", "relative"
    m.vocab_size, m.d_model = field(hf, "vocab_size"), field(hf, "d_model")
    m.num_heads, m.head_dim, m.num_kv_heads = field(hf, "num_heads"), field(hf, "d_kv"), 0
    m.d_ff = field(hf, "d_ff")
    m.num_encoder_layers = field(hf, "num_layers")
    m.num_decoder_layers = field(hf, "num_decoder_layers", m.num_encoder_layers)
    m.relative_buckets = field(hf, "relative_attention_num_buckets", 32)
    m.relative_max_distance = field(hf, "relative_attention_max_distance", 128)
    m.dropout_rate = float(field(hf, "dropout_rate", 0.1))
    m.norm_eps = float(field(hf, "layer_norm_epsilon", 1e-6))
    config.data.objective = "span_corruption"


def stack_hf_config(mc) -> dict:
    """The config.json fields T5 and Switch share, from a ModelConfig."""
    if mc.kind != "encoder_decoder" or mc.position != "relative":
        raise ConversionError(f"model.kind={mc.kind!r}, model.position={mc.position!r}: T5 and Switch "
                              "are encoder-decoders with relative position biases")
    if mc.kv_heads != mc.num_heads:
        raise ConversionError(f"model.num_kv_heads={mc.num_kv_heads}: T5 attention has no "
                              "grouped-query heads")
    if mc.moe_extra_dense_ffn:
        raise ConversionError("model.moe_extra_dense_ffn=True (ST-MoE) has no transformers counterpart here")
    return {"is_encoder_decoder": True, "vocab_size": mc.vocab_size, "d_model": mc.d_model,
            "d_kv": mc.head_size, "num_heads": mc.num_heads, "d_ff": mc.d_ff,
            "num_layers": mc.num_encoder_layers,
            "num_decoder_layers": mc.num_decoder_layers,
            "relative_attention_num_buckets": mc.relative_buckets,
            "relative_attention_max_distance": mc.relative_max_distance, "dropout_rate": mc.dropout_rate,
            "layer_norm_epsilon": mc.norm_eps, "pad_token_id": 0, "eos_token_id": 1,
            "decoder_start_token_id": 0, "tie_word_embeddings": mc.tie_embeddings}


def attention_rules(hf: str, ours: tuple, unit: int, mc) -> list[mapping.Rule]:
    """q, k, v, o of one HF T5 attention module (`hf` ends in SelfAttention or EncDecAttention)."""
    H, Dh = mc.num_heads, mc.head_size
    return [mapping.heads_in(f"{hf}.q.weight", Target(ours + ("query",), unit), H, Dh, scale=math.sqrt(Dh)),
            mapping.heads_in(f"{hf}.k.weight", Target(ours + ("key",), unit), H, Dh),
            mapping.heads_in(f"{hf}.v.weight", Target(ours + ("value",), unit), H, Dh),
            mapping.heads_out(f"{hf}.o.weight", Target(ours + ("out",), unit), H, Dh)]


def dense_ffn_rules(hf: str, ours: tuple, unit: int, gated: bool) -> list[mapping.Rule]:
    """wi (or wi_0 and wi_1) and wo of one dense FFN; `hf` is its module name."""
    wi = ("wi_0", "wi_1") if gated else ("wi",)
    rules = [mapping.linear(f"{hf}.{name}.weight", Target(ours + ("wi", i), unit))
             for i, name in enumerate(wi)]
    return rules + [mapping.linear(f"{hf}.wo.weight", Target(ours + ("wo",), unit))]


def layer_rules(stack: str, i: int, mc, ffn_rules) -> list[mapping.Rule]:
    """Every rule of HF block i of `stack`; ffn_rules(hf_module, ours, unit, stack, i) maps its FFN."""
    every = getattr(mc, f"{stack}_moe_every")
    period = max(every, 1)
    unit, ours = i // period, (stack, "units", "layers", i % period)
    block = f"{stack}.block.{i}.layer"
    rules = attention_rules(f"{block}.0.SelfAttention", ours + ("attn",), unit, mc)
    rules.append(mapping.copy(f"{block}.0.layer_norm.weight", Target(ours + ("attn_norm", "scale"), unit)))
    ff = 1
    if stack == "decoder":
        rules += attention_rules(f"{block}.1.EncDecAttention", ours + ("cross",), unit, mc)
        rules.append(mapping.copy(f"{block}.1.layer_norm.weight",
                                  Target(ours + ("cross_norm", "scale"), unit)))
        ff = 2
    rules.append(mapping.copy(f"{block}.{ff}.layer_norm.weight", Target(ours + ("ffn_norm", "scale"), unit)))
    return rules + ffn_rules(f"{block}.{ff}", ours + ("ffn",), unit, stack, i)


def model_rules(mc, ffn_rules) -> list[mapping.Rule]:
    """The whole encoder-decoder: embeddings, both stacks, their biases and final norms."""
    rules = [mapping.copy("shared.weight", Target(("embed", "table")))]
    if not mc.tie_embeddings:
        rules.append(mapping.linear("lm_head.weight", Target(("embed", "logits_kernel"))))
    for stack, depth in (("encoder", mc.num_encoder_layers), ("decoder", mc.num_decoder_layers)):
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        rules += [mapping.copy(bias, Target((f"{stack}_bias", "embedding"))),
                  mapping.copy(f"{stack}.final_layer_norm.weight", Target((stack, "final_norm", "scale")))]
        for i in range(depth):
            rules += layer_rules(stack, i, mc, ffn_rules)
    return rules


class T5:
    """T5ForConditionalGeneration: dense encoder-decoder."""

    model_types = ("t5",)
    architecture = "T5ForConditionalGeneration"

    def config_from_hf(self, config, hf: dict) -> None:
        stack_config(config, hf)
        proj = field(hf, "feed_forward_proj", "relu")
        if proj not in T5_ACTIVATIONS:
            raise refuse("feed_forward_proj", proj, f"moe_jax has the activations {sorted(T5_ACTIVATIONS)} "
                         "(HF's 'gelu' is the exact erf GELU; ours is the tanh approximation, 'gelu_new')")
        config.model.activation = T5_ACTIVATIONS[proj]
        config.model.encoder_moe_every = config.model.decoder_moe_every = 0

    def scaled(self, hf: dict) -> bool:
        return bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False))

    def prepare(self, tensors: dict, hf: dict, source: str) -> dict:
        tensors = dict(tensors)
        shared = input_embedding(tensors, ("shared.weight",) + EMBED_ALIASES, source)
        output_projection(tensors, shared, self.scaled(hf), source)
        tensors["shared.weight"] = shared
        return tensors

    def tied(self, tensors: dict) -> bool:
        return "lm_head.weight" not in tensors

    def hf_config(self, mc, capacity_length: int | None = None) -> dict:
        if mc.encoder_moe_every or mc.decoder_moe_every:
            raise ConversionError("T5 has no MoE layers: export a sparse model as Switch Transformers")
        if mc.activation not in T5_EXPORT_ACTIVATIONS:
            raise ConversionError(f"model.activation={mc.activation!r} has no T5 feed_forward_proj")
        return {**stack_hf_config(mc), "model_type": "t5", "architectures": [self.architecture],
                "feed_forward_proj": T5_EXPORT_ACTIVATIONS[mc.activation],
                "scale_decoder_outputs": mc.tie_embeddings}

    def rules(self, mc, tensors: dict | None = None) -> list[mapping.Rule]:
        gated = mc.activation in ("geglu", "swiglu")
        return model_rules(mc, lambda hf, ours, unit, stack, i: dense_ffn_rules(
            f"{hf}.DenseReluDense", ours, unit, gated))

    def finish(self, tensors: dict, mc) -> dict:
        return tensors
