"""switch_tiny's FLOP-matched dense twin: the same model with every FFN dense (an expert has the
dense FFN's width and top-1 routing sends each token through one expert, so the matrix work per
token is the same, plus the router)."""
from configs import switch_tiny


def get_config():
    config = switch_tiny.get_config()
    config.model.encoder_moe_every = 0
    config.model.decoder_moe_every = 0
    return config
