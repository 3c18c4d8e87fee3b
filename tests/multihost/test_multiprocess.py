"""Two JAX processes on this machine as one job (jax.distributed with a coordinator on 127.0.0.1,
gloo collectives between the processes' CPU devices): `python -m moe_jax.main --multihost` with
explicit process flags trains an expert-parallel MoE on the 8-device mesh of both processes (each
feeds its own rows of the batch; the experts spread over both on (1, 8, 1)), with the losses of one
process of 8 devices on the same batches (data.shards); every process writes its shards of the
checkpoint, a checkpoint of either process count resumes in the other, a dead or preempted
process is handled by both, and evaluation and decoding on the mesh equal one device's."""
import re
import signal
import time

import numpy as np

from tests.faults import cli

STEPS, MORE = 3, 5
SMALL = {**cli.TINY_MODEL, "model.kind": "decoder", "data.objective": "lm", "model.num_decoder_layers": 1,
         "model.decoder_moe_every": 1, "model.vocab_size": 1024, "data.extra_ids": 0, "moe.num_experts": 8,
         "num_train_steps": STEPS, "eval_every_steps": STEPS, "checkpoint_every_steps": STEPS,
         "mesh_shape": (2, 4, 1), "batch_size": 8, "data.shards": 2}


def arguments(tmp_path, workdir, processes: int, steps: int = STEPS, **changes) -> list[list[str]]:
    """The command line of each process of the job training `workdir` to `steps` with 8 devices in 1
    or 2 processes (heartbeat timeout 10 s)."""
    values = {**SMALL, "data.data_dir": tmp_path / "tfds", "num_train_steps": steps, **changes}
    base = ["--config=configs/switch_tiny.py", *cli.overrides(values), f"--workdir={workdir}"]
    if processes == 1:
        return [base]
    base += ["--multihost", f"--coordinator_address=127.0.0.1:{cli.free_port()}",
             f"--num_processes={processes}", "--heartbeat_timeout=10"]
    return [[*base, f"--process_id={i}"] for i in range(processes)]


