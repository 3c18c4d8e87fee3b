"""Mixtral (Jiang et al. 2024) checkpoints of Hugging Face transformers (`MixtralForCausalLM`):
a decoder-only LM with RoPE, grouped-query attention and an MoE layer of SwiGLU experts in every
layer, top-k of the float32 softmax renormalized over the k chosen, never dropping a token.

Expert weights come in two layouts, both read: the per-expert one save_pretrained writes
(`block_sparse_moe.experts.{e}.w1|w3|w2.weight`: gate, up [F, D] and down [D, F]; 5.x converts
it on load), and 5.x's fused in-memory one (`mlp.experts.gate_up_proj` [E, 2F, D], gate rows
first, `down_proj` [E, D, F], router `mlp.gate.weight`). Export writes the per-expert layout.
HF's q/k projections are already in the rotate-half order our apply_rope uses, and attention is
scaled by head_dim^-0.5 as ours is: no folding. RoPE is plain or YaRN-scaled (rope.py). Refused:
a sliding window, another RoPE scaling, another
activation than SiLU, and router_jitter_noise > 0 (HF multiplies the experts' input too, ours
only the router's).
"""
from __future__ import annotations

import numpy as np

from moe_jax.convert import mapping
from moe_jax.convert.hf_io import ConversionError, field, refuse
from moe_jax.convert.mapping import Rule, Target
from moe_jax.convert.rope import rope_fields, rope_parameters

FUSED = "model.layers.{i}.mlp.experts.gate_up_proj"


def fused_gate_up(hf: str, gate: Target, up: Target) -> Rule:
    """[E, 2F, D] (gate rows first, then up) <-> our wi[0], wi[1] [E, D, F] each."""
    def load(a):
        F = a[0].shape[1] // 2
        return [a[0][:, :F].transpose(0, 2, 1), a[0][:, F:].transpose(0, 2, 1)]  # [E, 2F, D] -> 2 x [E, D, F]

    def save(a):
        return [np.concatenate([a[0], a[1]], axis=2).transpose(0, 2, 1)]  # 2 x [E, D, F] -> [E, 2F, D]
    return Rule((hf,), (gate, up), load, save)


def transposed(hf: str, ours: Target) -> Rule:
    """[E, D, F] (5.x's down_proj) <-> our wo [E, F, D]."""
    return Rule((hf,), (ours,), lambda a: [a[0].transpose(0, 2, 1)], lambda a: [a[0].transpose(0, 2, 1)])


def layer_targets(mc, i: int):
    """at(*path): the Target of a parameter of HF decoder layer i (see mapping.layer_slot)."""
    ours, unit, _ = mapping.layer_slot(mc, i)
    return lambda *path: Target(ours + path, unit)


def attention_rules(mc, hf: str, at) -> list[Rule]:
    """A Llama-style layer's attention projections and its two norms (`hf`: 'model.layers.{i}')."""
    H, KVH, Dh = mc.num_heads, mc.kv_heads, mc.head_size
    return [mapping.heads_in(f"{hf}.self_attn.q_proj.weight", at("attn", "query"), H, Dh),
            mapping.heads_in(f"{hf}.self_attn.k_proj.weight", at("attn", "key"), KVH, Dh),
            mapping.heads_in(f"{hf}.self_attn.v_proj.weight", at("attn", "value"), KVH, Dh),
            mapping.heads_out(f"{hf}.self_attn.o_proj.weight", at("attn", "out"), H, Dh),
            mapping.copy(f"{hf}.input_layernorm.weight", at("attn_norm", "scale")),
            mapping.copy(f"{hf}.post_attention_layernorm.weight", at("ffn_norm", "scale"))]


def swiglu_rules(hf: str, at) -> list[Rule]:
    """A Llama-style gate/up/down MLP at `hf` <-> our FeedForward wi[0], wi[1], wo (at(*path))."""
    return [mapping.linear(f"{hf}.gate_proj.weight", at("wi", 0)),
            mapping.linear(f"{hf}.up_proj.weight", at("wi", 1)),
            mapping.linear(f"{hf}.down_proj.weight", at("wo"))]


