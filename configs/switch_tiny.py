"""The quickstart: a small Switch Transformer (Fedus et al. 2021) that learns visibly in a few
minutes on a 2-core CPU. Encoder-decoder, T5 span corruption on the offline corpus, top-1 routing
over 8 experts in every second FFN, capacity factor 1.25 in training and 2.0 in evaluation."""
from configs import base


def get_config():
    config = base.get_config()
    config.num_train_steps = 300
    config.batch_size = 16
    config.warmup_steps = 30
    config.eval_every_steps = config.checkpoint_every_steps = 100
    config.num_eval_steps = 10
    config.log_every_steps = 10
    return config
