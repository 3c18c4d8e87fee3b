"""DeepSeek-V3 (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report"; also R1 and Kimi K2) checkpoints of
Hugging Face transformers (`DeepseekV3ForCausalLM`): a decoder with multi-head latent attention
(our model.attention='mla'), `first_k_dense_replace` dense layers first (model.first_dense_layers),
then MoE layers of sigmoid-routed SwiGLU experts (moe.router='sigmoid') limited to `topk_group` of
`n_group` expert groups, renormalized (norm_topk_prob) and scaled (routed_scaling_factor), plus
`n_shared_experts` shared experts run as one FFN of that many times the expert width, as ours are.

The router's `e_score_correction_bias` (the auxiliary-loss-free bias) becomes our fixed selection
bias (moe.selection_bias; set moe.bias_update_rate to keep balancing it while fine-tuning).
DeepSeek lays each head's rotary features out in interleaved pairs (`rope_interleave`, the
default): import permutes those rows of q_b_proj (or q_proj) and kv_a_proj_with_mqa to the
rotate-half order of our RoPE (the attention logits are unchanged: queries and keys are permuted
alike), export permutes them back and writes rope_interleave=true. A checkpoint's
multi-token-prediction layers (`model.layers.{num_hidden_layers}...`) are left out, as transformers
does. RoPE may be YaRN-scaled (V3's 128K context: factor 40), with latent attention's extra logit
factor (models/position.py). Refused: FP8-quantized weights (dequantize to bf16 first), attention
biases, fewer key/value heads than heads, and rms_norm_eps other than 1e-6 (transformers fixes the
latent norms' epsilon at 1e-6; ours share model.norm_eps).
"""
from __future__ import annotations

import re

import numpy as np

from moe_jax.convert import mapping
from moe_jax.convert.hf_io import ConversionError, field, refuse
from moe_jax.convert.mapping import Rule
from moe_jax.convert.mixtral import Mixtral, expert_rules, layer_targets, swiglu_rules
from moe_jax.convert.rope import rope_fields, rope_parameters

LATENT_NORM_EPS = 1e-6  # DeepseekV3RMSNorm's default, which q_a_layernorm and kv_a_layernorm keep
LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _rope_rows(dr: int) -> np.ndarray:
    """Interleaved pairs (x0, x1), (x2, x3), ... -> rotate-half halves (x0, x2, ...; x1, x3, ...)."""
    return np.concatenate([np.arange(0, dr, 2), np.arange(1, dr, 2)])


def _permute_rope(tensors: dict, hf: dict, order_of) -> dict:
    """Reorder the rotary rows of every query and latent key projection by order_of(Dr)."""
    dn, dr = field(hf, "qk_nope_head_dim"), field(hf, "qk_rope_head_dim")
    order = order_of(dr)
    out = dict(tensors)
    for name, w in tensors.items():
        if name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
            heads = w.reshape(-1, dn + dr, w.shape[-1])  # [H*(Dn+Dr), R] -> [H, Dn+Dr, R]
            rows = np.concatenate([heads[:, :dn], heads[:, dn:][:, order]], axis=1)
            out[name] = rows.reshape(w.shape)
        elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):  # [R + Dr, D]: the rope rows last
            out[name] = np.concatenate([w[:-dr], w[-dr:][order]])
    return out


