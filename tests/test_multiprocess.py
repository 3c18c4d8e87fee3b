"""Two JAX processes on this machine as one job (jax.distributed with a coordinator on 127.0.0.1,
gloo collectives between the processes' CPU devices): `python -m moe_jax.main --multihost` with
explicit process flags trains an expert-parallel MoE on the 8-device mesh of both processes (each
feeds its own rows of the batch: the data axis spans the processes, the expert axis each one's 4
devices), with the losses of one process of 8 devices on the same batches (data.shards); every
process writes its shards of the checkpoint, and a checkpoint of either process count resumes in the
other."""
import socket

import numpy as np

from tests.faults import cli

STEPS, MORE = 3, 5
SMALL = {**cli.TINY_MODEL, "model.kind": "decoder", "data.objective": "lm", "model.num_decoder_layers": 1,
         "model.decoder_moe_every": 1, "model.vocab_size": 1024, "data.extra_ids": 0, "moe.num_experts": 8,
         "num_train_steps": STEPS, "eval_every_steps": STEPS, "checkpoint_every_steps": STEPS,
         "mesh_shape": (2, 4, 1), "batch_size": 8, "data.shards": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(tmp_path, workdir, processes: int, steps: int = STEPS) -> list:
    """Train `workdir` to `steps` with the job's 8 devices in 1 or 2 processes; its train losses."""
    values = {**SMALL, "data.data_dir": tmp_path / "tfds", "num_train_steps": steps}
    base = ["--config=configs/switch_tiny.py", *cli.overrides(values), f"--workdir={workdir}"]
    env = cli.environment(tmp_path / "jax_cache", devices=8 // processes)
    if processes == 1:
        cli.run(base, env, tmp_path / "logs", f"{workdir.name}_{steps}")
    else:
        base += ["--multihost", f"--coordinator_address=127.0.0.1:{free_port()}",
                 f"--num_processes={processes}"]
        jobs = [cli.Job([*base, f"--process_id={i}"], env, tmp_path / "logs", f"{workdir.name}_{steps}_{i}")
                for i in range(processes)]
        for job in jobs:
            assert job.wait(600) == 0, job.report()
    return [(r["step"], r["train/loss"]) for r in cli.metrics(workdir) if "train/loss" in r]  # process 0's


def test_two_processes_train_as_one_and_checkpoints_move_between_process_counts(tmp_path):
    """2 processes x 4 devices train the (2, 4, 1) mesh as 1 process x 8 devices does (data.shards = 2:
    the same batches); each checkpoint resumes in the other process count and both continue alike."""
    two, one = tmp_path / "two", tmp_path / "one"
    losses = {"two": train(tmp_path, two, 2), "one": train(tmp_path, one, 1)}
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
