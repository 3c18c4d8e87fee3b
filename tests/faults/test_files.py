"""Truncated and corrupted config files, tokenizer files and dataset files: each is a clear error
that names the file or the dataset (a ValueError in the library, one `error: ...` line from the
main job), never a stack trace from inside ml_collections, SentencePiece, array_record or TFDS.
Damage is drawn from a seeded RNG: cuts at random lengths, runs of flipped bytes at random offsets,
random bytes, empty and missing files.
"""
import os
import pathlib
import random
import shutil
import sys

import pytest

from moe_jax import configuration, data
from moe_jax.data import corpus, sources, tokenizer
from tests.faults import cli
from tests.faults.conftest import TALLY, TINY

SEED = 7
MAX_FILES = TINY["data.corpus_max_files"]
TRIED = {}


def damages(content: bytes, rng: random.Random, cuts: int, flips: int):
    """(name, damaged content): cuts at random points, runs of flipped bytes, garbage, empty."""
    for _ in range(cuts):
        n = rng.randrange(len(content))
        yield f"cut at {n} of {len(content)}", content[:n]
    for _ in range(flips):
        at, length = rng.randrange(len(content)), rng.choice((1, 8, 64))
        yield f"{length} bytes flipped at {at}", \
            content[:at] + bytes(b ^ 0xFF for b in content[at:at + length]) + content[at + length:]
    yield "random bytes", rng.randbytes(len(content))
    yield "empty", b""


def count(kind: str, n: int = 1) -> None:
    TRIED[kind] = TRIED.get(kind, 0) + n
    TALLY["damaged files"] = (sum(TRIED.values()), ", ".join(f"{n} {k}" for k, n in TRIED.items()))


@pytest.fixture
def fresh_configs_package():
    """Config files import `configs.base`: let each damaged copy be imported afresh."""
    saved = {k: v for k, v in sys.modules.items() if k == "configs" or k.startswith("configs.")}
    saved_path = list(sys.path)
    yield
    for k in [k for k in sys.modules if k == "configs" or k.startswith("configs.")]:
        del sys.modules[k]
    sys.modules.update(saved)
    sys.path[:] = saved_path


def test_damaged_config_files(tmp_path, fresh_configs_package):
    rng = random.Random(SEED)
    for name in ("switch_tiny.py", "base.py"):
        content = (cli.ROOT / "configs" / name).read_bytes()
        for i, (damage, broken) in enumerate(damages(content, rng, cuts=8, flips=4)):
            folder = tmp_path / f"{name}_{i}" / "configs"
            shutil.copytree(cli.ROOT / "configs", folder)
            (folder / name).write_bytes(broken)
            for k in [k for k in sys.modules if k == "configs" or k.startswith("configs.")]:
                del sys.modules[k]
            argv = ["moe_jax", f"--config={folder / 'switch_tiny.py'}", "--workdir=/nonexistent"]
            try:
                config = configuration.check_command_line(argv)
                configuration.validate(config)  # the damage happened to leave valid Python and values
            except ValueError as e:  # ConfigError, or a field's value the damage made invalid
                assert "config file" in str(e) or any(f in str(e)
                                                      for f in ("config.", "model.", "moe.", "data.")), \
                    (damage, str(e))
            count("config files")
    assert not os.path.exists("/nonexistent")


