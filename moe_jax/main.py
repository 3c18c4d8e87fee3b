"""The main job: train, evaluate or sample from one experiment config.

    python -m moe_jax.main --config=configs/switch_tiny.py --workdir=/tmp/switch_tiny
    python -m moe_jax.main --config=configs/switch_tiny.py --workdir=/tmp/switch_tiny --mode=infer \\
        --prompt="def fibonacci(n):"

Any config field can be overridden: --config.moe.num_experts=16. Training resumes from the
latest checkpoint in the workdir; SIGTERM (a Cloud TPU preemption) saves a checkpoint and exits 0.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from moe_jax import accounting, configuration, data, paths, preemption, train_loop, upcycle, workdir_lock
from moe_jax.checkpoints import CheckpointError, Checkpointer
from moe_jax.metrics import MetricsWriter, layer_metrics, row_scalars
from moe_jax.train_loop import Divergence, writing
from moe_jax.trainer import Trainer, summarize_eval

MODES = ("train", "eval", "infer")
_FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<experiment>.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and metrics.jsonl.")
flags.DEFINE_enum("mode", "train", MODES, "train (and evaluate), eval (the latest checkpoint), or infer.")
flags.DEFINE_multi_string("prompt", [], "infer: a prompt to continue (repeat the flag for several).")
flags.DEFINE_integer("max_new_tokens", 32, "infer: tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "infer: sampling temperature; 0 is greedy.")
flags.DEFINE_float("top_p", 1.0, "infer: nucleus sampling mass.")
flags.DEFINE_bool("multihost", False, "Run on every worker of a multi-host slice: call "
                  "jax.distributed.initialize() first (on Cloud TPU and under SLURM it finds the coordinator "
                  "and the other hosts itself; elsewhere give the three flags below).")
flags.DEFINE_string("coordinator_address", None, "--multihost: host:port of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "--multihost: how many processes form the job.")
flags.DEFINE_integer("process_id", None, "--multihost: this process's index, 0 .. num_processes - 1.")
flags.DEFINE_integer("heartbeat_timeout", 100, "--multihost: seconds without a heartbeat from a process "
                     "after which the others stop with an error instead of waiting for it (JAX's default).",
                     lower_bound=1)
flags.DEFINE_float("lock_timeout", 60.0, "train: seconds after its last heartbeat at which the workdir "
                   "lock of another job is taken as left by a dead job and taken over.", lower_bound=1.0)

console = Console(stderr=True)


class Run:
    """Everything a mode needs, built and checked before anything compiles."""

    def __init__(self, config, workdir: str, hold=None):
        """`hold`: takes the workdir's lock for a training job, once the config passed every check and
        before anything touches the workdir; returns the lock this process holds (or None)."""
        self.config, self.workdir = config, workdir
        self.model_cfg = configuration.validate(config)
        self.trainer = Trainer(config, self.model_cfg)  # the mesh's checks too, before the slow tokenizer
        self.tokenizer = data.get_tokenizer(config)  # (and the dataset's)
        self.lock = hold() if hold is not None else None
        self.checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
        self.checkpointer.check_compatible(config)
        self.moe_every = self.model_cfg.family.moe_every(self.model_cfg)
        self.is_writer = jax.process_index() == 0
        self.params_finite = jax.jit(lambda params: jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])))

    def restore_or_init(self):
        """(state, data iterator state or None, step) from the latest checkpoint, or fresh."""
        step = self.checkpointer.latest_step()
        if step is None:
            state = self.trainer.create_state(self.config.seed)
            if self.config.init_from:
                state, line = upcycle.initialise(state, self.config, self.model_cfg, self.trainer,
                                                 self.tokenizer.path)
                console.print(line, soft_wrap=True)
            return state, None, 0
        if self.config.init_from:
            console.print(f"the workdir has a checkpoint (step {step}): config.init_from is not read again",
                          soft_wrap=True)
        # Restored straight into this run's shards, whatever mesh wrote the checkpoint.
        state, data_state = self.checkpointer.restore(step, self.trainer.abstract_sharded_state())
        return state, data_state, step

    def evaluate(self, state, eval_fn) -> dict:
        sums, n = None, 0
        for batch in data.eval_batches(self.config, self.tokenizer, process_index=jax.process_index(),
                                       process_count=jax.process_count()):
            out = jax.device_get(eval_fn(state, self.trainer.shard_batch(batch)))
            sums = out if sums is None else jax.tree.map(np.add, sums, out)
            n += 1
        return jax.tree.map(np.asarray, summarize_eval(sums, n))


def train(config, workdir: str) -> dict:
    """Train (and periodically evaluate) to config.num_train_steps; returns the closing summary."""
    # Listening before anything slow: a preemption while the run starts (restoring, compiling) ends it
    # cleanly too.
    with preemption.Preemption(multihost=_FLAGS.multihost) as stop, contextlib.ExitStack() as held:
        return _train(Run(config, workdir, hold=lambda: held.enter_context(holding(workdir))), stop)


@contextlib.contextmanager
def holding(workdir: str):
    """The workdir's one-job lock, held by process 0 for the job; every process learns whether it was
    taken, so that a refused job stops on all hosts at once. Yields the lock (None on other processes)."""
    holder = jax.process_index() == 0
    lock = workdir_lock.WorkdirLock(workdir, timeout=_FLAGS.lock_timeout) if holder else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except workdir_lock.WorkdirLocked as e:
            error = e
        except OSError as e:
            error = train_loop.WorkdirError(
                f"cannot write the workdir lock {lock.path} ({e.strerror or e}). Free some space or make the "
                "workdir writable, then run again: nothing in it was changed")
    if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(np.int32(error is None)):
        error = error or workdir_lock.WorkdirLocked(
            f"the workdir {workdir} could not be locked for this job (another job holds it, or it cannot be "
            "written): process 0's error names it")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _hooks(run: Run, writer, progress, task, summary: dict, eval_fn, train_iter, stop: preemption.Preemption,
           first: int) -> list:
    """What runs after each training step, in order (moe_jax.train_loop)."""
    config, workdir, checkpointer = run.config, run.workdir, run.checkpointer
    divergence = train_loop.DivergenceCheck(checkpointer, run.moe_every)
    # token positions per step, both stacks, padding included
    tokens = config.batch_size * sum(accounting.sequence_lengths(config))
    return [divergence, train_loop.LockCheck(run.lock),
            train_loop.Logging(writer, workdir, checkpointer, progress, task, summary, tokens, first=first),
            train_loop.Evaluation(lambda state: run.evaluate(state, eval_fn), writer, workdir, checkpointer,
                                  summary, console),
            train_loop.Record(writer, workdir, checkpointer),
            train_loop.Checkpoint(checkpointer, divergence, run.params_finite, train_iter.get_state, stop)]


def _train(run: Run, stop: preemption.Preemption) -> dict:
    config, workdir = run.config, run.workdir
    state, data_state, start = run.restore_or_init()
    train_iter = data.train_iterator(config, run.tokenizer, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    if data_state is not None:
        train_iter.set_state(data_state)
    step_fn, eval_fn = run.trainer.jit_train_step(), run.trainer.jit_eval_step()
    with writing(f"the metrics to {workdir}", run.checkpointer):
        writer = MetricsWriter(workdir, enabled=run.is_writer, moe_every=run.moe_every,
                               purge_step=start or None)
        if run.is_writer:
            _truncate_metrics(writer.path, start)
    summary = {"start_step": start, "final_step": start}
    if start:
        console.print(f"resuming from the checkpoint of step {start} in {run.checkpointer.directory}")
    try:
        with Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                      disable=not run.is_writer) as progress:
            task = progress.add_task("train", total=config.num_train_steps, completed=start, info="")
            hooks = _hooks(run, writer, progress, task, summary, eval_fn, train_iter, stop, first=start + 1)
            for number in range(start + 1, config.num_train_steps + 1):
                if number == start + 1 and stop.before_start():
                    console.print("SIGTERM before the first step: nothing new to save; exiting")
                    break
                local = next(train_iter)  # this host's rows of the global batch
                state, metrics = step_fn(state, run.trainer.shard_batch(local))
                step = train_loop.Step(number, state, metrics, config)
                stopping = [hook.after_step(step) for hook in hooks]
                progress.update(task, completed=number)
                summary["final_step"] = number
                if any(stopping):
                    console.print(f"SIGTERM: saved the checkpoint of step {number}; exiting")
                    break
        run.checkpointer.wait()
    finally:
        run.checkpointer.close()
        # each step's records were flushed at that step, or the error raised
        with contextlib.suppress(OSError):
            writer.close()
    mean_tps = next(h for h in hooks if isinstance(h, train_loop.Logging)).mean_tokens_per_sec()
    if mean_tps is not None:
        summary["tokens_per_sec_mean"] = mean_tps
    summary["preempted"] = stop.noticed
    return summary


def _truncate_metrics(path: epath.Path, step: int) -> None:
    """Drop the metrics.jsonl records after `step` (the step resumed from), and a line cut short by a
    kill: the resumed run writes them again, so the file holds each step once, as an uninterrupted
    run's does."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a partial line
    if keep != lines:
        paths.write_atomically(path, "".join(keep))


