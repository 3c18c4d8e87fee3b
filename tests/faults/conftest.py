"""The fault suite: the main job under kills, preemption, full and read-only disks, another mesh,
a diverging loss, fuzzed configs and damaged files; nothing may be lost or silently wrong.

    pytest -q tests/faults

It runs in its own pytest process (tests/conftest.py leaves it out of `pytest tests`): it starts
dozens of training processes. They train a tiny decoder-only MoE (configs/switch_tiny.py with the
overrides below: 2 MoE layers of 8 experts, d_model 32) for 12 steps on a 30-file corpus, and share
one persistent compilation cache, one prepared corpus and one uninterrupted reference run.
"""
import pytest

from moe_jax.data import sources, tokenizer
from tests.faults import cli

STEPS = 12
TERM_GRACE_S = 30  # a preempted run must have saved and exited by then (Cloud TPU gives a VM about 30 s)
SAVE_STEPS = (3, 6, 9, 12)  # checkpoint_every_steps = 3; keep_checkpoints = 3
EVAL_STEPS = (4, 8, 12)
TINY = {
    **cli.TINY_MODEL, "model.kind": "decoder", "data.objective": "lm", "model.num_decoder_layers": 2,
    "model.decoder_moe_every": 1, "model.vocab_size": 1024, "data.extra_ids": 0, "num_train_steps": STEPS,
    "eval_every_steps": 4, "checkpoint_every_steps": 3,
}


class Faults:
    def __init__(self, root):
        self.root = root
        self.env = cli.environment(root / "jax_cache")
        self.logs = root / "logs"
        self.data_dir = root / "tfds"
        self.forkserver = cli.Forkserver(self.env)

    def tokenizer_path(self, data_dir=None) -> str:
        """The vocabulary the main job trained on the corpus and cached in the data dir."""
        return tokenizer.cache_path(str(data_dir or self.data_dir), sources.dataset_tag("default",
                                    TINY["data.corpus_max_files"]), TINY["data.spm_vocab_size"])

    def args(self, workdir, *extra, **changes):
        values = {**TINY, "data.data_dir": self.data_dir, **changes}
        return ["--config=configs/switch_tiny.py", *cli.overrides(values), f"--workdir={workdir}", *extra]

    def start(self, name, workdir, *extra, **changes):
        """The main job on `workdir`, forked from the server that has imported moe_jax."""
        return cli.Job(self.args(workdir, *extra, **changes), self.env, self.logs, name,
                       forkserver=self.forkserver)

    def run(self, name, workdir, *extra, expect=0, timeout=600, **changes):
        return cli.run(self.args(workdir, *extra, **changes), self.env, self.logs, name, expect=expect,
                       timeout=timeout, forkserver=self.forkserver)


@pytest.fixture(scope="session")
def faults(tmp_path_factory):
    return Faults(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="session")
def reference(faults):
    """The uninterrupted run every faulty one must equal: (workdir, metrics without timings, final arrays).
    It also prepares the corpus and the tokenizer and fills the compilation cache."""
    workdir = faults.root / "reference"
    faults.run("reference", workdir)
    assert cli.checkpoints(workdir) == (list(SAVE_STEPS[-3:]), [])
    return workdir, cli.without_timing(cli.metrics(workdir)), cli.checkpoint_arrays(workdir, STEPS)


def assert_equals_reference(workdir, reference):
    """Losses (metrics.jsonl) and the final train state equal the uninterrupted run's, bit for bit."""
    _, ref_metrics, ref_arrays = reference
    records = cli.without_timing(cli.metrics(workdir))
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records == ref_metrics
    cli.assert_same_arrays(cli.checkpoint_arrays(workdir, STEPS), ref_arrays)


def pytest_configure(config):
    # ml_collections loads each config file with importlib's deprecated load_module(), hundreds of times here.
    config.addinivalue_line("filterwarnings",
                            "ignore:the load_module\\(\\) method is deprecated:DeprecationWarning")


# What each test tried, for the summary printed at the end: {fault: (count, detail)}.
TALLY: dict[str, tuple[int, str]] = {}


def pytest_terminal_summary(terminalreporter):
    if not TALLY:
        return
    terminalreporter.section("faults and inputs tried")
    for fault, (count, detail) in TALLY.items():
        terminalreporter.write_line(f"{count:5d}  {fault}" + (f": {detail}" if detail else ""))
    terminalreporter.write_line(f"{sum(c for c, _ in TALLY.values()):5d}  in all")
