"""The training loop as small hooks: each step runs the train step, then every hook in order.

    divergence   the loss and gradient norm of each step are finite (read one step late, so the
                 host does not wait for the device, except on logging and saving steps)
    lock check   no other job took this one's workdir lock over
    logging      train scalars, tokens/s and the progress bar, every log_every_steps
    evaluation   the eval split, every eval_every_steps and at the last step
    record       the step's metrics.jsonl line, before any checkpoint of that step
    checkpoint   every checkpoint_every_steps, at the last step, and on preemption (SIGTERM),
                 after the parameters are checked finite

A hook returns True to end the run after this step (only the checkpoint hook does, on a
preemption). Writing to the workdir goes through `writing`, which turns an OSError into a
WorkdirError saying what is safe. The T5X / Flax examples' trainers split the loop the same way.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np

from moe_jax.metrics import layer_stats


class Divergence(RuntimeError):
    """The loss became NaN or infinite."""


class WorkdirError(OSError):
    """The workdir cannot be written (a full disk, a read-only file system)."""


@contextlib.contextmanager
def writing(what: str, checkpointer):
    """Turn an OSError while writing `what` into a WorkdirError that says what is safe and what to do."""
    try:
        yield
    except OSError as e:
        raise WorkdirError(f"cannot write {what} ({e.strerror or e}). Free some space or make the workdir "
                           f"writable, then run again: it resumes from the latest checkpoint (step "
                           f"{checkpointer.latest_step()}), which is intact") from None


def writing_metrics(step: "Step", workdir: str, checkpointer):
    """`writing` for one step's metrics (TensorBoard events and the metrics.jsonl line)."""
    return writing(f"the metrics of step {step.number} to {workdir}", checkpointer)


@dataclasses.dataclass
class Step:
    """One finished training step, as the hooks see it."""

    number: int
    state: Any
    metrics: Any  # device arrays; `fetched` holds them on the host once read
    config: Any
    record: dict = dataclasses.field(default_factory=dict)  # this step's metrics.jsonl line
    fetched: dict | None = None

    @property
    def last(self) -> bool:
        return self.number == self.config.num_train_steps

    def every(self, period: int) -> bool:
        return self.number % period == 0 or self.last

    def host_metrics(self) -> dict:
        if self.fetched is None:
            self.fetched = jax.device_get(self.metrics)
        return self.fetched


class Hook:
    def after_step(self, step: Step) -> bool | None:
        raise NotImplementedError


@dataclasses.dataclass
class LockCheck(Hook):
    """Stop at once if another job took the workdir lock over (moe_jax.workdir_lock)."""

    lock: Any  # the WorkdirLock this process holds, or None on the processes that hold none

    def after_step(self, step: Step) -> None:
        if self.lock is not None:
            self.lock.check()


