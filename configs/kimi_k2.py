"""Kimi K2 (Kimi Team 2025, "Kimi K2: Open Agentic Intelligence"): DeepSeek-V3's architecture
(configs/deepseek_v3.py) with 384 routed experts (8 chosen, no group limit) plus 1 shared, 64
attention heads, only the first layer dense, a 163840-token vocabulary, routed weights scaled by
2.827 and RoPE theta 50000. 1.04T parameters, 32B active. `--config=configs/kimi_k2.py:tiny` runs
the same architecture on a CPU."""
from configs import base, deepseek_v3


def get_config(size: str = "full"):
    config = deepseek_v3.get_config()
    config.model.update(dict(vocab_size=163840, num_heads=64, first_dense_layers=1, rope_theta=50000.0))
    config.moe.update(dict(num_experts=384, num_expert_groups=1, k_groups=1, routed_scaling_factor=2.827))
    config.seq_len, config.batch_size = 4096, 16384  # 67M tokens per batch
    config.num_train_steps = 235_000  # 15.5T tokens
    return base.shrink_to_tiny(config) if size == "tiny" else config