class DeepseekV3(Mixtral):
    model_types = ("deepseek_v3",)
    architecture = "DeepseekV3ForCausalLM"

    def config_from_hf(self, config, hf: dict) -> None:
        self._check(hf)
        m, moe = config.model, config.moe
        heads = field(hf, "num_attention_heads")
        m.update(dict(kind="decoder", position="rope", **rope_fields(hf), attention="mla",
                      activation="swiglu", vocab_size=field(hf, "vocab_size"),
                      d_model=field(hf, "hidden_size"),
                      num_heads=heads, num_kv_heads=heads, head_dim=field(hf, "v_head_dim"),
                      q_lora_rank=field(hf, "q_lora_rank", 0), kv_lora_rank=field(hf, "kv_lora_rank"),
                      qk_nope_head_dim=field(hf, "qk_nope_head_dim"),
                      qk_rope_head_dim=field(hf, "qk_rope_head_dim"), v_head_dim=field(hf, "v_head_dim"),
                      d_ff=field(hf, "intermediate_size"), num_encoder_layers=0,
                      num_decoder_layers=field(hf, "num_hidden_layers"),
                      first_dense_layers=field(hf, "first_k_dense_replace", 0), encoder_moe_every=0,
                      decoder_moe_every=1, dropout_rate=0.0, norm_eps=LATENT_NORM_EPS))
        moe.update(dict(router="sigmoid", num_experts=field(hf, "n_routed_experts"),
                        k=field(hf, "num_experts_per_tok"), d_ff=field(hf, "moe_intermediate_size"),
                        activation="swiglu", num_shared_experts=field(hf, "n_shared_experts", 0),
                        num_expert_groups=field(hf, "n_group", 1), k_groups=field(hf, "topk_group", 1),
                        renormalize=bool(field(hf, "norm_topk_prob", False)),
                        routed_scaling_factor=float(field(hf, "routed_scaling_factor", 1.0)),
                        selection_bias=True, bias_update_rate=0.0, order="token_major",
                        batch_prioritized=False, train_capacity_factor=0.0, eval_capacity_factor=0.0,
                        group_size=0, router_dtype="float32", jitter_eps=0.0, expert_dropout=0.0))
        config.data.objective = "lm"
        config.balance_loss_weight, config.z_loss_weight = 0.0, 0.0

    @staticmethod
    def _check(hf: dict) -> None:
        if "quantization_config" in hf:
            raise refuse("quantization_config", hf["quantization_config"].get("quant_method"),
                         "moe_jax reads unquantized weights: dequantize the FP8 checkpoint to bf16 first")
        for name, ok in (("attention_bias", False), ("hidden_act", "silu"),
                         ("rms_norm_eps", LATENT_NORM_EPS)):
            if field(hf, name, ok) != ok:
                raise refuse(name, hf[name], f"moe_jax's DeepSeek-V3 reads {name}={ok!r} only (see "
                             "moe_jax/convert/deepseek_v3.py)")
        heads = field(hf, "num_attention_heads")
        if field(hf, "num_key_value_heads", heads) != heads:
            raise refuse("num_key_value_heads", hf["num_key_value_heads"],
                         "latent attention expands keys and values for every head")

    def prepare(self, tensors: dict, hf: dict, source: str) -> dict:
        layers = field(hf, "num_hidden_layers")
        kept = {n: w for n, w in tensors.items() if not (LAYER.match(n) and int(LAYER.match(n)[1]) >= layers)}
        kept = super().prepare(kept, hf, source)
        return _permute_rope(kept, hf, _rope_rows) if field(hf, "rope_interleave", True) else kept

    def finish(self, tensors: dict, mc) -> dict:
        hf = {"qk_nope_head_dim": mc.qk_nope_head_dim, "qk_rope_head_dim": mc.qk_rope_head_dim}
        tensors = _permute_rope(tensors, hf, lambda dr: np.argsort(_rope_rows(dr)))
        if not mc.moe.has_selection_bias:  # trained without one: transformers' buffer holds zeros
            dtype = tensors["model.embed_tokens.weight"].dtype
            for i in range(mc.first_dense_layers, mc.num_decoder_layers):
                tensors[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] = np.zeros(mc.moe.num_experts,
                                                                                          dtype)
        return tensors

    def hf_config(self, mc, capacity_length: int | None = None) -> dict:
        moe = mc.moe
        wrong = {name: getattr(moe, name) for name, ok in (
            ("router", "sigmoid"), ("activation", "swiglu")) if getattr(moe, name) != ok}
        if moe.train_capacity_factor > 0 or moe.eval_capacity_factor > 0:
            wrong["capacity factors"] = (moe.train_capacity_factor, moe.eval_capacity_factor)
        shape = (mc.kind, mc.position, mc.attention, mc.qk_norm, mc.tie_embeddings, mc.moe_extra_dense_ffn,
                 mc.decoder_moe_every, mc.norm_eps)
        if shape != ("decoder", "rope", "mla", False, False, False, 1, LATENT_NORM_EPS):
            wrong["model"] = shape
        if wrong:
            raise ConversionError("HF DeepSeek-V3 is a decoder with latent attention, RoPE, untied output, "
                                  "dense layers first and then an MoE layer in every layer, sigmoid-routed "
                                  "SwiGLU experts, no token dropping and norm_eps 1e-6; these differ: "
                                  f"{wrong}")
        return {"model_type": "deepseek_v3", "architectures": [self.architecture],
                "vocab_size": mc.vocab_size,
                "hidden_size": mc.d_model, "intermediate_size": mc.d_ff, "moe_intermediate_size": moe.d_ff,
                "num_hidden_layers": mc.num_decoder_layers, "first_k_dense_replace": mc.first_dense_layers,
                "num_attention_heads": mc.num_heads, "num_key_value_heads": mc.num_heads,
                "q_lora_rank": mc.q_lora_rank or None, "kv_lora_rank": mc.kv_lora_rank,
                "qk_nope_head_dim": mc.qk_nope_head_dim, "qk_rope_head_dim": mc.qk_rope_head_dim,
                "v_head_dim": mc.v_head_dim, "n_routed_experts": moe.num_experts,
                "num_experts_per_tok": moe.k, "n_shared_experts": moe.num_shared_experts,
                "n_group": moe.num_expert_groups, "topk_group": moe.k_groups,
                "norm_topk_prob": moe.renormalize, "routed_scaling_factor": moe.routed_scaling_factor,
                "hidden_act": "silu", "rms_norm_eps": mc.norm_eps, "rope_interleave": True,
                "rope_parameters": rope_parameters(mc),
                "attention_bias": False, "tie_word_embeddings": False, "attention_dropout": 0.0,
                "num_nextn_predict_layers": 0, "max_position_embeddings": 4096, "bos_token_id": 0,
                "eos_token_id": 1}

    def layer_rules(self, mc, i: int, fused: bool) -> list[Rule]:
        hf, at = f"model.layers.{i}", layer_targets(mc, i)
        rules = self._attention_rules(mc, f"{hf}.self_attn", at) + [
            mapping.copy(f"{hf}.input_layernorm.weight", at("attn_norm", "scale")),
            mapping.copy(f"{hf}.post_attention_layernorm.weight", at("ffn_norm", "scale"))]
        if not mapping.layer_slot(mc, i)[2]:  # a dense layer: DeepseekV3MLP of width intermediate_size
            return rules + swiglu_rules(f"{hf}.mlp", lambda *p: at("ffn", *p))
        rules += [mapping.linear(f"{hf}.mlp.gate.weight", at("ffn", "router", "kernel"))]
        if mc.moe.has_selection_bias:
            rules.append(mapping.copy(f"{hf}.mlp.gate.e_score_correction_bias",
                                      at("ffn", "router", "balance_bias")))
        if mc.moe.num_shared_experts:
            rules += swiglu_rules(f"{hf}.mlp.shared_experts", lambda *p: at("ffn", "shared", *p))
        return rules + expert_rules(mc, i, at, fused)

    @staticmethod
    def _attention_rules(mc, hf: str, at) -> list[Rule]:
        """MLA's projections (`hf`: 'model.layers.{i}.self_attn')."""
        H, Dn = mc.num_heads, mc.qk_nope_head_dim
        Dq, Dkv = Dn + mc.qk_rope_head_dim, Dn + mc.v_head_dim
        if mc.q_lora_rank:
            query = [mapping.linear(f"{hf}.q_a_proj.weight", at("attn", "q_down")),
                     mapping.copy(f"{hf}.q_a_layernorm.weight", at("attn", "q_norm")),
                     mapping.heads_in(f"{hf}.q_b_proj.weight", at("attn", "query"), H, Dq)]
        else:
            query = [mapping.heads_in(f"{hf}.q_proj.weight", at("attn", "query"), H, Dq)]
        return query + [mapping.linear(f"{hf}.kv_a_proj_with_mqa.weight", at("attn", "kv_down")),
                        mapping.copy(f"{hf}.kv_a_layernorm.weight", at("attn", "kv_norm")),
                        mapping.heads_in(f"{hf}.kv_b_proj.weight", at("attn", "kv_up"), H, Dkv),
                        mapping.heads_out(f"{hf}.o_proj.weight", at("attn", "out"), H, mc.v_head_dim)]