def start(tmp_path, workdir, processes: int, steps: int = STEPS, *extra: str, devices: int = 8,
          **changes) -> list[cli.Job]:
    """The job (`arguments`, then `extra`) on `devices` devices, one cli.Job per process."""
    env = cli.environment(tmp_path / "jax_cache", devices=devices // processes)
    name = f"{workdir.name}_{steps}_{time.monotonic_ns()}"
    return [cli.Job([*args, *extra], env, tmp_path / "logs", f"{name}_{i}")
            for i, args in enumerate(arguments(tmp_path, workdir, processes, steps, **changes))]


def train(tmp_path, workdir, processes: int, steps: int = STEPS) -> list:
    """Train `workdir` to `steps` on the (1, 8, 1) mesh in 1 or 2 processes; its train losses."""
    for job in start(tmp_path, workdir, processes, steps, mesh_shape=(1, 8, 1)):
        assert job.wait(600) == 0, job.report()
    return [(r["step"], r["train/loss"]) for r in cli.metrics(workdir) if "train/loss" in r]  # process 0's


def test_two_processes_train_as_one_and_checkpoints_move_between_process_counts(tmp_path):
    """2 processes x 4 devices train the (1, 8, 1) mesh (experts 0-3 on one process, 4-7 on the
    other) as 1 process x 8 devices does (data.shards = 2: the same batches); every process writes
    its own shards; each checkpoint resumes in the other process count and both continue alike."""
    two, one = tmp_path / "two", tmp_path / "one"
    losses = {"two": train(tmp_path, two, 2), "one": train(tmp_path, one, 1)}
    assert len(list((two / "checkpoints" / str(STEPS) / "state").glob("ocdbt.process_*"))) == 2
    assert [s for s, _ in losses["two"]] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([x for _, x in losses["two"]], [x for _, x in losses["one"]], rtol=1e-5)
    # Written by both processes, restored whole in this one: every expert weight holds all 8 experts.
    arrays = cli.checkpoint_arrays(two, STEPS)
    experts = [a for name, a in arrays.items() if name.startswith("params/") and "/experts/" in name]
    assert experts and all(8 in a.shape for a in experts), {n: a.shape for n, a in arrays.items()}
    # The 2-process checkpoint resumes in 1 process, the 1-process one in 2; the continuations agree.
    after = {"two": train(tmp_path, two, 1, MORE)[STEPS:], "one": train(tmp_path, one, 2, MORE)[STEPS:]}
    assert [s for s, _ in after["two"]] == [s for s, _ in after["one"]] == list(range(STEPS + 1, MORE + 1))
    np.testing.assert_allclose([x for _, x in after["two"]], [x for _, x in after["one"]], rtol=1e-5)
    a, b = cli.checkpoint_arrays(two, MORE), cli.checkpoint_arrays(one, MORE)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_explicit_process_flags_come_together_and_need_multihost(tmp_path):
    env = cli.environment(tmp_path / "jax_cache")
    base = ["--config=configs/switch_tiny.py", f"--workdir={tmp_path / 'run'}"]
    job = cli.run([*base, "--num_processes=2"], env, tmp_path / "logs", "no_multihost", expect=None)
    assert job.proc.returncode != 0 and "need --multihost" in job.stderr, job.report()
    job = cli.run([*base, "--multihost", "--num_processes=2"], env, tmp_path / "logs", "partial", expect=None)
    assert job.proc.returncode != 0, job.report()
    assert "--coordinator_address, --process_id as well" in job.stderr, job.report()
    job = cli.run([*base, "--heartbeat_timeout=5"], env, tmp_path / "logs", "heartbeat", expect=None)
    assert job.proc.returncode != 0 and "applies to --multihost jobs only" in job.stderr, job.report()


def test_kill_9_and_preemption_of_one_process(tmp_path):
    """kill -9 of one process stops the other with an error within the heartbeat timeout; a SIGTERM to
    one makes both save the same step and exit 0; both times, restarting both resumes bit-identically."""
    steps, every = 40, 4
    whole = tmp_path / "whole"
    for job in start(tmp_path, whole, 2, steps, checkpoint_every_steps=every):
        assert job.wait(600) == 0, job.report()
    expected = cli.without_timing(cli.metrics(whole)), cli.checkpoint_arrays(whole, steps)
    killed = tmp_path / "killed"
    jobs = start(tmp_path, killed, 2, steps, checkpoint_every_steps=every)
    # killed once a checkpoint is complete and training has gone past it
    assert cli.wait_until(lambda: cli.checkpoints(killed)[0] and cli.last_logged_step(killed) > every,
                          jobs[0], poll=0.05), jobs[0].report()
    jobs[1].kill()
    began = time.monotonic()
    code = jobs[0].wait(120)  # the heartbeat timeout is 10 s
    assert code != 0 and time.monotonic() - began < 60, jobs[0].report()
    assert "another task died" in jobs[0].stderr or "unhealthy" in jobs[0].stderr, jobs[0].report()
    again = start(tmp_path, killed, 2, steps, checkpoint_every_steps=every)
    for job in again:
        assert job.wait(600) == 0, job.report()
    assert cli.resumed_from(again[0]) >= every
    assert_resumed_as(killed, steps, expected)

    preempted = tmp_path / "preempted"
    jobs = start(tmp_path, preempted, 2, steps, checkpoint_every_steps=every)
    assert cli.wait_until(lambda: cli.last_logged_step(preempted) > 2, jobs[0], poll=0.05), jobs[0].report()
    jobs[1].proc.send_signal(signal.SIGTERM)  # the notice reaches one host only
    for job in jobs:
        assert job.wait(120) == 0, job.report()
    # process 0 speaks for the job; JAX logs the step each process agreed on
    saved = re.search(r"SIGTERM: saved the checkpoint of step (\d+)", jobs[0].stderr)
    agreed = [re.search(r"Reached preemption sync point, step=(\d+)", j.stderr) for j in jobs]
    assert saved and all(a and a[1] == saved[1] for a in agreed), [j.report() for j in jobs]
    saved = int(saved[1])
    assert saved < steps and saved == max(cli.checkpoints(preempted)[0])
    again = start(tmp_path, preempted, 2, steps, checkpoint_every_steps=every)
    for job in again:
        assert job.wait(600) == 0, job.report()
    assert cli.resumed_from(again[0]) == saved
    assert_resumed_as(preempted, steps, expected)


def assert_resumed_as(workdir, steps: int, expected) -> None:
    metrics, arrays = expected
    assert cli.without_timing(cli.metrics(workdir)) == metrics
    cli.assert_same_arrays(cli.checkpoint_arrays(workdir, steps), arrays)


def test_eval_and_infer_on_the_mesh_equal_one_device(tmp_path):
    """--mode=eval and --mode=infer restore into the config's mesh (experts over 8 devices, in one
    process and in two) and give the single device's metrics and greedy continuations."""
    workdir = tmp_path / "trained"
    train(tmp_path, workdir, 1)
    prompts = ("--prompt=def fibonacci(n):", "--prompt=import os", "--max_new_tokens=6")
    outputs = {}
    for name, processes, devices, mesh in (("one device", 1, 1, (1, 1, 1)), ("8 devices", 1, 8, (1, 8, 1)),
                                           ("2 processes", 2, 8, (1, 8, 1))):
        for mode, extra in (("eval", ()), ("infer", prompts)):
            jobs = start(tmp_path, workdir, processes, STEPS, f"--mode={mode}", *extra, devices=devices,
                         mesh_shape=mesh)
            for job in jobs:
                assert job.wait(300) == 0, job.report()
            # process 0 speaks for the job; gloo's C++ threads print connection notices into the same
            # stdout, at times mid-line, so the job's lines are picked out by their form
            form = r"^[\w/]+ +\S+$" if mode == "eval" else r"^'.*' -> '.*'$"
            outputs[name, mode] = re.findall(form, jobs[0].stdout, re.M)
    metrics = {name: dict(line.split() for line in outputs[name, "eval"])
               for name in ("one device", "8 devices", "2 processes")}
    for name in ("8 devices", "2 processes"):
        assert metrics[name].keys() == metrics["one device"].keys()
        for key in ("loss", "accuracy"):
            np.testing.assert_allclose(float(metrics[name][key]), float(metrics["one device"][key]),
                                       rtol=1e-5)
        assert outputs[name, "infer"] == outputs["one device", "infer"], outputs
        assert len(outputs[name, "infer"]) == 2 and all(" -> " in line for line in outputs[name, "infer"])
