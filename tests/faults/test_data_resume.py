"""The data iterator's state restores exactly: no repeated or skipped example across any number of
resumes, with 1, 2 and 4 hosts emulated (each host's iterator built with its process index), across
several epochs.

Each host's stream is read once without interruption and once with resumes at random batches
(seeded): its state saved (a JSON round trip, as in a checkpoint) and a new iterator set to it. The
two streams must be equal batch for batch; and in every epoch the hosts' examples together must be
the one-host stream's, each exactly once.
"""
import json
import random
from collections import Counter

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import base
from moe_jax import data
from moe_jax.data import tokenizer
from tests.faults.conftest import TALLY

EXAMPLES, GLOBAL_BATCH, EPOCHS = 24, 8, 4  # mock lm1b: 24 short sentences, 3 batches of 8 an epoch
TRIED = {"resumes": 0}


def config_for(tok_path):
    config = base.get_config()
    config.model.kind, config.data.objective = "decoder", "lm"
    config.data.dataset, config.data.eval_split, config.data.tokenizer = "lm1b", "test", tok_path
    config.data.extra_ids, config.data.packing = 0, False  # one example per row: rows are examples
    config.seq_len, config.batch_size = 64, GLOBAL_BATCH
    return config


def rows(batch) -> list[tuple]:
    return [tuple(r[r > 0]) for r in batch["decoder_target_tokens"]]


def stream(config, tok, host: int, hosts: int, n: int, resume_at=()) -> list[dict]:
    """n batches of one host, resuming from a saved state before each batch index in resume_at."""
    iterator = data.train_iterator(config, tok, host, hosts)
    batches = []
    for i in range(n):
        if i in resume_at:
            state = json.loads(json.dumps(iterator.get_state()))
            iterator = data.train_iterator(config, tok, host, hosts)
            iterator.set_state(state)
            TRIED["resumes"] += 1
        batches.append(next(iterator))
    return batches


@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_iterator_state_restores_exactly(faults, reference, hosts):
    tok = tokenizer.load(faults.tokenizer_path(), 0)
    config = config_for(faults.tokenizer_path())
    rng = random.Random(hosts)
    n = EPOCHS * EXAMPLES // GLOBAL_BATCH
    with tfds.testing.mock_data(num_examples=EXAMPLES):
        one_host = [r for b in stream(config, tok, 0, 1, n) for r in rows(b)]
        epochs = [Counter(one_host[e * EXAMPLES:(e + 1) * EXAMPLES]) for e in range(EPOCHS)]
        per_host = []
        for host in range(hosts):
            plain = stream(config, tok, host, hosts, n)
            resumed = stream(config, tok, host, hosts, n, resume_at=set(rng.sample(range(1, n), 4)))
            for a, b in zip(plain, resumed):
                assert a.keys() == b.keys()
                for k in a:
                    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
            per_host.append([rows(b) for b in resumed])
    per_epoch = EXAMPLES // GLOBAL_BATCH
    for e in range(EPOCHS):  # every example of the epoch exactly once, over all hosts
        seen = Counter(r for h in per_host for b in h[e * per_epoch:(e + 1) * per_epoch] for r in b)
        assert seen == epochs[e], f"epoch {e}: repeated or skipped examples"
    TALLY["data iterator resumes"] = (TRIED["resumes"], "1, 2 and 4 hosts, 4 epochs each")
