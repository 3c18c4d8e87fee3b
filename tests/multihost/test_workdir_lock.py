"""One training job per workdir, as the user meets it (moe_jax.workdir_lock through the main job): a
second job on a live workdir exits non-zero within seconds naming the holder, on every process of a
multi-process job; a job killed with -9 leaves its lock behind and the restart takes it over without
manual cleanup, resuming from the checkpoint. The gs:// case is in test_gcs.py."""
import json
import signal
import time

from moe_jax import workdir_lock
from tests.faults import cli
from tests.multihost import test_multiprocess

SMALL = {**cli.TINY_MODEL, "model.kind": "decoder", "data.objective": "lm", "model.num_decoder_layers": 1,
         "model.decoder_moe_every": 1, "model.vocab_size": 1024, "data.extra_ids": 0,
         "num_train_steps": 2000, "eval_every_steps": 1000, "checkpoint_every_steps": 3}


def job(tmp_path, workdir, name: str) -> cli.Job:
    values = {**SMALL, "data.data_dir": tmp_path / "tfds"}
    args = ["--config=configs/switch_tiny.py", *cli.overrides(values), f"--workdir={workdir}"]
    return cli.Job(args, cli.environment(tmp_path / "jax_cache"), tmp_path / "logs", name)


def refused_within(second: cli.Job, holder_pid: int) -> float:
    """Seconds the second job took to exit non-zero with an error naming the holder's pid."""
    code = second.wait(120)
    seconds = time.monotonic() - second.started
    assert code != 0, second.report()
    named = [line for line in second.error_lines() if f"pid {holder_pid}" in line]
    assert named and "one job per workdir" in named[0], second.report()
    return seconds


def test_second_job_refused_and_a_killed_jobs_lock_taken_over(tmp_path):
    workdir = tmp_path / "run"
    first = job(tmp_path, workdir, "first")
    assert cli.wait_until(lambda: cli.checkpoints(workdir)[0], first, poll=0.05), first.report()
    second = job(tmp_path, workdir, "second")
    seconds = refused_within(second, first.pid)
    assert seconds < 30, seconds
    assert first.running() and cli.last_logged_step(workdir) >= 3
    first.kill()  # kill -9: the lock stays, naming a process that is gone
    assert json.loads((workdir / workdir_lock.NAME).read_text())["pid"] == first.pid
    saved = max(cli.checkpoints(workdir)[0])
    third = job(tmp_path, workdir, "third")
    # (metrics.jsonl holds the first job's later steps until the restart truncates it, then says so)
    assert cli.wait_until(lambda: "resuming from" in third.stderr
                          and cli.last_logged_step(workdir) > saved + 1, third, poll=0.05), third.report()
    third.terminate()  # a preemption: saves and exits 0, giving the lock back
    assert third.wait(120) == 0, third.report()
    assert "taking over the workdir lock of job" in third.stderr and f"pid {first.pid}" in third.stderr
    assert cli.resumed_from(third) == saved
    assert not (workdir / workdir_lock.NAME).exists()


def test_every_process_of_a_refused_multiprocess_job_exits(tmp_path):
    """A live lock (another host's, its heartbeat fresh): both processes of a 2-process job exit non-zero
    at once, process 0 naming the holder, process 1 pointing at process 0."""
    workdir = tmp_path / "held"
    workdir.mkdir()
    now = time.time()
    (workdir / workdir_lock.NAME).write_text(json.dumps(
        {"job": "elsewhere", "host": "another-host", "pid": 4242, "started": now, "heartbeat": now,
         "beat": 0}))
    jobs = test_multiprocess.start(tmp_path, workdir, 2)
    for process in jobs:
        assert process.wait(120) not in (0, -signal.SIGKILL), process.report()
    assert any("job elsewhere (host another-host, pid 4242" in line for line in jobs[0].error_lines())
    assert any("process 0's error names it" in line for line in jobs[1].error_lines()), jobs[1].report()
    assert not cli.checkpoints(workdir)[0] and not (workdir / "metrics.jsonl").exists()


def test_lock_timeout_is_refused_where_no_lock_is_taken(tmp_path):
    env = cli.environment(tmp_path / "jax_cache")
    args = ["--config=configs/switch_tiny.py", f"--workdir={tmp_path / 'run'}", "--mode=eval",
            "--lock_timeout=5"]
    job = cli.run(args, env, tmp_path / "logs", "eval_lock_timeout", expect=None)
    assert job.proc.returncode != 0, job.report()
    assert "--lock_timeout applies to --mode=train only" in job.stderr, job.report()
