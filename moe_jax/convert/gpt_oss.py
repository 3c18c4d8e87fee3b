"""gpt-oss (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card") checkpoints of Hugging Face
transformers (`GptOssForCausalLM`): a decoder whose every layer is an MoE layer, with grouped-query
attention carrying biases and a learned sink logit per head (model.attention_bias,
model.attention_sinks), banded attention over the last `sliding_window` positions in the layers
`layer_types` names 'sliding_attention' (model.sliding_window and model.full_attention_every: HF's
default alternation, banded first, is every 2nd layer full), YaRN RoPE (rope.py), a router with a
bias choosing top-k of its logits weighted by their softmax (moe.router_bias, moe.renormalize:
the renormalized softmax over all experts is the same numbers), and experts with biases and
gpt-oss's clamped SwiGLU (moe.activation='clamped_swiglu', moe.expert_bias).

Experts are stored fused: `mlp.experts.gate_up_proj` [E, D, 2F] with the gate and linear columns
interleaved (gate at even indices), its bias [E, 2F] likewise, `down_proj` [E, F, D] and its bias
[E, D]; import splits the interleaved columns into our wi[0], wi[1], export interleaves them again.
Our router computes in float32; transformers' in the checkpoint's dtype (bfloat16 for the released
weights), so imported bfloat16 routing can differ in near ties. Refused: swiglu_alpha other than
1.702 or swiglu_limit other than 7, layer_types our pattern cannot express, another hidden_act.
"""
from __future__ import annotations

import numpy as np

from moe_jax.convert import mapping
from moe_jax.convert.hf_io import ConversionError, field, refuse
from moe_jax.convert.mapping import Rule, Target
from moe_jax.convert.mixtral import Mixtral, attention_rules, layer_targets
from moe_jax.convert.rope import rope_fields, rope_parameters
from moe_jax.experts import GPT_OSS_ALPHA, GPT_OSS_LIMIT

BANDED, FULL = "sliding_attention", "full_attention"


def _full_every(types: list[str]) -> int:
    """model.full_attention_every of HF layer_types (banded first, then a full one every n-th)."""
    every = types.index(FULL) + 1 if FULL in types else 0
    if [t == BANDED for t in types] != [not (every and (i + 1) % every == 0) for i in range(len(types))]:
        raise refuse("layer_types", types, "moe_jax's banded layers are all but every n-th (1-based), "
                     "e.g. gpt-oss's alternation starting banded")
    return every


def _interleaved(hf: str, gate: Target, linear: Target) -> Rule:
    """[..., 2F] with gate columns at even indices <-> our gate and linear parts [..., F] each."""
    def save(a):
        out = np.empty(a[0].shape[:-1] + (2 * a[0].shape[-1],), a[0].dtype)
        out[..., ::2], out[..., 1::2] = a[0], a[1]  # 2 x [..., F] -> [..., 2F]
        return [out]
    return Rule((hf,), (gate, linear), lambda a: [a[0][..., ::2], a[0][..., 1::2]], save)


def _reshaped(hf: str, ours: Target, shape: tuple[int, ...]) -> Rule:
    """A flat [H*Dh] bias <-> our [H, Dh]."""
    return Rule((hf,), (ours,), lambda a: [a[0].reshape(shape)], lambda a: [a[0].reshape(-1)])