def test_damaged_config_file_through_the_main_job(faults, tmp_path):
    folder = tmp_path / "configs"
    shutil.copytree(cli.ROOT / "configs", folder)
    content = (folder / "base.py").read_bytes()
    (folder / "base.py").write_bytes(content[:len(content) // 2])
    job = cli.run([f"--config={folder / 'switch_tiny.py'}", f"--workdir={tmp_path / 'w'}"], faults.env,
                  faults.logs, "damaged_config", expect=1, forkserver=faults.forkserver)
    assert "Traceback" not in job.stderr and job.error_lines(), job.report()
    expected = f"error: config file '{folder / 'base.py'}' is not valid Python"
    assert job.error_lines()[0].startswith(expected), job.report()
    count("config files")


def test_damaged_tokenizer_files(faults, reference, tmp_path):
    rng = random.Random(SEED + 1)
    text = "def f(x):\n    return x + 1\n"
    content = open(faults.tokenizer_path(), "rb").read()
    for i, (damage, broken) in enumerate(damages(content, rng, cuts=8, flips=8)):
        path = tmp_path / f"t{i}.model"
        path.write_bytes(broken)
        try:
            tok = tokenizer.load(str(path), 0)
        except ValueError as e:
            assert str(path) in str(e) and "data.tokenizer" in str(e), (damage, str(e))
            assert e.__cause__ is None and e.__suppress_context__
        else:  # a flip in a piece's text or score: a tokenizer still, which works (if differently)
            assert isinstance(tok.decode(tok.encode(text)), str)
        count("tokenizer files")
    missing = tmp_path / "missing.model"
    with pytest.raises(ValueError, match="no SentencePiece model at"):
        tokenizer.load(str(missing), 0)
    count("tokenizer files")


def test_damaged_cached_tokenizer_through_the_main_job(faults, reference, tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(faults.data_dir, data_dir)
    cached = pathlib.Path(faults.tokenizer_path(data_dir))
    cached.write_bytes(cached.read_bytes()[:1000])
    job = cli.run(faults.args(tmp_path / "w", **{"data.data_dir": data_dir}), faults.env, faults.logs,
                  "damaged_tokenizer", expect=1, forkserver=faults.forkserver)
    assert "Traceback" not in job.stderr, job.report()
    expected = f"error: data.tokenizer: {cached} is not a valid SentencePiece"
    assert job.error_lines()[0].startswith(expected), job.report()
    count("tokenizer files")


DATASET = f"{corpus.StdlibCorpus.name}/{corpus.builder_config(MAX_FILES).name}/{corpus.StdlibCorpus.VERSION}"
DATA_FILES = ("stdlib_corpus-train.array_record-00000-of-00001",
              "stdlib_corpus-validation.array_record-00000-of-00001", "dataset_info.json")


def read_everything(data_dir, tok) -> list:
    """Every record of both splits, then a few batches through the pipeline."""
    config = configuration.check_command_line(["moe_jax", "--config=configs/switch_tiny.py",
                                                *cli.overrides({**TINY, "data.data_dir": data_dir})])
    records = []
    for split in ("train", "validation"):
        source = sources.open_split("default", split, str(data_dir), "text",
                                    split_field=f"data.{split}_split", max_files=MAX_FILES)
        records += [sources.text_of(source[i], "text") for i in range(len(source))]
    iterator = data.train_iterator(config, tok)
    for _ in range(3):
        next(iterator)
    return records


def test_damaged_dataset_files(faults, reference, tmp_path):
    rng = random.Random(SEED + 2)
    tok = tokenizer.load(faults.tokenizer_path(), 0)
    original = read_everything(faults.data_dir, tok)
    for file in DATA_FILES:
        content = (faults.data_dir / DATASET / file).read_bytes()
        cases = list(damages(content, rng, cuts=3, flips=3)) + [("missing", None)]
        for i, (damage, broken) in enumerate(cases):
            data_dir = tmp_path / f"{file}_{i}"
            shutil.copytree(faults.data_dir, data_dir, ignore=shutil.ignore_patterns("moe_jax_tokenizers"))
            if broken is None:
                (data_dir / DATASET / file).unlink()
            else:
                (data_dir / DATASET / file).write_bytes(broken)
            try:
                records = read_everything(data_dir, tok)
            except ValueError as e:
                assert "data.dataset='default'" in str(e) and str(data_dir) in str(e), (file, damage, str(e))
                assert e.__cause__ is None, (file, damage)
            else:
                # damage nothing reads (padding, an unused field of dataset_info.json):
                # the data must be intact
                assert records == original, (file, damage)
            count("dataset files")


def test_damaged_dataset_through_the_main_job(faults, reference, tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(faults.data_dir, data_dir)
    train = data_dir / DATASET / DATA_FILES[0]
    train.write_bytes(train.read_bytes()[:100_000])
    job = cli.run(faults.args(tmp_path / "w", **{"data.data_dir": data_dir}), faults.env, faults.logs,
                  "damaged_dataset", expect=1, forkserver=faults.forkserver)
    assert "Traceback" not in job.stderr, job.report()
    assert job.error_lines()[0].startswith("error: data.dataset='default' (split 'train')"), job.report()
    count("dataset files")