def expert_rules(mc, i: int, at, fused: bool) -> list[Rule]:
    """Layer i's routed experts, Qwen3-MoE / DeepSeek-V3 names: per expert
    (`mlp.experts.{e}.gate_proj|up_proj|down_proj`) or fused (`gate_up_proj`, `down_proj`)."""
    hf = f"model.layers.{i}.mlp.experts"
    if fused:
        return [fused_gate_up(FUSED.format(i=i), at("ffn", "experts", "wi", 0),
                              at("ffn", "experts", "wi", 1)),
                transposed(f"{hf}.down_proj", at("ffn", "experts", "wo"))]
    names = [f"{hf}.{e}" for e in range(mc.moe.num_experts)]
    return [mapping.experts([f"{n}.{proj}.weight" for n in names], at("ffn", "experts", *ours))
            for proj, ours in (("gate_proj", ("wi", 0)), ("up_proj", ("wi", 1)), ("down_proj", ("wo",)))]


class Mixtral:
    model_types = ("mixtral",)
    architecture = "MixtralForCausalLM"

    def config_from_hf(self, config, hf: dict) -> None:
        if field(hf, "sliding_window", None) is not None:
            raise refuse("sliding_window", hf["sliding_window"],
                         "moe_jax attends over the whole causal prefix")
        if field(hf, "hidden_act", "silu") != "silu":
            raise refuse("hidden_act", hf["hidden_act"], "Mixtral's experts are SwiGLU (silu)")
        if float(field(hf, "router_jitter_noise", 0.0)) > 0:
            raise refuse("router_jitter_noise", hf["router_jitter_noise"],
                         "HF multiplies the experts' inputs by the noise too, moe_jax only the router's")
        m, moe = config.model, config.moe
        m.update(dict(kind="decoder", position="rope", **rope_fields(hf), activation="swiglu",
                      vocab_size=field(hf, "vocab_size"), d_model=field(hf, "hidden_size"),
                      num_heads=field(hf, "num_attention_heads"),
                      num_kv_heads=field(hf, "num_key_value_heads", field(hf, "num_attention_heads")),
                      head_dim=field(hf, "head_dim", 0), d_ff=field(hf, "intermediate_size"),
                      num_encoder_layers=0, num_decoder_layers=field(hf, "num_hidden_layers"),
                      encoder_moe_every=0, decoder_moe_every=1, dropout_rate=0.0,
                      norm_eps=float(field(hf, "rms_norm_eps", 1e-5))))
        if not m.head_dim:
            m.head_dim = m.d_model // m.num_heads
        moe.update(dict(router="top_k", num_experts=field(hf, "num_local_experts"),
                        k=field(hf, "num_experts_per_tok"), d_ff=m.d_ff, activation="swiglu",
                        renormalize=True, order="token_major", batch_prioritized=False, second_choice="all",
                        train_capacity_factor=0.0, eval_capacity_factor=0.0, group_size=0,
                        router_dtype="float32", jitter_eps=0.0, num_shared_experts=0,
                        routed_scaling_factor=1.0, bias_update_rate=0.0, expert_dropout=0.0))
        config.data.objective = "lm"
        config.balance_loss_weight = (float(field(hf, "router_aux_loss_coef", 0.001))
                                      if field(hf, "output_router_logits", False) else 0.0)
        config.z_loss_weight = 0.0

    def prepare(self, tensors: dict, hf: dict, source: str) -> dict:
        tensors = dict(tensors)
        lm = tensors.get("lm_head.weight")
        if lm is None:
            if field(hf, "tie_word_embeddings", False) is not True:
                raise ConversionError(f"{source} has no lm_head.weight and config.json does not tie it")
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied, unscaled: a copy
        return tensors

    def tied(self, tensors: dict) -> bool:
        return False  # HF's tied projection is unscaled; ours would scale by d_model^-0.5

    def hf_config(self, mc, capacity_length: int | None = None) -> dict:
        moe = mc.moe
        wrong = {name: getattr(moe, name) for name, ok in (
            ("router", "top_k"), ("renormalize", True), ("activation", "swiglu"), ("num_shared_experts", 0),
            ("routed_scaling_factor", 1.0), ("has_selection_bias", False), ("d_ff", mc.d_ff))
            if getattr(moe, name) != ok}
        if moe.train_capacity_factor > 0 or moe.eval_capacity_factor > 0:
            wrong["capacity factors"] = (moe.train_capacity_factor, moe.eval_capacity_factor)
        if (mc.kind, mc.position, mc.decoder_moe_every, mc.tie_embeddings) != ("decoder", "rope", 1, False):
            wrong["model"] = (mc.kind, mc.position, mc.decoder_moe_every, mc.tie_embeddings)
        if wrong:
            raise ConversionError("HF Mixtral is a decoder with RoPE, untied output, an MoE layer in every "
                                  "layer, renormalized top-k SwiGLU experts and no token dropping; these "
                                  f"differ: {wrong}")
        return {"model_type": "mixtral", "architectures": [self.architecture], "vocab_size": mc.vocab_size,
                "hidden_size": mc.d_model, "intermediate_size": mc.d_ff,
                "num_hidden_layers": mc.num_decoder_layers, "num_attention_heads": mc.num_heads,
                "num_key_value_heads": mc.kv_heads, "head_dim": mc.head_size,
                "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.k, "hidden_act": "silu",
                "rms_norm_eps": mc.norm_eps, "rope_theta": mc.rope_theta,
                "rope_parameters": rope_parameters(mc),
                "sliding_window": None, "router_jitter_noise": 0.0, "tie_word_embeddings": False,
                "attention_dropout": 0.0, "max_position_embeddings": 131072, "bos_token_id": 1,
                "eos_token_id": 2}

    def rules(self, mc, tensors: dict | None = None) -> list[Rule]:
        rules = [mapping.copy("model.embed_tokens.weight", Target(("embed", "table"))),
                 mapping.linear("lm_head.weight", Target(("embed", "logits_kernel"))),
                 mapping.copy("model.norm.weight", Target(("decoder", "final_norm", "scale")))]
        fused = tensors is not None and any(name.endswith(".mlp.experts.gate_up_proj") for name in tensors)
        for i in range(mc.num_decoder_layers):
            rules += self.layer_rules(mc, i, fused)
        return rules

    def layer_rules(self, mc, i: int, fused: bool) -> list[Rule]:
        hf, at = f"model.layers.{i}", layer_targets(mc, i)
        rules = attention_rules(mc, hf, at)
        if fused:
            return rules + [mapping.linear(f"{hf}.mlp.gate.weight", at("ffn", "router", "kernel")),
                            fused_gate_up(FUSED.format(i=i), at("ffn", "experts", "wi", 0),
                                          at("ffn", "experts", "wi", 1)),
                            transposed(f"{hf}.mlp.experts.down_proj", at("ffn", "experts", "wo"))]
        moe = f"{hf}.block_sparse_moe"
        names = [f"{moe}.experts.{e}" for e in range(mc.moe.num_experts)]
        return rules + [mapping.linear(f"{moe}.gate.weight", at("ffn", "router", "kernel")),
                        mapping.experts([f"{n}.w1.weight" for n in names], at("ffn", "experts", "wi", 0)),
                        mapping.experts([f"{n}.w3.weight" for n in names], at("ffn", "experts", "wi", 1)),
                        mapping.experts([f"{n}.w2.weight" for n in names], at("ffn", "experts", "wo"))]

    def finish(self, tensors: dict, mc) -> dict:
        return tensors
