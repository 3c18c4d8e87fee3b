"""Fine-tuning a published checkpoint through the CLI: the tiny Hugging Face Switch fixture imported
into a workdir, then configs/switch_base_finetune.py:tiny (the paper's recipe) on the offline
stdlib_docstrings seq2seq task with config.init_from pointing at that workdir."""
import re

import numpy as np

from moe_jax import data
from moe_jax.convert import workdir
from moe_jax.data import docstrings
from tests import test_convert
from tests.faults import cli

RECIPE = ("model.dropout_rate", "moe.expert_dropout", "moe.eval_capacity_factor")


def test_docstring_examples_pair_code_without_its_docstring_with_the_summary():
    source = ('def f(x):\n    """Add one to x.\n\n    More."""\n    return x + 1\n\n\n'
              'def g():\n    """Two."""\n')
    assert docstrings.examples_of(source) == [("def f(x):\n    return x + 1", "Add one to x.")]


def test_finetune_from_an_imported_checkpoint_trains_and_evaluates(tmp_path):
    tfds_dir, source_wd, wd = tmp_path / "tfds", tmp_path / "imported", tmp_path / "finetuned"
    fields = {"data.spm_vocab_size": 400, "data.extra_ids": 8, "data.corpus_max_files": 30,
              "data.data_dir": str(tfds_dir), "batch_size": 2, "seq_len": 32}
    workdir.import_checkpoint(test_convert.fixture("switch"), str(source_wd),
                                            [f"{k}={v}" for k, v in fields.items()])
    imported = workdir.saved_config(str(source_wd))
    vocabulary = data.get_tokenizer(imported).path  # the vocabulary the checkpoint goes with
    # the imported architecture and routing, the fine-tuning recipe's regularisation
    model = {f"{section}.{k}": v for section in ("model", "moe") for k, v in imported[section].items()
             if f"{section}.{k}" not in RECIPE}
    run = {**fields, **model, "data.tokenizer": vocabulary, "target_seq_len": 16, "num_train_steps": 2,
           "eval_every_steps": 2, "checkpoint_every_steps": 2, "num_eval_steps": 1, "log_every_steps": 1,
           "init_from": source_wd}
    args = ["--config=configs/switch_base_finetune.py:tiny", *cli.overrides(run), f"--workdir={wd}"]
    job = cli.run(args, cli.environment(tmp_path / "jax_cache"), tmp_path / "logs", "finetune")
    assert re.search(r"^initialised from config\.init_from=.*: \d+ parameters copied, 0 expert "
                     r"weights upcycled .* same vocabulary", job.stderr, re.M), job.report()
    assert re.search(r"^done: step 2$", job.stdout, re.M), job.report()
    records = cli.metrics(wd)
    assert [r["step"] for r in records] == [1, 2]
    assert np.isclose(records[0]["train/learning_rate"], 1e-4, rtol=1e-6)  # constant, no warmup
    assert np.isfinite(records[-1]["eval/loss"])
