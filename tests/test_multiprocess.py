"""Two JAX processes on this machine as one job (jax.distributed with a coordinator on 127.0.0.1,
gloo collectives between the processes' CPU devices): `python -m moe_jax.main --multihost` with
explicit process flags trains an expert-parallel MoE on the 8-device mesh of both processes (each
feeds its own rows of the batch: the data axis spans the processes, the expert axis each one's 4
devices), every process writes its shards of the checkpoint, and one process restores the whole
state."""
import socket

import numpy as np

from tests.faults import cli

STEPS = 3
SMALL = {**cli.TINY_MODEL, "model.kind": "decoder", "data.objective": "lm", "model.num_decoder_layers": 1,
         "model.decoder_moe_every": 1, "model.vocab_size": 1024, "data.extra_ids": 0, "moe.num_experts": 8,
         "num_train_steps": STEPS, "eval_every_steps": STEPS, "checkpoint_every_steps": STEPS,
         "mesh_shape": (2, 4, 1), "batch_size": 8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_expert_parallel_model(tmp_path):
    env = cli.environment(tmp_path / "jax_cache", devices=4)  # 4 CPU devices per process, 8 in the job
    workdir = tmp_path / "run"
    base = ["--config=configs/switch_tiny.py", *cli.overrides({**SMALL, "data.data_dir": tmp_path / "tfds"}),
            f"--workdir={workdir}", "--multihost", f"--coordinator_address=127.0.0.1:{free_port()}",
            "--num_processes=2"]
    jobs = [cli.Job([*base, f"--process_id={i}"], env, tmp_path / "logs", f"process{i}") for i in range(2)]
    for job in jobs:
        assert job.wait(600) == 0, job.report()
    records = cli.metrics(workdir)  # written by process 0 only
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    # Written by both processes, restored whole in this one: every expert weight holds all 8 experts.
    arrays = cli.checkpoint_arrays(workdir, STEPS)
    experts = [a for name, a in arrays.items() if name.startswith("params/") and "/experts/" in name]
    assert experts and all(8 in a.shape for a in experts), {n: a.shape for n, a in arrays.items()}


def test_explicit_process_flags_come_together_and_need_multihost(tmp_path):
    env = cli.environment(tmp_path / "jax_cache")
    base = ["--config=configs/switch_tiny.py", f"--workdir={tmp_path / 'run'}"]
    job = cli.run([*base, "--num_processes=2"], env, tmp_path / "logs", "no_multihost", expect=None)
    assert job.proc.returncode != 0 and "need --multihost" in job.stderr, job.report()
    job = cli.run([*base, "--multihost", "--num_processes=2"], env, tmp_path / "logs", "partial", expect=None)
    assert job.proc.returncode != 0, job.report()
    assert "--coordinator_address, --process_id as well" in job.stderr, job.report()
