"""DeepSeekMoE 16B (Dai et al. 2024): fine-grained experts (64 routed experts of width 1408, 6 chosen
per token) plus 2 always-on shared experts in the layers of a 28-layer decoder-only LM.
The first layer is dense (FFN 10944, model.first_dense_layers=1) as in the paper: 16.4B parameters,
2.8B active. For accelerators; `--config=configs/deepseek_moe.py:tiny` runs the same architecture
on a CPU."""
from configs import base


def get_config(size: str = "full"):
    config = base.get_config()
    config.model.update(dict(kind="decoder", vocab_size=102400, d_model=2048, num_heads=16, head_dim=128,
                             d_ff=10944, activation="swiglu", num_encoder_layers=0, num_decoder_layers=28,
                             first_dense_layers=1, decoder_moe_every=1, encoder_moe_every=0, position="rope",
                             dtype="bfloat16"))
    config.moe.update(dict(num_experts=64, k=6, d_ff=1408, activation="swiglu", num_shared_experts=2,
                           order="token_major", train_capacity_factor=0.0, eval_capacity_factor=0.0))
    config.data.objective = "lm"
    config.optimizer, config.learning_rate, config.schedule = "adamw", 4.2e-4, "cosine"
    config.seq_len, config.batch_size = 4096, 512
    config.num_train_steps, config.warmup_steps = 100_000, 2000
    return base.shrink_to_tiny(config) if size == "tiny" else config
