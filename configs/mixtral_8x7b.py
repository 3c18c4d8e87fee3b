"""Mixtral 8x7B (Jiang et al. 2024): a decoder-only LM with 32 layers, every FFN an MoE layer of
8 SwiGLU experts, top-2 with the two weights renormalized, no token dropping, grouped-query
attention (32 query / 8 key-value heads), RoPE (theta 1e6); 46.7B parameters, 12.9B active.
For accelerators; `--config=configs/mixtral_8x7b.py:tiny` runs the same architecture on a CPU."""
from configs import base


def get_config(size: str = "full"):
    config = base.get_config()
    config.model.update(dict(kind="decoder", vocab_size=32000, d_model=4096, num_heads=32, num_kv_heads=8,
                             head_dim=128, d_ff=14336, activation="swiglu", num_encoder_layers=0,
                             num_decoder_layers=32, decoder_moe_every=1, encoder_moe_every=0, position="rope",
                             rope_theta=1e6, norm_eps=1e-5, dtype="bfloat16"))
    config.moe.update(dict(num_experts=8, k=2, d_ff=14336, activation="swiglu", renormalize=True,
                           order="token_major", train_capacity_factor=0.0, eval_capacity_factor=0.0))
    config.data.objective = "lm"
    config.optimizer, config.learning_rate, config.schedule = "adamw", 3e-4, "cosine"
    config.seq_len, config.batch_size = 4096, 256
    config.num_train_steps, config.warmup_steps = 100_000, 2000
    return base.shrink_to_tiny(config) if size == "tiny" else config
