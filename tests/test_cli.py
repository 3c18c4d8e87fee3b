"""The main job through its real entry point, `python -m moe_jax.main`, in subprocesses: a short
training run and what it leaves in the workdir, kill -9 and restart, SIGTERM, a diverging loss,
bad command lines, and --mode=eval / --mode=infer on the trained workdir.

The model is configs/switch_tiny.py shrunk further (d_model 32, 6 steps of 4 x 32 tokens) on a
30-file corpus with a 1000-piece vocabulary, prepared once for the module. The processes share
a persistent compilation cache, so only the first run of each program compiles.
(The fault suite, tests/faults, covers the same ground harder: many kills, full disks, meshes.)
"""
import ast
import os
import re
import shutil
import signal

import numpy as np
import pytest

from tests.faults import cli

STEPS = 6
SMALL = {**cli.TINY_MODEL, "model.vocab_size": 1100, "num_train_steps": STEPS, "eval_every_steps": 3,
         "checkpoint_every_steps": 2}


class Setup:
    def __init__(self, root):
        self.root = root
        self.env = cli.environment(root / "jax_cache")
        self.logs = root / "logs"
        self.data_dir = root / "tfds"

    def args(self, workdir, *extra, config="configs/switch_tiny.py", **changes):
        values = {**SMALL, "data.data_dir": self.data_dir, **changes}
        return [f"--config={config}", *cli.overrides(values), f"--workdir={workdir}", *extra]

    def start(self, name, workdir, *extra, **changes):
        return cli.Job(self.args(workdir, *extra, **changes), self.env, self.logs, name)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def trained(setup):
    """An uninterrupted 6-step run (it also prepares the corpus and the tokenizer)."""
    workdir = setup.root / "trained"
    job = cli.run(setup.args(workdir), setup.env, setup.logs, "trained")
    # The diverging run compiles programs of its own: it runs meanwhile, alongside the next tests.
    setup.diverged = setup.start("diverged", setup.root / "diverged", learning_rate=1e12,
                                 checkpoint_every_steps=1)
    yield job, workdir
    setup.diverged.kill()


def assert_clean_error(job, pattern):
    """A non-zero exit with one `error: ...` line matching `pattern`, and no traceback."""
    assert job.proc.returncode not in (0, None), job.report()
    assert "Traceback" not in job.stderr, job.report()
    message = job.stderr[job.stderr.find("\nerror: ") + 1:]  # the error, with the lines it lists
    assert message.startswith("error: ") and re.search(pattern, message, re.S), job.report()


def test_training_writes_checkpoints_metrics_events_and_a_summary(trained):
    job, workdir = trained
    assert re.search(rf"^done: step {STEPS}$", job.stdout, re.M), job.report()
    for key in ("train/loss", "eval/loss", "tokens_per_sec_mean", "dropped_fraction"):
        assert re.search(rf"^  {re.escape(key)} +\d+\.\d{{4}}$", job.stdout, re.M), job.report()
    assert cli.checkpoints(workdir) == ([2, 4, 6], [])  # keep_checkpoints = 3
    records = cli.metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # one line per logged step
    for r in records:
        assert np.isfinite(r["train/loss"])
        # one routing record per MoE layer, carrying its stack and layer index
        layers = [(row["stack"], row["layer"]) for row in r["train/routing"]]
        assert layers == [("encoder", 1), ("decoder", 1)]
        assert all(np.isfinite(row["router_entropy"]) for row in r["train/routing"])
        assert ("eval/loss" in r) == (r["step"] % 3 == 0), r["step"]  # evaluated at steps 3 and 6
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    summary_eval = float(re.search(r"^  eval/loss +(\S+)$", job.stdout, re.M).group(1))
    assert summary_eval == pytest.approx(records[-1]["eval/loss"], abs=1e-4)
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_kill_9_and_restart_equal_an_uninterrupted_run(setup, trained):
    _, reference = trained
    workdir = setup.root / "killed"
    job = setup.start("killed", workdir)
    # Killed once step 3 is logged and the step-2 checkpoint is complete (the checkpoint is written
    # asynchronously; kills in the middle of a write are tests/faults' job).
    assert cli.wait_until(
        lambda: cli.last_logged_step(workdir) >= 3 and cli.checkpoints(workdir)[0], job), job.report()
    job.kill()
    assert job.proc.returncode == -signal.SIGKILL
    complete, _ = cli.checkpoints(workdir)
    assert complete and max(complete) < STEPS
    again = cli.run(setup.args(workdir), setup.env, setup.logs, "killed_restart")
    assert cli.resumed_from(again) == max(complete)
    assert cli.without_timing(cli.metrics(workdir)) == cli.without_timing(cli.metrics(reference))
    cli.assert_same_arrays(cli.checkpoint_arrays(workdir, STEPS), cli.checkpoint_arrays(reference, STEPS))


