"""Run a family of moe_jax configs, one `python -m moe_jax.main` process per run, and keep what
each run measured in a small JSON file that the reports and the results notebook read.

    experiments/results/<experiment>/runs/<run>.json   committed: curves and final figures
    experiments/workdirs/<experiment>/<run>/           ignored: checkpoints, metrics.jsonl, TensorBoard

A run whose JSON exists is skipped; a run cut short resumes from its checkpoint (the main job
resumes by itself), so an interrupted experiment is finished by running its command again.
With --jobs N > 1, N runs go at once, each with single-threaded Eigen in XLA:CPU, which
on a small CPU trains tiny models faster in total than one run on all cores; tokens/s are then
per core and comparable only inside one experiment.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
WORKDIRS = ROOT / "experiments" / "workdirs"
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false"


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    config: str  # a file under configs/
    overrides: dict  # config field -> value, as --config.<field>=<value>
    group: str = ""  # runs of one group differ only by seed; reports average over it
    same_as: str = ""  # "<experiment>/<run>": another experiment's run of this config and seed, reused


def common_overrides(steps: int, eval_every: int) -> dict:
    return {"num_train_steps": steps, "eval_every_steps": eval_every, "checkpoint_every_steps": eval_every,
            "log_every_steps": 10, "num_eval_steps": 10, "keep_checkpoints": 1}


def command(run: Run, workdir: pathlib.Path, common: dict) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in {**common, **run.overrides}.items()]
    return [sys.executable, "-m", "moe_jax.main", f"--config=configs/{run.config}", f"--workdir={workdir}",
            *flags]


def _layer_mean(record: dict, prefix: str, stat: str) -> float | None:
    """The mean of one routing statistic over the MoE layers of a metrics.jsonl record."""
    values = [row[stat] for row in record.get(f"{prefix}/routing", []) if stat in row]
    return float(np.mean(values)) if values else None


def collect(run: Run, workdir: pathlib.Path, common: dict, error: str, wall: float) -> dict:
    """The run's curves and final figures from its metrics.jsonl."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    last_quarter = train[-max(1, len(train) // 4):]
    batch = int(run.overrides.get("batch_size", 16))
    steps_timed = train[-1]["step"] - 1 if train else 0  # 'seconds' counts from the end of step 1
    seconds = train[-1]["train/seconds"] if train else 0.0

    def mean_of(stat, rows, prefix):
        values = [v for v in (_layer_mean(r, prefix, stat) for r in rows) if v is not None]
        return float(np.mean(values)) if values else None

    return {
        "name": run.name, "group": run.group or run.name, "config": run.config,
        "overrides": {**common, **run.overrides}, "error": error, "wall_seconds": wall,
        "train": [[r["step"], r["train/loss"], r["train/seconds"]] for r in train],
        "eval": [[r["step"], r["eval/loss"], r["eval/accuracy"]] for r in evals],
        "final_eval_loss": evals[-1]["eval/loss"] if evals else None,
        "final_eval_accuracy": evals[-1]["eval/accuracy"] if evals else None,
        "examples_per_sec": batch * steps_timed / seconds if seconds else None,
        "tokens_per_sec": (float(np.mean([r["train/tokens_per_sec"] for r in train[1:]]))
                           if len(train) > 1 else None),
        "dropped_fraction": mean_of("dropped_fraction", last_quarter, "train"),
        "max_mean_load": mean_of("max_mean_load", last_quarter, "train"),
        "router_entropy": mean_of("router_entropy", last_quarter, "train"),
        "eval_dropped_fraction": mean_of("dropped_fraction", evals[-1:], "eval"),
    }


def result_path(experiment: str, run: Run) -> pathlib.Path:
    if run.same_as:
        experiment, name = run.same_as.split("/")
        return RESULTS / experiment / "runs" / f"{name}.json"
    return RESULTS / experiment / "runs" / f"{run.name}.json"


def _load(path: pathlib.Path, run: Run) -> dict:
    """A saved result under this run's name (a shared run keeps the name of its source in same_as)."""
    result = json.loads(path.read_text())
    if run.same_as:
        common = common_overrides(1, 1)
        own = {k: v for k, v in result["overrides"].items() if k not in common or k in run.overrides}
        if own != run.overrides or result["config"] != run.config:
            raise SystemExit(f"run {run.name}: {run.same_as} was made with another config; drop same_as")
        result = {**result, "name": run.name, "group": run.group or run.name, "same_as": run.same_as}
    return result