def evaluate_only(config, workdir: str) -> dict:
    run = Run(config, workdir)
    step = run.checkpointer.latest_step()
    if step is None:
        raise configuration.ConfigError(f"--mode=eval needs a checkpoint in {workdir}: train first")
    state, _, _ = run.restore_or_init()
    result = run.evaluate(state, run.trainer.jit_eval_step())
    run.checkpointer.close()
    scalars, rows, _ = layer_metrics(result, run.moe_every)
    return {"step": step, **scalars, **row_scalars("", rows)}


def infer(config, workdir: str, prompts: list[str], *, max_new_tokens: int, temperature: float,
          top_p: float) -> list[str]:
    """Continuations of the prompts from the latest checkpoint's model."""
    if not prompts:
        raise configuration.ConfigError("--mode=infer needs at least one --prompt")
    run = Run(config, workdir)
    if run.checkpointer.latest_step() is None:
        raise configuration.ConfigError(f"--mode=infer needs a checkpoint in {workdir}: train first")
    state, _, _ = run.restore_or_init()  # in its shards on the mesh
    run.checkpointer.close()
    tok = run.tokenizer
    # An encoder-decoder trained on span corruption fills the prompt's <extra_id_N> spans.
    encoded = [tok.encode(p, sentinels=True) for p in prompts]
    rows, valid = run.model_cfg.family.prompt_rows(encoded, tok.eos_id)
    decode = run.trainer.jit_generate(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    out = decode(state.params, state.rest, np.asarray(rows, np.int32), np.asarray(valid, bool),
                 jax.random.PRNGKey(config.seed))
    texts = []
    for row in np.asarray(out).tolist():
        if tok.eos_id in row:
            row = row[:row.index(tok.eos_id)]
        texts.append(tok.decode(row))
    return texts


def _distributed_flags() -> dict:
    """The explicit process flags given (all three or none), for jax.distributed.initialize."""
    explicit = {"coordinator_address": _FLAGS.coordinator_address, "num_processes": _FLAGS.num_processes,
                "process_id": _FLAGS.process_id}
    given = {k: v for k, v in explicit.items() if v is not None}
    if given and not _FLAGS.multihost:
        raise app.UsageError("--coordinator_address, --num_processes and --process_id need --multihost")
    if _FLAGS["heartbeat_timeout"].present and not _FLAGS.multihost:
        raise app.UsageError("--heartbeat_timeout applies to --multihost jobs only")
    if given and len(given) < len(explicit):
        missing = ", ".join(f"--{k}" for k in explicit if k not in given)
        raise app.UsageError(f"--multihost with explicit processes needs {missing} as well")
    return given


def _initialize_distributed(given: dict) -> None:
    """jax.distributed.initialize, detected (Cloud TPU, SLURM) or from the explicit flags. CPU processes
    exchange collectives over gloo, XLA:CPU's cross-process transport (the setting is CPU-only)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**given, heartbeat_timeout_seconds=_FLAGS.heartbeat_timeout)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _FLAGS.config is None or not _FLAGS.workdir:
        raise app.UsageError("--config=configs/<experiment>.py and --workdir=<dir> are required")
    config = _FLAGS.config
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_without_library_tracebacks)
    sys.unraisablehook = _without_closed_loop_tracebacks
    if _FLAGS["lock_timeout"].present and _FLAGS.mode != "train":
        raise app.UsageError("--lock_timeout applies to --mode=train only (eval and infer take no lock)")
    processes = _distributed_flags()
    if _FLAGS.multihost:
        _initialize_distributed(processes)
    console.quiet = jax.process_index() != 0  # one host speaks for the job
    if _FLAGS.mode == "train":
        summary = train(config, _FLAGS.workdir)
        print_summary(summary)
    elif _FLAGS.mode == "eval":
        for k, v in evaluate_only(config, _FLAGS.workdir).items():
            print(f"{k:24s} {v}")
    else:
        texts = infer(config, _FLAGS.workdir, _FLAGS.prompt, max_new_tokens=_FLAGS.max_new_tokens,
                      temperature=_FLAGS.temperature, top_p=_FLAGS.top_p)
        for prompt, text in zip(_FLAGS.prompt, texts):
            print(f"{prompt!r} -> {text!r}")


def print_summary(summary: dict) -> None:
    print(f"done: step {summary['final_step']}"
          + (" (preempted: SIGTERM)" if summary.get("preempted") else ""))
    for key in ("train/loss", "eval/loss", "tokens_per_sec_mean", "dropped_fraction"):
        if key in summary:
            print(f"  {key:22s} {summary[key]:.4f}" if isinstance(summary[key], float)
                  else f"  {key} {summary[key]}")


def _without_library_tracebacks(record) -> bool:
    """A logging filter: Orbax logs each failure of its background threads with a stack trace before
    the failed save reaches us as a CheckpointError; keep the one-line messages, drop the traces."""
    if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
        record.exc_info = record.exc_text = None
    return True


def _without_closed_loop_tracebacks(unraisable) -> None:
    """sys.unraisablehook: after a failed save (a full disk) tensorstore reports the end of the writes
    Orbax abandoned by calling into Orbax's closed asyncio loop, and prints the RuntimeError's stack
    trace; the failure itself reaches the user as a CheckpointError. Anything else is printed as usual."""
    if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag value an `error: ...` line instead of absl's FATAL."""
    try:
        return _FLAGS(argv)
    except flags.Error as e:
        raise configuration.ConfigError(f"{e} (see --helpshort)") from None


def run() -> None:
    """Console-script entry point (`moe_jax`)."""
    try:
        # The config file and every --config.<field> override, checked before absl parses them:
        # a broken file, an unknown field or a mistyped value is a one-line error, not a traceback.
        configuration.check_command_line(sys.argv)
        app.run(main, flags_parser=_parse_flags)
    except CheckpointError as e:
        # After a failed asynchronous save (a full disk, a read-only workdir) Orbax's helper threads
        # can wait minutes for signals that never come: say what happened and leave at once (the
        # metrics and the earlier checkpoints are on disk already).
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    except (ValueError, Divergence, OSError, workdir_lock.WorkdirLocked) as e:  # ConfigError is a ValueError
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run()
