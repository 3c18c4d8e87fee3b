"""Metrics of a run: TensorBoard event files and metrics.jsonl in the workdir.

metrics.jsonl has one JSON object per logged step: 'step', 'train/loss' and the other training
scalars, and 'eval/loss' (with eval/neg_log_perplexity, eval/accuracy) when that step was
evaluated, and '<train|eval>/routing': one record per MoE layer, {'stack', 'layer' (its index in
the stack), statistic: value, ...}. TensorBoard shows the same statistics as
'<train|eval>/moe/<stack>/layer<i>/<statistic>' and per-expert loads as histograms. Only process 0
writes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np
from etils import epath
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog

from moe_jax import paths

PER_EXPERT = ("tokens_per_expert", "routed_per_expert")


@dataclasses.dataclass(frozen=True)
class LayerStat:
    """One routing statistic of one MoE layer."""

    stack: str  # 'encoder' or 'decoder'
    layer: int  # the layer's index in its stack
    name: str
    value: np.ndarray  # [] scalar, [E] per expert or [K] per choice rank

    @property
    def key(self) -> str:
        return f"{layer_name(self.stack, self.layer)}/{self.name}"


def layer_name(stack: str, layer: int) -> str:
    """The name MoE layer `layer` of `stack` is logged under: 'moe/<stack>/layer<i>'."""
    return f"moe/{stack}/layer{layer}"


def layer_stats(routing: dict[str, dict[str, Any]], moe_every: dict[str, int]) -> list[LayerStat]:
    """{stack: {statistic: [units, ...]}} (the step's 'routing' metrics) -> one record per layer and
    statistic, by stack, statistic and layer; the MoE layer of unit u is layer u * period + period - 1."""
    out = []
    for stack in (s for s in moe_every if s in routing):  # encoder first (jit returns dicts key-sorted)
        period, stats = moe_every[stack], routing[stack]
        for name, value in stats.items():
            out += [LayerStat(stack, unit * period + period - 1, name, np.asarray(row))
                    for unit, row in enumerate(np.asarray(value))]
    return out


def routing_rows(stats: list[LayerStat]) -> list[dict]:
    """metrics.jsonl's per-layer routing records: {'stack', 'layer', statistic: value, ...}; per-expert
    loads stay in TensorBoard, per-rank fractions become lists."""
    rows: dict[tuple[str, int], dict] = {}
    for stat in stats:
        row = rows.setdefault((stat.stack, stat.layer), {"stack": stat.stack, "layer": stat.layer})
        if stat.name == "tokens_per_expert":  # load after capacity (max_mean_load is before)
            row["max_mean_kept_load"] = float(stat.value.max() / max(stat.value.mean(), 1e-9))
        elif stat.name not in PER_EXPERT:
            row[stat.name] = float(stat.value) if stat.value.ndim == 0 else stat.value.tolist()
    return list(rows.values())


def layer_metrics(metrics: dict[str, Any], moe_every: dict[str, int]
                  ) -> tuple[dict[str, float], list[dict], dict[str, np.ndarray]]:
    """A step's metrics -> (plain scalars, per-layer routing rows, TensorBoard arrays by name)."""
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items() if k != "routing"}
    stats = layer_stats(metrics.get("routing", {}), moe_every)
    rows = routing_rows(stats)
    per_expert = {stat.key: stat.value for stat in stats if stat.name in PER_EXPERT}
    return scalars, rows, per_expert


class _EventFile:
    """A TensorBoard event file written synchronously, so that a failed write (a full disk) raises
    OSError in the training loop. (tensorboardX's SummaryWriter writes from a thread that dies on such
    an error, after which the next writes block forever on its full queue: the job hung.) One file per
    process: a restarted run never truncates the file of the run before it."""

    def __init__(self, directory: epath.Path, purge_step: int | None):
        directory.mkdir(parents=True, exist_ok=True)
        # tensorboardX writes gs:// URLs with google-cloud-storage (STORAGE_EMULATOR_HOST points it elsewhere)
        self._writer = EventsWriter(os.fspath(directory / "events"), filename_suffix=f".{os.getpid()}")
        if purge_step is not None:  # TensorBoard drops earlier runs' events after this step (a resumed run)
            self._writer.write_event(Event(step=purge_step, wall_time=time.time(),
                                           session_log=SessionLog(status=SessionLog.START)))

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self._writer.write_event(Event(step=step, wall_time=time.time(),
                                       summary=tb_summary.scalar(name, value)))

    def add_histogram_raw(self, name: str, *, global_step: int, **histogram) -> None:
        self._writer.write_event(Event(step=global_step, wall_time=time.time(),
                                       summary=tb_summary.histogram_raw(name, **histogram)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def row_scalars(prefix: str, rows: list[dict]) -> dict[str, float]:
    """TensorBoard names of the per-layer routing rows:
    '<prefix>/moe/<stack>/layer<i>/<statistic>[/<rank>]'."""
    out = {}
    for row in rows:
        base = f"{prefix}/" * bool(prefix) + layer_name(row["stack"], row["layer"])
        for name, value in row.items():
            if name in ("stack", "layer"):
                continue
            if isinstance(value, list):
                out.update({f"{base}/{name}/{r}": v for r, v in enumerate(value)})
            else:
                out[f"{base}/{name}"] = value
    return out


class MetricsWriter:
    def __init__(self, workdir: str | epath.Path, *, enabled: bool, moe_every: dict[str, int],
                 purge_step: int | None = None):
        """purge_step: the step a resumed run restarts from (TensorBoard then shows its records after it)."""
        self.enabled, self.moe_every = enabled, moe_every
        workdir = paths.resolve(workdir)
        self.path = workdir / "metrics.jsonl"
        self._lines = paths.LineAppender(self.path)
        self.tb = _EventFile(workdir / "tensorboard", purge_step) if enabled else None

    def write(self, step: int, prefix: str, metrics: dict[str, Any], *, extra: dict[str, float] | None = None,
              record: dict | None = None) -> dict[str, float]:
        """Log metrics under prefix ('train' or 'eval'); returns the scalars written.

        record: a dict collecting this step's metrics.jsonl object (flushed by end_step)."""
        scalars, rows, per_expert = layer_metrics(metrics, self.moe_every)
        scalars = {f"{prefix}/{k}": v for k, v in {**scalars, **(extra or {})}.items()}
        if self.enabled:
            for name, value in {**scalars, **row_scalars(prefix, rows)}.items():
                self.tb.add_scalar(name, value, step)
            for name, row in per_expert.items():  # x: expert index, count: its tokens
                experts = np.arange(len(row))
                self.tb.add_histogram_raw(f"{prefix}/{name}", min=0, max=len(row) - 1, num=float(row.sum()),
                                          sum=float((experts * row).sum()),
                                          sum_squares=float((experts ** 2 * row).sum()),
                                          bucket_limits=(experts + 0.5).tolist(), bucket_counts=row.tolist(),
                                          global_step=step)
        if record is not None:
            record.update(scalars)
            if rows:
                record[f"{prefix}/routing"] = rows
        return scalars

    def end_step(self, step: int, record: dict) -> None:
        if self.enabled and record:
            self._lines.append(json.dumps({"step": step, **record}) + "\n")
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