def load_results(experiment: str, runs: list[Run], partial: bool = False) -> list[dict] | None:
    """The saved results of `runs`: all of them, or None while any is missing; with `partial`, those
    that exist (None when none does)."""
    present = [(path, r) for r in runs if (path := result_path(experiment, r)).exists()]
    if not present or (len(present) < len(runs) and not partial):
        return None
    return [_load(path, r) for path, r in present]


def execute(experiment: str, run: Run, common: dict, jobs: int) -> dict:
    out = result_path(experiment, run)
    if out.exists():
        return _load(out, run)
    if run.same_as:
        raise SystemExit(f"run {run.name} reuses {run.same_as}, which has no result: "
                         "run that experiment first")
    workdir = WORKDIRS / experiment / run.name
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
               # runs that differ only by seed compile the same programs: compile once
               JAX_COMPILATION_CACHE_DIR=str(WORKDIRS / "jax_cache"))
    if jobs > 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + ONE_THREAD).strip()
    start = time.perf_counter()
    proc = subprocess.run(command(run, workdir, common), cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    if proc.returncode and (not errors or not (workdir / "metrics.jsonl").exists()):
        # a crash, or a refusal before the first step (not a divergence): show it, keep no result
        raise RuntimeError(f"run {run.name} failed:\n{proc.stderr[-3000:]}")
    result = collect(run, workdir, common, errors[0] if errors else "", wall)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[{experiment}] {run.name}: eval loss {result['final_eval_loss']}, {wall:.0f} s"
          + (f" ({result['error']})" if result["error"] else ""), flush=True)
    return result


def replay(experiment: str, runs: list[Run], name: str, steps: int) -> float:
    """Train the first `steps` steps of a committed run again with today's code and compare its
    training-loss curve with the committed one (the schedules here do not depend on the run's
    length); returns the largest absolute difference over the logged steps."""
    run = next((r for r in runs if r.name == name), None)
    if run is None or not result_path(experiment, run).exists():
        raise SystemExit(f"[{experiment}] no committed run {name!r} to replay")
    committed = json.loads(result_path(experiment, run).read_text())
    common = {**committed["overrides"], "num_train_steps": steps}
    workdir = WORKDIRS / "replay" / experiment / name
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    proc = subprocess.run(command(dataclasses.replace(run, overrides={}), workdir, common), cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")),
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"replay of {name} failed:\n{proc.stderr[-3000:]}")
    new = {step: loss for step, loss, _ in collect(run, workdir, common, "", 0.0)["train"]}
    old = {step: loss for step, loss, _ in committed["train"] if step in new}
    gaps = [abs(new[s] - old[s]) for s in sorted(old)]
    # A rounding difference (another summation order) starts at float32's last digits and grows as
    # routing decisions flip; a semantic change is visible at the first logged step already.
    print(f"[{experiment}] replay of {name}: {len(old)} logged steps up to step {steps}, "
          f"max |train loss - committed| = {max(gaps):.2e} (first logged step {min(old)}: {gaps[0]:.2e})")
    return max(gaps)


def main(experiment: str, runs: list[Run], report, *, steps: int, eval_every: int,
         partial: bool = False) -> None:
    """Command line of an experiment script: run what is missing, then write its report (partial:
    the report can be written from the runs that are done, and names the others)."""
    parser = argparse.ArgumentParser(description=f"experiment {experiment}: run its configs, then report")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each on one CPU thread when > 1)")
    parser.add_argument("--steps", type=int, default=steps, help="training steps per run")
    parser.add_argument("--report_only", action="store_true",
                        help="only rewrite the report from saved results")
    parser.add_argument("--replay", metavar="RUN", help="re-train the first --steps steps of a committed run "
                        "and compare its training-loss curve with the committed one")
    args = parser.parse_args()
    if args.replay:
        replay(experiment, runs, args.replay, args.steps)
        return
    common = common_overrides(args.steps, min(eval_every, args.steps))
    start = time.perf_counter()
    if not args.report_only:
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(lambda r: execute(experiment, r, common, args.jobs), runs))
    results = load_results(experiment, runs, partial)
    if results is None:
        missing = [r.name for r in runs if not result_path(experiment, r).exists()]
        raise SystemExit(f"[{experiment}] no report: {len(missing)} runs have no results yet "
                         f"({', '.join(missing)}); "
                         f"run `python -m experiments.{experiment}` without --report_only")
    report(results, RESULTS / experiment)
    print(f"[{experiment}] report in {RESULTS / experiment / 'README.md'} "
          f"({time.perf_counter() - start:.0f} s)")
