"""T5.1.1-Base (Raffel et al. 2020, the 1.1 checkpoints' changes): 12+12 layers, d_model 768,
gated-GELU FFN 2048, untied embeddings, 32k vocabulary; about 0.25B parameters. configs/t5_base.py
is the original T5 (v1.0: ReLU FFN 3072, tied embeddings) that the Switch paper compares against.
`--config=configs/t5_1_1_base.py:tiny` runs the same architecture on a CPU."""
from configs import base, t5_base


def get_config(size: str = "full"):
    config = t5_base.get_config()
    config.model.update(dict(d_ff=2048, activation="geglu", tie_embeddings=False))
    return base.shrink_to_tiny(config) if size == "tiny" else config
