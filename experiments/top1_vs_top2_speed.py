"""Training throughput of top-2 against top-1 (Switch Transformer, Table 1's speed column), measured
the way speed can be compared on a shared machine: both configs' train steps compiled in one
`python -m moe_jax.bench train` process and timed interleaved, step by step, so that whatever else
the machine runs slows both alike. The experiment runs' own examples/s come from runs made at
different times under different loads and compare only roughly.

    python -m experiments.top1_vs_top2_speed      # writes results/top1_vs_top2/speed.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from experiments import runner, top1_vs_top2

STEPS = 30


def _flags(prefix: str, run: runner.Run) -> list[str]:
    return [f"--{prefix}=configs/{run.config}", *(f"--{prefix}.{k}={v}" for k, v in run.overrides.items()
                                                  if k != "seed")]


def measure(cf: float) -> dict:
    """tokens/s of top2_cf<cf> over top1_cf<cf> (seed-0 configs), from one interleaved bench run."""
    by = {r.name: r for r in top1_vs_top2.runs()}
    top2, top1 = by[f"top2_cf{cf}_s0"], by[f"top1_cf{cf}_s0"]
    command = [sys.executable, "-m", "moe_jax.bench", "train", *_flags("config", top2),
               *_flags("baseline", top1), f"--steps={STEPS}", "--compile_reps=1", "--json"]
    proc = subprocess.run(command, cwd=runner.ROOT, capture_output=True, text=True, check=False,
                          env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))
    if proc.returncode:
        raise RuntimeError(f"bench for cf {cf} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    steps = [r for r in rows if "step_ms" in r]
    ratio = next(r["tokens_per_s_ratio"] for r in rows if "tokens_per_s_ratio" in r)
    return {"capacity_factor": cf, "steps": STEPS, "top2_step_ms": steps[0]["step_ms"],
            "top1_step_ms": steps[1]["step_ms"], "top2_over_top1_tokens_per_s": ratio}


def main() -> None:
    results = [measure(cf) for cf in top1_vs_top2.FACTORS]
    top1_vs_top2.SPEED.write_text(json.dumps({"command": "python -m experiments.top1_vs_top2_speed",
                               "results": results}, indent=1) + "\n")
    for r in results:
        print(f"cf {r['capacity_factor']}: top-2 {r['top2_step_ms']:.0f} ms, top-1 "
              f"{r['top1_step_ms']:.0f} ms a step: top-2 at {r['top2_over_top1_tokens_per_s']:.2f}x "
              "top-1's tokens/s")


if __name__ == "__main__":
    main()
