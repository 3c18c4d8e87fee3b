"""gpt-oss-20b (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card"): gpt-oss-120b's architecture
(configs/gpt_oss_120b.py) with 24 layers and 32 experts per MoE layer (top-4). 20.9B parameters,
3.6B active (4.2B with the input embedding table, as moe_jax counts).
`--config=configs/gpt_oss_20b.py:tiny` runs the same architecture on a CPU."""
from configs import base, gpt_oss_120b


def get_config(size: str = "full"):
    config = gpt_oss_120b.get_config(num_layers=24, num_experts=32)
    config.fsdp = False  # it fits v5p-64 without (README, "Prove it fits")
    return base.shrink_to_tiny(config) if size == "tiny" else config
