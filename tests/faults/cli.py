"""Running the main job as a user does, `python -m moe_jax.main ...` in a subprocess, and reading
back what it leaves in the workdir: for tests/test_cli.py and the fault suite (tests/faults).

Subprocesses share a persistent JAX compilation cache (one directory per test session), so a
restarted run loads its programs instead of compiling them again.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from etils import epath

from moe_jax import paths

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Wall-clock fields of metrics.jsonl: they differ between any two runs.
TIMING_KEYS = ("train/tokens_per_sec", "train/seconds")
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# configs/switch_tiny.py shrunk to train in seconds (d_model 32, 4 x 32 tokens a step, a 30-file
# corpus with a 1000-piece vocabulary): the suites add the model kind and the schedule.
TINY_MODEL = {
    "model.d_model": 32, "model.d_ff": 64, "moe.d_ff": 64, "model.num_heads": 2, "model.head_dim": 16,
    "data.spm_vocab_size": 1000, "data.corpus_max_files": 30, "batch_size": 4, "seq_len": 32,
    "warmup_steps": 2, "log_every_steps": 1, "num_eval_steps": 2,
}


def environment(cache_dir: os.PathLike, devices: int | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess: CPU, fast compiles, the shared compilation cache and,
    with `devices`, that many emulated CPU devices."""
    env = dict(os.environ)
    xla = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    if "xla_backend_optimization_level" not in xla:
        xla += " " + FAST_COMPILE
    if devices:
        xla += f" --xla_force_host_platform_device_count={devices}"
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla.strip(), JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    return env


def overrides(values: dict) -> list[str]:
    """--config.<field>=<value> arguments."""
    return [f"--config.{k}={v}" for k, v in values.items()]


class Job:
    """One run of the main job in its own process; stdout and stderr go to files in log_dir.

    By default `python -m moe_jax.main ARGS` in a subprocess with `env`. With a `forkserver`
    (see Forkserver), the process is forked from one that has imported moe_jax already and runs
    `moe_jax.main.run()` with sys.argv set: the same entry point, without 3 s of imports."""

    def __init__(self, args: list[str], env: dict, log_dir: os.PathLike, name: str, *,
                 forkserver: "Forkserver | None" = None):
        log_dir = pathlib.Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.name, self.args = name, args
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        if forkserver is not None:
            self.proc = forkserver.start(args, self.out_path, self.err_path)
        else:
            with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
                self.proc = subprocess.Popen([sys.executable, "-m", "moe_jax.main", *args], cwd=ROOT, env=env,
                                             stdout=out, stderr=err, start_new_session=True)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not finish in {timeout} s:\n{self.report()}") from None

    def kill(self) -> None:
        """kill -9 this process (only this one: the job runs in its own session)."""
        if self.running():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]

    def report(self) -> str:
        return (f"$ python -m moe_jax.main {' '.join(self.args)}\n(exit {self.proc.returncode})\n"
                f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-6000:]}")


class _Forked:
    """A forked process behind Popen's poll / wait / returncode / pid."""

    def __init__(self, process):
        self._process = process
        self.pid = process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired("moe_jax.main", timeout)
        return self._process.exitcode


def _forked_main(args: list[str], out_path: str, err_path: str) -> None:
    os.setsid()  # its own session, like the subprocesses
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(ROOT)
    sys.argv = [str(ROOT / "moe_jax" / "main.py"), *args]
    from moe_jax import main  # noqa: PLC0415 (imported already in the forkserver)

    main.run()


class Forkserver:
    """Starts jobs by forking a server process that imported moe_jax.main once (multiprocessing's
    forkserver). The server, so every job, has the environment `env`; one per test process."""

    def __init__(self, env: dict):
        import multiprocessing  # noqa: PLC0415
        from multiprocessing import forkserver  # noqa: PLC0415

        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["moe_jax.main"])
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def start(self, args: list[str], out_path, err_path) -> _Forked:
        process = self.context.Process(target=_forked_main, args=(list(args), str(out_path), str(err_path)),
                                       name="moe_jax.main")
        process.start()
        return _Forked(process)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a coordinator or an emulator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], env: dict, log_dir: os.PathLike, name: str, *, timeout: float = 600,
        expect: int | None = 0, **kwargs) -> Job:
    """Run the main job to its end; with `expect`, assert its exit status."""
    job = Job(args, env, log_dir, name, **kwargs)
    code = job.wait(timeout)
    if expect is not None:
        assert code == expect, job.report()
    return job


def wait_until(condition, job: Job | None = None, timeout: float = 300, poll: float = 0.002) -> bool:
    """Poll `condition()` until it holds (True) or the job has exited / the time is up (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if job is not None and not job.running():
            return condition()
        time.sleep(poll)
    return False


# ---------------------------------------------------------------- the workdir

def metrics(workdir: os.PathLike) -> list[dict]:
    """metrics.jsonl's records (a line cut short at the end is skipped, as a resumed run drops it)."""
    path = epath.Path(workdir) / "metrics.jsonl"  # a local directory or a gs:// URL
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return records


def last_logged_step(workdir: os.PathLike) -> int:
    records = metrics(workdir)
    return records[-1]["step"] if records else 0


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def checkpoints(workdir: os.PathLike) -> tuple[list[int], list[str]]:
    """(complete checkpoint steps, sorted; names of the other entries: partial writes)."""
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return [], []
    names = os.listdir(directory)
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if not n.isdigit())


def flat_arrays(tree) -> dict[str, np.ndarray]:
    """{'params/decoder/...': array} of a train state, whether a TrainState or the nested dicts and
    lists a checkpoint reads back as; PRNG keys as their data."""
    import jax  # noqa: PLC0415

    def name(entry) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                return str(getattr(entry, attribute))
        return str(entry)

    def value(x):
        if jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))

    return {"/".join(name(e) for e in path): value(x)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def checkpoint_arrays(workdir: os.PathLike, step: int) -> dict[str, np.ndarray]:
    """Every array of the train state in a checkpoint (parameters, optimiser state, RNG state), by path."""
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    path = paths.resolve(workdir) / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    # Onto this process's first device, whatever mesh and processes wrote it.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          checkpointer.metadata(path).item_metadata)
    return flat_arrays(checkpointer.restore(path, target))


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Bit for bit: same names, dtypes, shapes and bytes."""
    assert a.keys() == b.keys()
    different = [k for k in a
                 if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]
    assert not different, f"{len(different)} of {len(a)} arrays differ, e.g. {different[:5]}"


def resumed_from(job: Job) -> int:
    """The step a run resumed from (0: it started fresh)."""
    match = re.search(r"resuming from the checkpoint of step (\d+)", job.stderr)
    return int(match.group(1)) if match else 0
