"""T5-Base v1.0 (Raffel et al. 2020), the Switch paper's dense baseline at full size: 12+12 layers,
d_model 768, ReLU FFN 3072, tied embeddings, 32k vocabulary; about 0.22B parameters (T5.1.1:
configs/t5_1_1_base.py). For Cloud TPU;
`--config=configs/t5_base.py:tiny` runs the same architecture on a CPU."""
from configs import base


def get_config(size: str = "full"):
    config = base.get_config()
    config.model.update(dict(vocab_size=32128, d_model=768, num_heads=12, head_dim=64, d_ff=3072,
                             activation="relu", num_encoder_layers=12, num_decoder_layers=12,
                             encoder_moe_every=0, decoder_moe_every=0, tie_embeddings=True, dtype="bfloat16"))
    config.seq_len, config.target_seq_len = 512, 114
    config.batch_size = 128
    config.num_train_steps = 100_000
    config.warmup_steps = 10_000
    config.eval_every_steps = config.checkpoint_every_steps = 5000
    config.log_every_steps = 100
    return base.shrink_to_tiny(config) if size == "tiny" else config
