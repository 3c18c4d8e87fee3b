"""A gs:// workdir against a Cloud Storage emulator (gcp-storage-emulator, in this process on
127.0.0.1): the main job trains into the bucket, refuses a second job on it, is killed with -9,
takes its lock over and resumes bit-identically to a local run, evaluates from the bucket, and leaves
nothing on local disk. Every client of the stack
is pointed at the emulator by the environment: gcsfs (etils.epath, Orbax's metadata) and
google-cloud-storage (tensorboardX) by STORAGE_EMULATOR_HOST, tensorstore (Orbax's arrays) by
TENSORSTORE_GCS_HTTP_URL."""
import json
import signal
import time

import fsspec
import pytest
from etils import epath

from moe_jax import configuration, data, paths, workdir_lock
from tests.faults import cli

pytest.importorskip("gcp_storage_emulator.server",
                    reason="the storage emulator is in the [test] extra: pip install -e .[test]")
from tests.multihost import gcs_emulator  # noqa: E402  (after the skip)

BUCKET = "moe-jax-test"
STEPS = 6
SMALL = {**cli.TINY_MODEL, "model.kind": "decoder", "data.objective": "lm", "model.num_decoder_layers": 1,
         "model.decoder_moe_every": 1, "model.vocab_size": 1024, "data.extra_ids": 0,
         "num_train_steps": STEPS, "eval_every_steps": 3, "checkpoint_every_steps": 3}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's URL; this process's clients and the jobs' environment point at it."""
    with gcs_emulator.serving(BUCKET) as url, pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", url)
        patch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
        root = tmp_path_factory.mktemp("gcs")
        yield root, cli.environment(root / "jax_cache")


def args(root, workdir, *extra):
    values = {**SMALL, "data.data_dir": root / "tfds"}
    return ["--config=configs/switch_tiny.py", *cli.overrides(values), f"--workdir={workdir}", *extra]


def fresh_listings() -> None:
    """Forget this process's cached bucket listings: the jobs write the bucket behind its back."""
    fsspec.filesystem("gcs", finalize_on_close=True).invalidate_cache()  # the instance etils.epath uses


def saved_steps(workdir: str) -> list[int]:
    """Steps whose checkpoint Orbax finished in the bucket (it marks each with commit_success.txt)."""
    fresh_listings()
    directory = epath.Path(workdir) / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / "commit_success.txt").exists())


def test_train_kill_resume_and_evaluate_in_a_bucket(gcs):
    root, env = gcs
    local = root / "local"
    cli.run(args(root, local), env, root / "logs", "local")
    workdir = f"gs://{BUCKET}/runs/killed"
    job = cli.Job(args(root, workdir), env, root / "logs", "killed")
    # Killed once the step-3 checkpoint is in the bucket, while step 4 or later trains or saves.
    assert cli.wait_until(lambda: cli.last_logged_step(workdir) >= 4 and saved_steps(workdir), job,
                          poll=0.05), job.report()
    job.kill()
    assert job.proc.returncode == -signal.SIGKILL
    saved = saved_steps(workdir)
    assert saved and max(saved) < STEPS
    again = cli.run(args(root, workdir), env, root / "logs", "restart")
    assert cli.resumed_from(again) == max(saved)
    assert "taking over the workdir lock of job" in again.stderr and f"pid {job.pid}" in again.stderr
    fresh_listings()
    assert not (epath.Path(workdir) / workdir_lock.NAME).exists()  # given back at the end
    # The resumed run's metrics, read back from the bucket, equal the uninterrupted local run's.
    fresh_listings()
    assert cli.without_timing(cli.metrics(workdir)) == cli.without_timing(cli.metrics(local))
    cli.assert_same_arrays(cli.checkpoint_arrays(workdir, STEPS), cli.checkpoint_arrays(local, STEPS))
    events = list((epath.Path(workdir) / "tensorboard").iterdir())
    assert events and all(p.name.startswith("events.out.tfevents.") for p in events)
    evaluated = cli.run(args(root, workdir, "--mode=eval"), env, root / "logs", "eval")
    assert "loss" in evaluated.stdout, evaluated.report()
    # Nothing landed on local disk under a 'gs:' folder (os.path.abspath('gs://b/x') = '<cwd>/gs:/b/x').
    assert not (cli.ROOT / "gs:").exists()


def test_a_live_lock_in_the_bucket_refuses_a_job(gcs):
    """A job whose lock object exists already (ifGenerationMatch=0 fails) and is alive (another host, a
    fresh heartbeat) is refused, naming it, and writes nothing."""
    root, env = gcs
    workdir = epath.Path(f"gs://{BUCKET}/runs/held")
    now = time.time()
    held = {"job": "elsewhere", "host": "another-host", "pid": 4242, "started": now, "heartbeat": now,
            "beat": 0}
    (workdir / workdir_lock.NAME).write_text(json.dumps(held))
    job = cli.run(args(root, workdir), env, root / "logs", "held", expect=None)
    assert job.proc.returncode != 0, job.report()
    assert any("job elsewhere (host another-host, pid 4242" in line for line in job.error_lines()), \
        job.report()
    fresh_listings()
    assert json.loads((workdir / workdir_lock.NAME).read_text()) == held
    assert [p.name for p in workdir.iterdir()] == [workdir_lock.NAME]


def test_tokenizer_from_the_bucket_and_a_data_dir_url_refused(gcs, tmp_path):
    """data.tokenizer=gs://... is read from the bucket (etils.epath); data.data_dir=gs://... is refused
    before anything starts (array_record reads local files only: mount the bucket instead)."""
    root, env = gcs
    config = configuration.load("configs/switch_tiny.py")
    config.data.update({"data_dir": str(tmp_path / "tfds"), "spm_vocab_size": SMALL["data.spm_vocab_size"],
                        "corpus_max_files": SMALL["data.corpus_max_files"]})
    local = data.get_tokenizer(config)
    url = epath.Path(f"gs://{BUCKET}/vocab/stdlib.model")
    url.write_bytes(epath.Path(local.path).read_bytes())
    values = {**SMALL, "data.data_dir": tmp_path / "tfds", "data.tokenizer": str(url),
              "num_train_steps": 2, "eval_every_steps": 2, "checkpoint_every_steps": 2}
    command = ["--config=configs/switch_tiny.py", *cli.overrides(values), f"--workdir={tmp_path / 'run'}"]
    job = cli.run(command, env, root / "logs", "tokenizer_url")
    assert [r["step"] for r in cli.metrics(tmp_path / "run") if "train/loss" in r] == [1, 2], job.report()
    values["data.data_dir"] = f"gs://{BUCKET}/tfds"
    job = cli.run(["--config=configs/switch_tiny.py", *cli.overrides(values), f"--workdir={tmp_path / 'x'}"],
                  env, root / "logs", "data_dir_url", expect=None)
    assert job.proc.returncode != 0 and "Mount the bucket (gcsfuse" in job.stderr, job.report()
    assert not (tmp_path / "x").exists()


def test_line_appender_rewrites_the_object_from_the_text_it_keeps(gcs):
    path = epath.Path(f"gs://{BUCKET}/appender/metrics.jsonl")
    path.write_text("before\n")
    lines = paths.LineAppender(path)
    for i in range(3):
        lines.append(f"{i}\n")
    fresh_listings()
    assert path.read_text() == "before\n0\n1\n2\n"
