"""Switch-Base (Fedus et al. 2021): T5-Base with 128 experts in every second FFN, top-1 routing,
capacity factor 1.25 / 2.0; about 7B parameters. For Cloud TPU;
`--config=configs/switch_base.py:tiny` runs the same architecture on a CPU."""
from configs import base, t5_base


def get_config(size: str = "full"):
    config = t5_base.get_config()
    config.model.encoder_moe_every = config.model.decoder_moe_every = 2
    config.moe.update(dict(num_experts=128, k=1, d_ff=3072, activation="relu", group_size=512))
    # Expert parallelism over every device (e.g. v5e-16: 8 experts per chip); the batch spans data x expert.
    config.mesh_shape = (1, -1, 1)
    return base.shrink_to_tiny(config) if size == "tiny" else config
