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
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter

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


class MetricsWriter:
    def __init__(self, workdir: str, *, enabled: bool, moe_every: dict[str, int]):
        self.enabled, self.moe_every = enabled, moe_every
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard")) if enabled else None

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
