"""Fine-tuning Switch-Base (Fedus et al. 2021) from a checkpoint, with the paper's fine-tuning recipe.

Section 2.4 / Table 4: expert dropout 0.4 inside the experts, dropout 0.1 everywhere else
(model.dropout_rate: T5's dropout on embeddings, attention and FFN outputs and dense FFN hidden
units); evaluation at capacity factor 2.0. Adafactor at a constant learning rate of 1e-4, no warmup
(the value of T5X's Switch fine-tuning gin files). The task defaults to the offline seq2seq task
data.dataset='stdlib_docstrings' (a function's code -> its docstring's summary); the checkpoint is
config.init_from, a moe_jax workdir or a Hugging Face directory such as google/switch-base-8 (its
spiece.model then becomes data.tokenizer: a fine-tuning run must use the pre-trained vocabulary).

    python -m moe_jax.main --config=configs/switch_base_finetune.py --workdir=/tmp/ft \\
        --config.init_from=switch-base-8 --config.moe.num_experts=8

`:tiny` is the same recipe at the size of configs/switch_base.py:tiny.
"""
from configs import switch_base


def get_config(size: str = "full"):
    config = switch_base.get_config(size)
    config.optimizer, config.schedule = "adafactor", "constant"
    config.learning_rate, config.warmup_steps = 1e-4, 0
    config.model.dropout_rate = 0.1
    config.moe.expert_dropout = 0.4
    config.moe.eval_capacity_factor = 2.0
    config.data.dataset, config.data.objective = "stdlib_docstrings", "seq2seq"
    config.seq_len, config.target_seq_len = 512, 64
    if size == "tiny":
        config.seq_len, config.target_seq_len = 128, 32
        config.num_train_steps, config.eval_every_steps = 200, 100
    return config
