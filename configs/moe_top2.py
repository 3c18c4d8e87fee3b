"""GShard-style top-2 routing (Lepikhin et al. 2020) at switch_tiny's size: the two gates divided by
their sum and a second expert dispatched at random in proportion to its gate. Buffers fill
token-major (each token's two choices in turn): GShard's rank-major order would let a later
token's first choice evict an earlier token's second choice in the causal decoder."""
from configs import switch_tiny


def get_config():
    config = switch_tiny.get_config()
    config.moe.k = 2
    config.moe.renormalize = True
    config.moe.second_choice = "random"
    config.moe.order = "token_major"
    return config
