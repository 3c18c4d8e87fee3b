"""Expert-choice routing (Zhou et al. 2022) at switch_tiny's size. Each expert takes its top-C
tokens of a group, which looks at the whole group, so it lives in the encoder only: the decoder
is dense."""
from configs import switch_tiny


def get_config():
    config = switch_tiny.get_config()
    config.moe.router = "expert_choice"
    config.moe.train_capacity_factor = 2.0  # c = 2: on average two experts per token, as in the paper
    config.moe.eval_capacity_factor = 2.0
    config.model.decoder_moe_every = 0
    return config