class DivergenceCheck(Hook):
    """Stop (Divergence) at the first step whose loss or gradient norm is NaN or infinite, naming the
    first MoE layer whose router statistics went bad and the checkpoint that is kept."""

    def __init__(self, checkpointer, moe_every: dict[str, int]):
        self.checkpointer, self.moe_every = checkpointer, moe_every
        self.pending: Step | None = None  # a step whose loss is not read yet

    def after_step(self, step: Step) -> None:
        self.flush()
        if step.every(step.config.log_every_steps) or step.every(step.config.checkpoint_every_steps):
            self.check(step)
        else:
            self.pending = step  # read while the next step runs

    def flush(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.check(pending)

    def check(self, step: Step) -> None:
        metrics = step.host_metrics()
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not math.isfinite(loss):
            self.diverged(step, f"the loss is {loss} at step {step.number}")
        if not math.isfinite(grad_norm):
            self.diverged(step, f"the gradient norm is {grad_norm} at step {step.number} (loss {loss})")

    def diverged(self, step: Step, what: str):
        self.checkpointer.wait()  # a save in flight completes first, so the message names the checkpoint kept
        latest = self.checkpointer.latest_step()
        where = first_bad_layer(step.host_metrics(), self.moe_every)
        kept = (f"The last good checkpoint (step {latest}) is kept in {self.checkpointer.directory}"
                if latest is not None else "No checkpoint was written yet")
        raise Divergence(f"{what}; stopping. {kept}. "
                         + (f"First router statistics to go bad: {where}." if where else
                            "Every MoE layer's router statistics are still finite."))


def first_bad_layer(metrics: dict, moe_every: dict[str, int]) -> str | None:
    """The first MoE layer (encoder before decoder) whose router statistics are not finite."""
    stats = layer_stats(metrics.get("routing", {}), moe_every)  # by stack, encoder first
    for stack in moe_every:
        for name in ("z_loss", "router_entropy", "balance_loss"):
            for stat in stats:
                if (stat.stack, stat.name) == (stack, name) and not np.all(np.isfinite(stat.value)):
                    return f"{stack} layer {stat.layer} ({name} = {stat.value})"
    return None


def mean_dropped(metrics: dict) -> float:
    """The dropped fraction averaged over every MoE layer of every stack."""
    values = [np.mean(v["dropped_fraction"]) for v in metrics.get("routing", {}).values()]
    return float(np.mean(values)) if values else 0.0


class Logging(Hook):
    """Train scalars, tokens/s (timed from the end of the first, compiling step) and the progress bar."""

    def __init__(self, writer, workdir: str, checkpointer, progress, task, summary: dict,
                 tokens_per_step: int, first: int):
        self.writer, self.workdir, self.checkpointer, self.summary = writer, workdir, checkpointer, summary
        self.progress, self.task = progress, task
        self.tokens_per_step, self.first = tokens_per_step, first
        self.window = {"time": time.perf_counter(), "steps": 0}
        self.total = {"time": 0.0, "steps": 0}

    def after_step(self, step: Step) -> None:
        if step.number == self.first:  # the first step compiles: throughput is timed from its end
            jax.block_until_ready(step.state)
            self.window.update(time=time.perf_counter(), steps=0)
        else:
            self.window["steps"] += 1
        if not step.every(step.config.log_every_steps):
            return
        elapsed = time.perf_counter() - self.window["time"]
        self.total["time"] += elapsed
        self.total["steps"] += self.window["steps"]
        steps = self.window["steps"]
        tps = self.tokens_per_step * steps / max(elapsed, 1e-9) if steps else 0.0
        metrics = step.host_metrics()
        # seconds: training time since the first (compiling) step, evaluation excluded
        with writing_metrics(step, self.workdir, self.checkpointer):
            scalars = self.writer.write(step.number, "train", metrics,
                                        extra={"tokens_per_sec": tps, "seconds": self.total["time"]},
                                        record=step.record)
        self.progress.update(self.task, info=f"loss {scalars['train/loss']:.3f} | {tps:,.0f} tok/s")
        self.summary.update({"train/loss": scalars["train/loss"], "tokens_per_sec": tps,
                             "dropped_fraction": mean_dropped(metrics)})
        self.window.update(time=time.perf_counter(), steps=0)

    def mean_tokens_per_sec(self) -> float | None:
        return (self.tokens_per_step * self.total["steps"] / self.total["time"] if self.total["steps"]
                else None)


class Evaluation(Hook):
    def __init__(self, evaluate, writer, workdir: str, checkpointer, summary: dict, console):
        self.evaluate, self.writer, self.workdir, self.checkpointer = evaluate, writer, workdir, checkpointer
        self.summary, self.console = summary, console

    def after_step(self, step: Step) -> None:
        if not step.every(step.config.eval_every_steps):
            return
        ev = self.evaluate(step.state)
        with writing_metrics(step, self.workdir, self.checkpointer):
            scalars = self.writer.write(step.number, "eval", ev, record=step.record)
        self.summary["eval/loss"] = scalars["eval/loss"]
        self.console.print(f"step {step.number}: eval loss {scalars['eval/loss']:.4f}, "
                           f"accuracy {scalars['eval/accuracy']:.3f}")


class Record(Hook):
    """The step's metrics.jsonl line, written before its checkpoint: a checkpoint implies its record."""

    def __init__(self, writer, workdir: str, checkpointer):
        self.writer, self.workdir, self.checkpointer = writer, workdir, checkpointer

    def after_step(self, step: Step) -> None:
        with writing_metrics(step, self.workdir, self.checkpointer):
            self.writer.end_step(step.number, step.record)


class Checkpoint(Hook):
    """Save on schedule, at the last step and on preemption; ends the run after a preemption's save."""

    def __init__(self, checkpointer, divergence: DivergenceCheck, params_finite, data_state, stop):
        self.checkpointer, self.divergence = checkpointer, divergence
        self.params_finite, self.data_state, self.stop = params_finite, data_state, stop

    def after_step(self, step: Step) -> bool:
        # Read once: a SIGTERM that comes after this is handled after the next step, never
        # acknowledged without its checkpoint (it may come during the evaluation).
        preempted = self.stop.after(step.number)
        if step.every(step.config.checkpoint_every_steps) or preempted:
            self.divergence.flush()  # this step's loss, if not read yet
            if not self.params_finite(step.state.params):
                loss = float(step.host_metrics()["loss"])
                self.divergence.diverged(step, f"the parameters after step {step.number} are not finite "
                                               f"(its loss {loss} is): the update overflowed")
            self.checkpointer.save(step.number, step.state, self.data_state(), step.config)
        return preempted