def test_sigterm_saves_a_checkpoint_and_exits_0(setup, trained):
    workdir = setup.root / "preempted"
    job = setup.start("preempted", workdir, num_train_steps=10_000)  # stopped long before the end
    assert cli.wait_until(lambda: cli.last_logged_step(workdir) >= 2, job), job.report()
    job.terminate()
    assert job.wait(120) == 0, job.report()
    step = int(re.search(r"^done: step (\d+) \(preempted: SIGTERM\)$", job.stdout, re.M).group(1))
    assert f"SIGTERM: saved the checkpoint of step {step}" in job.stderr
    assert cli.checkpoints(workdir)[0][-1] == step == cli.last_logged_step(workdir)


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(setup, trained):
    workdir = setup.root / "diverged"
    job = setup.diverged  # a learning rate of 1e12: the first update blows the parameters up
    job.wait(300)
    assert_clean_error(job, r"at step \d+.*; stopping\. The last good checkpoint \(step \d+\) is kept")
    bad_step = int(re.search(r"at step (\d+)", job.error_lines()[0]).group(1))
    kept = int(re.search(r"checkpoint \(step (\d+)\)", job.error_lines()[0]).group(1))
    assert kept == bad_step - 1 == cli.last_logged_step(workdir)  # every step before it was logged and saved
    assert cli.checkpoints(workdir)[0][-1] == kept
    assert all(np.isfinite(r["train/loss"]) for r in cli.metrics(workdir))
    assert all(np.isfinite(a).all() for a in cli.checkpoint_arrays(workdir, kept).values())


def test_bad_command_lines_are_one_line_errors(setup, trained):
    _, reference = trained
    other = setup.root / "incompatible"
    shutil.copytree(reference, other)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in other.rglob("*")}
    cases = {  # name: (arguments, expected error)
        "missing_config": (setup.args(other, config="configs/no_such_experiment.py"),
                           r"config file 'configs/no_such_experiment.py' does not exist"
                           r".*configs/switch_tiny.py"),
        "unknown_override": (setup.args(other, "--config.moe.num_expertz=4"),
                             r"unknown config field config\.moe\.num_expertz "
                             r"\(did you mean config\.moe\.num_experts"),
        "mistyped_value": (setup.args(other, "--config.batch_size=four"), r"--config\.batch_size=four"),
        "dataset_not_found": (setup.args(setup.root / "unused", **{"data.dataset": "nonexistent_ds"}),
                              r"data\.dataset='nonexistent_ds': no such TFDS dataset "
                              r".* tfds build nonexistent_ds"),
        "incompatible_checkpoint": (setup.args(other, **{"moe.num_experts": 4}),
                                    r"different config; refusing to resume or overwrite it"),
    }
    # concurrently
    jobs = {name: cli.Job(args, setup.env, setup.logs, name) for name, (args, _) in cases.items()}
    for name, job in jobs.items():
        job.wait(300)
        assert_clean_error(job, cases[name][1])
    assert "moe.num_experts: 8 -> 4" in jobs["incompatible_checkpoint"].stderr  # the differences are listed
    # nothing touched
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in other.rglob("*")} == before
    assert not (setup.root / "unused").exists()


def test_eval_and_infer_on_the_trained_workdir(setup, trained):
    _, workdir = trained
    evaluation = setup.start("eval", workdir, "--mode=eval")
    prompts = ["def fibonacci(n):", "import os"]
    inference = setup.start("infer", workdir, "--mode=infer", *[f"--prompt={p}" for p in prompts],
                            "--max_new_tokens=8")
    assert evaluation.wait(300) == 0, evaluation.report()
    printed = dict(line.split(None, 1) for line in evaluation.stdout.splitlines())
    assert int(printed["step"]) == STEPS
    # The same checkpoint and eval batches as the training run's last evaluation.
    final = cli.metrics(workdir)[-1]
    assert float(printed["loss"]) == pytest.approx(final["eval/loss"], rel=1e-5)
    assert float(printed["accuracy"]) == pytest.approx(final["eval/accuracy"], abs=1e-6)
    assert inference.wait(300) == 0, inference.report()
    lines = inference.stdout.splitlines()
    assert len(lines) == len(prompts), inference.report()
    for prompt, line in zip(prompts, lines):
        head = f"{prompt!r} -> "
        assert line.startswith(head), line
        assert isinstance(ast.literal_eval(line[len(head):]), str), line  # the continuation, as a repr
    assert not os.path.exists(workdir / "checkpoints" / str(STEPS + 1))


@pytest.mark.parametrize("name", ["deepseek_v3", "gpt_oss_20b", "qwen3_30b_a3b"])
def test_frontier_tiny_configs_train_through_the_cli(setup, trained, name):
    """The frontier architectures at their `:tiny` size (latent attention and group-limited sigmoid
    routing; sinks, bands and biased clamped experts; QK-norm and top-8 of 128) train dropless
    through the real entry point: 2 steps, finite losses, a checkpoint. Kimi K2 and gpt-oss-120b
    share these architectures."""
    data = {k: v for k, v in SMALL.items() if not k.startswith(("model.", "moe."))}
    values = {**data, "model.vocab_size": 1100, "num_train_steps": 2, "eval_every_steps": 2,
              "checkpoint_every_steps": 2, "data.data_dir": setup.data_dir}
    workdir = setup.root / name
    job = cli.run([f"--config=configs/{name}.py:tiny", *cli.overrides(values), f"--workdir={workdir}"],
                  setup.env, setup.logs, name)
    assert re.search(r"^done: step 2$", job.stdout, re.M), job.report()
    records = cli.metrics(workdir)
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["train/loss"]) for r in records)
    assert cli.checkpoints(workdir) == ([2], [])