class GptOss(Mixtral):
    model_types = ("gpt_oss",)
    architecture = "GptOssForCausalLM"

    def config_from_hf(self, config, hf: dict) -> None:
        for name, ok in (("swiglu_alpha", GPT_OSS_ALPHA), ("swiglu_limit", GPT_OSS_LIMIT),
                         ("hidden_act", "silu")):
            if field(hf, name, ok) != ok:
                raise refuse(name, hf[name], f"moe_jax's clamped_swiglu has {name}={ok!r}")
        layers = field(hf, "num_hidden_layers")
        types = field(hf, "layer_types", [BANDED if (i + 1) % 2 else FULL for i in range(layers)])
        every, window = _full_every(types), field(hf, "sliding_window", 0)
        m, moe = config.model, config.moe
        m.update(dict(kind="decoder", position="rope", **rope_fields(hf), activation="swiglu",
                      vocab_size=field(hf, "vocab_size"), d_model=field(hf, "hidden_size"),
                      num_heads=field(hf, "num_attention_heads"),
                      num_kv_heads=field(hf, "num_key_value_heads"),
                      head_dim=field(hf, "head_dim"), d_ff=field(hf, "intermediate_size"),
                      num_encoder_layers=0, num_decoder_layers=layers, encoder_moe_every=0,
                      decoder_moe_every=1,
                      dropout_rate=0.0, norm_eps=float(field(hf, "rms_norm_eps", 1e-5)),
                      attention_bias=bool(field(hf, "attention_bias", True)), attention_sinks=True,
                      sliding_window=window if BANDED in types else 0,
                      full_attention_every=every if BANDED in types else 0))
        moe.update(dict(router="top_k", num_experts=field(hf, "num_local_experts"),
                        k=field(hf, "num_experts_per_tok"), d_ff=m.d_ff, activation="clamped_swiglu",
                        renormalize=True, router_bias=True, expert_bias=True, order="token_major",
                        batch_prioritized=False, second_choice="all", train_capacity_factor=0.0,
                        eval_capacity_factor=0.0, group_size=0, router_dtype="float32", jitter_eps=0.0,
                        num_shared_experts=0, routed_scaling_factor=1.0, bias_update_rate=0.0,
                        expert_dropout=0.0))
        config.data.objective = "lm"
        config.balance_loss_weight = (float(field(hf, "router_aux_loss_coef", 0.001))
                                      if field(hf, "output_router_logits", False) else 0.0)
        config.z_loss_weight = 0.0

    def hf_config(self, mc, capacity_length: int | None = None) -> dict:
        moe = mc.moe
        wanted = (("router", "top_k"), ("activation", "clamped_swiglu"), ("renormalize", True),
                  ("router_bias", True), ("expert_bias", True), ("num_shared_experts", 0),
                  ("routed_scaling_factor", 1.0), ("has_selection_bias", False))
        wrong = {name: getattr(moe, name) for name, ok in wanted if getattr(moe, name) != ok}
        if moe.train_capacity_factor > 0 or moe.eval_capacity_factor > 0:
            wrong["capacity factors"] = (moe.train_capacity_factor, moe.eval_capacity_factor)
        shape = (mc.kind, mc.position, mc.attention, mc.qk_norm, mc.attention_sinks, mc.tie_embeddings,
                 mc.decoder_moe_every, mc.first_dense_layers, mc.moe_extra_dense_ffn)
        if shape != ("decoder", "rope", "mha", False, True, False, 1, 0, False):
            wrong["model"] = shape
        if wrong:
            raise ConversionError("HF gpt-oss is a decoder with RoPE, attention sinks, untied output and an "
                                  "MoE layer in every layer of biased, renormalized top-k clamped_swiglu "
                                  f"experts and no token dropping; these differ: {wrong}")
        layers = mc.num_decoder_layers
        return {"model_type": "gpt_oss", "architectures": [self.architecture], "vocab_size": mc.vocab_size,
                "hidden_size": mc.d_model, "intermediate_size": moe.d_ff, "num_hidden_layers": layers,
                "num_attention_heads": mc.num_heads, "num_key_value_heads": mc.kv_heads,
                "head_dim": mc.head_size, "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.k,
                "sliding_window": mc.sliding_window or None,
                "layer_types": [BANDED if mc.windowed(i) else FULL for i in range(layers)],
                "attention_bias": mc.attention_bias, "rms_norm_eps": mc.norm_eps,
                "rope_parameters": rope_parameters(mc), "swiglu_alpha": GPT_OSS_ALPHA,
                "swiglu_limit": GPT_OSS_LIMIT, "hidden_act": "silu", "tie_word_embeddings": False,
                "attention_dropout": 0.0, "max_position_embeddings": 131072}

    def layer_rules(self, mc, i: int, fused: bool) -> list[Rule]:
        hf, at = f"model.layers.{i}", layer_targets(mc, i)
        H, KVH, Dh = mc.num_heads, mc.kv_heads, mc.head_size
        rules = attention_rules(mc, hf, at) + [mapping.copy(f"{hf}.self_attn.sinks", at("attn", "sinks"))]
        if mc.attention_bias:
            attn = f"{hf}.self_attn"
            rules += [_reshaped(f"{attn}.q_proj.bias", at("attn", "query_bias"), (H, Dh)),
                      _reshaped(f"{attn}.k_proj.bias", at("attn", "key_bias"), (KVH, Dh)),
                      _reshaped(f"{attn}.v_proj.bias", at("attn", "value_bias"), (KVH, Dh)),
                      mapping.copy(f"{attn}.o_proj.bias", at("attn", "out_bias"))]
        mlp, experts = f"{hf}.mlp", ("ffn", "experts")
        return rules + [
            mapping.linear(f"{mlp}.router.weight", at("ffn", "router", "kernel")),
            mapping.copy(f"{mlp}.router.bias", at("ffn", "router", "bias")),
            _interleaved(f"{mlp}.experts.gate_up_proj", at(*experts, "wi", 0), at(*experts, "wi", 1)),
            _interleaved(f"{mlp}.experts.gate_up_proj_bias", at(*experts, "bi", 0), at(*experts, "bi", 1)),
            mapping.copy(f"{mlp}.experts.down_proj", at(*experts, "wo")),
            mapping.copy(f"{mlp}.experts.down_proj_bias", at(*experts, "bo"))]
