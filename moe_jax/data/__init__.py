"""Data for moe_jax: corpus, tokenizer, objectives and the checkpointable grain pipeline.

    tok = data.get_tokenizer(config)
    train_it = data.train_iterator(config, tok, process_index,
                                   process_count)  # next(), get_state(), set_state()
    eval_batches = data.eval_batches(config, tok, process_index, process_count)  # num_eval_steps batches

| module | owns |
|---|---|
| corpus.py | the default offline corpus (Python's stdlib source) as a TFDS dataset |
| sources.py | opening a split of the corpus or of any prepared TFDS text dataset, with clear errors |
| tokenizer.py | SentencePiece with T5's ids and sentinels; training and caching a vocabulary |
| objectives.py | causal LM and T5 span corruption in NumPy; T5X features |
| options.py | validation of the config's data fields; lengths derived from them |
| pipeline.py | the grain pipeline: shuffle, host sharding, packing, batches, iterator state |
"""
from moe_jax.data.pipeline import EvalBatches, eval_batches, get_tokenizer, train_iterator
from moe_jax.data.tokenizer import Tokenizer

__all__ = ["EvalBatches", "Tokenizer", "eval_batches", "get_tokenizer", "train_iterator"]
