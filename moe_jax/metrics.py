"""Metrics of a run: TensorBoard event files and metrics.jsonl in the workdir.

metrics.jsonl has one JSON object per logged step: 'step', 'train/loss' and the other training
scalars, and 'eval/loss' (with eval/neg_log_perplexity, eval/accuracy) when that step was
evaluated. Routing statistics come per MoE layer: 'moe/<stack>/layer<i>/<statistic>', where i
is the layer's index in its stack; per-expert loads go to TensorBoard as histograms. Only
process 0 writes.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog

PER_EXPERT = ("tokens_per_expert", "routed_per_expert")


def layer_metrics(metrics: dict[str, Any], moe_every: dict[str, int]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Split '<stack>/<stat>' arrays with a leading [units] axis into per-layer scalars and per-expert arrays."""
    scalars, per_expert = {}, {}
    for key, value in metrics.items():
        stack, _, name = key.partition("/")
        value = np.asarray(value)
        if stack not in moe_every or not name:
            scalars[key] = float(value)
            continue
        period = moe_every[stack]
        for unit, row in enumerate(value):
            prefix = f"moe/{stack}/layer{unit * period + period - 1}"
            if name in PER_EXPERT:
                per_expert[f"{prefix}/{name}"] = row
                if name == "tokens_per_expert":  # load after capacity (max_mean_load is before)
                    scalars[f"{prefix}/max_mean_kept_load"] = float(row.max() / max(row.mean(), 1e-9))
            elif row.ndim == 0:
                scalars[f"{prefix}/{name}"] = float(row)
            else:  # per choice rank
                scalars.update({f"{prefix}/{name}/{r}": float(v) for r, v in enumerate(row)})
    return scalars, per_expert


class _EventFile:
    """A TensorBoard event file written synchronously, so that a failed write (a full disk) raises
    OSError in the training loop. (tensorboardX's SummaryWriter writes from a thread that dies on such
    an error, after which the next writes block forever on its full queue: the job hung.) One file per
    process: a restarted run never truncates the file of the run before it."""

    def __init__(self, directory: str, purge_step: int | None):
        os.makedirs(directory, exist_ok=True)
        self._writer = EventsWriter(os.path.join(directory, "events"), filename_suffix=f".{os.getpid()}")
        if purge_step is not None:  # TensorBoard drops earlier runs' events after this step (a resumed run)
            self._writer.write_event(Event(step=purge_step, wall_time=time.time(),
                                           session_log=SessionLog(status=SessionLog.START)))

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self._writer.write_event(Event(step=step, wall_time=time.time(), summary=tb_summary.scalar(name, value)))

    def add_histogram_raw(self, name: str, *, global_step: int, **histogram) -> None:
        self._writer.write_event(Event(step=global_step, wall_time=time.time(),
                                       summary=tb_summary.histogram_raw(name, **histogram)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsWriter:
    def __init__(self, workdir: str, *, enabled: bool, moe_every: dict[str, int], purge_step: int | None = None):
        """purge_step: the step a resumed run restarts from (TensorBoard then shows its records after it)."""
        self.enabled, self.moe_every = enabled, moe_every
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = _EventFile(os.path.join(workdir, "tensorboard"), purge_step) if enabled else None

    def write(self, step: int, prefix: str, metrics: dict[str, Any], *, extra: dict[str, float] | None = None,
              record: dict | None = None) -> dict[str, float]:
        """Log metrics under prefix ('train' or 'eval'); returns the scalars written.

        record: a dict collecting this step's metrics.jsonl object (flushed by end_step)."""
        scalars, per_expert = layer_metrics(metrics, self.moe_every)
        scalars = {f"{prefix}/{k}": v for k, v in {**scalars, **(extra or {})}.items()}
        if self.enabled:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
            for name, row in per_expert.items():  # x: expert index, count: its tokens
                experts = np.arange(len(row))
                self.tb.add_histogram_raw(f"{prefix}/{name}", min=0, max=len(row) - 1, num=float(row.sum()),
                                          sum=float((experts * row).sum()), sum_squares=float((experts ** 2 * row).sum()),
                                          bucket_limits=(experts + 0.5).tolist(), bucket_counts=row.tolist(),
                                          global_step=step)
        if record is not None:
            record.update(scalars)
        return scalars

    def end_step(self, step: int, record: dict) -> None:
        if self.enabled and record:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
