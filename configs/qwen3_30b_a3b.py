"""Qwen3-30B-A3B (Qwen3 Technical Report, Yang et al. 2025): a decoder-only LM with 48 layers, every
FFN an MoE layer of 128 SwiGLU experts 768 wide, top-8 of the softmax over all 128 renormalized over
the 8 chosen, no shared expert, no token dropping; grouped-query attention (32 query / 4 key-value
heads of 128) with an RMSNorm over each head's query and key (qk_norm), RoPE (theta 1e6); untied
embeddings; 30.5B parameters, 3.3B active. `--config=configs/qwen3_30b_a3b.py:tiny` runs the same
architecture on a CPU."""
from configs import base


def get_config(size: str = "full"):
    config = base.get_config()
    config.model.update(dict(kind="decoder", vocab_size=151936, d_model=2048, num_heads=32, num_kv_heads=4,
                             head_dim=128, d_ff=6144, activation="swiglu", num_encoder_layers=0,
                             num_decoder_layers=48, decoder_moe_every=1, encoder_moe_every=0, position="rope",
                             rope_theta=1e6, norm_eps=1e-6, qk_norm=True, tie_embeddings=False,
                             dtype="bfloat16"))
    config.moe.update(dict(router="top_k", num_experts=128, k=8, d_ff=768, activation="swiglu",
                           renormalize=True, order="token_major", num_shared_experts=0,
                           train_capacity_factor=0.0, eval_capacity_factor=0.0))
    config.data.objective = "lm"
    config.optimizer, config.learning_rate, config.schedule = "adamw", 3e-4, "cosine"
    config.seq_len, config.batch_size = 4096, 256
    config.num_train_steps, config.warmup_steps = 100_000, 2000
    return base.shrink_to_tiny(config) if size == "tiny" else config
