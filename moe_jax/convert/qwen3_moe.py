"""Qwen3-MoE (Qwen3 Technical Report, Yang et al. 2025) checkpoints of Hugging Face transformers
(`Qwen3MoeForCausalLM`): Mixtral's decoder (mixtral.py) with an RMSNorm over each head's query
and key before RoPE (our model.qk_norm), experts narrower than the dense FFN
(moe_intermediate_size), top-k of the float32 softmax renormalized over the k chosen only when
norm_topk_prob (our moe.renormalize), and dense layers where `mlp_only_layers` or
`decoder_sparse_step` put them.

Layer i is sparse in HF when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0;
ours when it is past model.first_dense_layers and last in its unit of model.decoder_moe_every.
Both agree when mlp_only_layers is the prefix [0, k) with k a multiple of the step; other lists
are refused, as are a sliding window and attention biases; RoPE may be YaRN-scaled. Expert
weights are read per expert (`mlp.experts.{e}.gate_proj|up_proj|down_proj`, what save_pretrained
writes) or fused (`mlp.experts.gate_up_proj`, `down_proj`) and written per expert.
"""
from __future__ import annotations

from moe_jax.convert import mapping
from moe_jax.convert.hf_io import ConversionError, field, refuse
from moe_jax.convert.mapping import Rule
from moe_jax.convert.rope import rope_parameters
from moe_jax.convert.mixtral import Mixtral, attention_rules, expert_rules, layer_targets, swiglu_rules


def _num_experts(hf: dict) -> int:
    """Qwen3MoeConfig.num_experts, which save_pretrained writes under its alias num_local_experts."""
    return field(hf, "num_experts", None) or field(hf, "num_local_experts")


def _dense_prefix(hf: dict, step: int) -> int:
    """model.first_dense_layers from mlp_only_layers, or a refusal."""
    only = sorted(field(hf, "mlp_only_layers", []))
    if only != list(range(len(only))) or len(only) % step:
        raise refuse("mlp_only_layers", only, "moe_jax's dense layers come first, a prefix [0, k) whose "
                     f"length is a multiple of decoder_sparse_step={step}")
    return len(only)


class Qwen3Moe(Mixtral):
    model_types = ("qwen3_moe",)
    architecture = "Qwen3MoeForCausalLM"

    def config_from_hf(self, config, hf: dict) -> None:
        if field(hf, "attention_bias", False):
            raise refuse("attention_bias", True, "Qwen3's projections have no biases in moe_jax")
        windowed = field(hf, "use_sliding_window", False)
        window = field(hf, "sliding_window", None) if windowed else None
        super().config_from_hf(config, {**hf, "num_local_experts": _num_experts(hf),
                                        "sliding_window": window})
        step = int(field(hf, "decoder_sparse_step", 1))
        config.model.update(dict(qk_norm=True, decoder_moe_every=step,
                                 first_dense_layers=_dense_prefix(hf, step)))
        config.moe.update(dict(d_ff=field(hf, "moe_intermediate_size"),
                               renormalize=bool(field(hf, "norm_topk_prob", False))))

    def hf_config(self, mc, capacity_length: int | None = None) -> dict:
        moe, step = mc.moe, mc.decoder_moe_every
        wrong = {name: getattr(moe, name) for name, ok in (
            ("router", "top_k"), ("activation", "swiglu"), ("num_shared_experts", 0),
            ("routed_scaling_factor", 1.0), ("has_selection_bias", False)) if getattr(moe, name) != ok}
        if moe.train_capacity_factor > 0 or moe.eval_capacity_factor > 0:
            wrong["capacity factors"] = (moe.train_capacity_factor, moe.eval_capacity_factor)
        shape = (mc.kind, mc.position, mc.attention, mc.qk_norm, mc.tie_embeddings,
                 mc.moe_extra_dense_ffn)
        misplaced = not step or mc.first_dense_layers % step
        if shape != ("decoder", "rope", "mha", True, False, False) or misplaced:
            wrong["model"] = shape + (step, mc.first_dense_layers)
        if wrong:
            raise ConversionError("HF Qwen3-MoE is a decoder with RoPE, query/key norms, untied output, "
                                  "top-k SwiGLU experts, no token dropping and dense layers first (a "
                                  f"multiple of decoder_moe_every); these differ: {wrong}")
        return {"model_type": "qwen3_moe", "architectures": [self.architecture], "vocab_size": mc.vocab_size,
                "hidden_size": mc.d_model, "intermediate_size": mc.d_ff, "moe_intermediate_size": moe.d_ff,
                "num_hidden_layers": mc.num_decoder_layers, "num_attention_heads": mc.num_heads,
                "num_key_value_heads": mc.kv_heads, "head_dim": mc.head_size, "num_experts": moe.num_experts,
                "num_experts_per_tok": moe.k, "norm_topk_prob": moe.renormalize, "decoder_sparse_step": step,
                "mlp_only_layers": list(range(mc.first_dense_layers)), "hidden_act": "silu",
                "rms_norm_eps": mc.norm_eps, "rope_parameters": rope_parameters(mc),
                "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
                "tie_word_embeddings": False, "attention_dropout": 0.0, "max_position_embeddings": 32768}

    def layer_rules(self, mc, i: int, fused: bool) -> list[Rule]:
        hf, at = f"model.layers.{i}", layer_targets(mc, i)
        rules = attention_rules(mc, hf, at) + [
            mapping.copy(f"{hf}.self_attn.q_norm.weight", at("attn", "query_norm")),
            mapping.copy(f"{hf}.self_attn.k_norm.weight", at("attn", "key_norm"))]
        if not mapping.layer_slot(mc, i)[2]:  # a dense layer: Qwen3MoeMLP of width intermediate_size
            return rules + swiglu_rules(f"{hf}.mlp", lambda *p: at("ffn", *p))
        rules.append(mapping.linear(f"{hf}.mlp.gate.weight", at("ffn", "router", "kernel")))
        return rules + expert_rules(mc, i, at, fused)
