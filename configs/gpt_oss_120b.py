"""gpt-oss-120b (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card"): a 36-layer decoder-only LM,
every FFN an MoE layer of 128 experts 2880 wide with biases and gpt-oss's clamped SwiGLU, top-4 of
a biased router weighted by the softmax over the 4 chosen; grouped-query attention (64 query / 8
key-value heads of 64) with projection biases and a learned sink per head, banded over the last
128 positions in every other layer (the first banded); YaRN RoPE (theta 150000, factor 32 over
4096, untruncated ramp); untied embeddings of a 201088-token vocabulary. 116.8B parameters, 5.1B
active (the model card leaves the input embedding table out of the active count; moe_jax's
accounting counts it, 5.7B). `--config=configs/gpt_oss_120b.py:tiny` runs the same architecture on a CPU."""
from configs import base


def get_config(size: str = "full", num_layers: int = 36, num_experts: int = 128):
    config = base.get_config()
    config.model.update(dict(kind="decoder", vocab_size=201088, d_model=2880, num_heads=64, num_kv_heads=8,
                             head_dim=64, d_ff=2880, activation="swiglu", num_encoder_layers=0,
                             num_decoder_layers=num_layers, decoder_moe_every=1, encoder_moe_every=0,
                             position="rope", rope_theta=150000.0, rope_scaling="yarn", yarn_factor=32.0,
                             yarn_original_length=4096, yarn_truncate=False, norm_eps=1e-5,
                             attention_bias=True, attention_sinks=True, sliding_window=128,
                             full_attention_every=2, tie_embeddings=False, dtype="bfloat16"))
    config.moe.update(dict(router="top_k", num_experts=num_experts, k=4, d_ff=2880,
                           activation="clamped_swiglu", renormalize=True, router_bias=True, expert_bias=True,
                           order="token_major",
                           train_capacity_factor=0.0, eval_capacity_factor=0.0))
    config.data.objective = "lm"
    config.optimizer, config.learning_rate, config.schedule = "adamw", 3e-4, "cosine"
    config.seq_len, config.batch_size = 4096, 512
    config.num_train_steps, config.warmup_steps = 100_000, 2000
    # Attention and embeddings split over every chip too: the 120b fits v5p-128 so (README).
    config.fsdp = True
    return base.shrink_to_tiny(config) if size == "tiny" else config
