"""The benchmark commands (moe_jax.bench) at tiny shapes, through their command line: they run and
report every field with positive figures. Nothing here is timed against a target."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = ["--config.model.vocab_size=64", "--config.model.d_model=32", "--config.model.d_ff=64",
              "--config.moe.d_ff=64", "--config.model.num_heads=2", "--config.model.head_dim=16",
              "--config.batch_size=4", "--config.seq_len=16", "--config.target_seq_len=8"]


def run_bench(*args) -> list[dict]:
    # Inherits tests/conftest.py's fast-compile XLA_FLAGS: no figure is checked against a target.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "moe_jax.bench", *args, "--json"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_layer_benchmark_reports_each_point():
    records = run_bench("layer", "--tokens=512", "--seq_len=64", "--d_model=16", "--d_ff=32", "--experts=4",
                        "--k=1,2", "--capacity_factor=1.0", "--group_size=128", "--dispatch=einsum,index",
                        "--activation=relu,swiglu", "--reps=2")
    assert len(records) == 2 * 2 * 2  # activations x k x dispatches
    for r in records:
        assert "skipped" not in r, r
        for field in ("dispatch", "num_experts", "k", "capacity_factor", "group_size", "tokens", "d_model",
                      "d_ff", "gated", "ms", "dense_ms", "temp_bytes"):
            assert field in r, field
        assert r["ms"] > 0 and r["dense_ms"] > 0 and r["temp_bytes"] > 0
        assert r["tokens"] == 512 and r["num_experts"] == 4 and r["group_size"] == 128
        assert r["gated"] == (r["activation"] == "swiglu")
        assert r["floor"] == 1 + 4 / ((3 if r["gated"] else 2) * r["k"] * 32)
    assert {(r["dispatch"], r["k"]) for r in records} == {(d, k) for d in ("einsum", "index") for k in (1, 2)}


def test_layer_benchmark_skips_points_over_the_time_limit():
    (record,) = run_bench("layer", "--tokens=512", "--seq_len=64", "--d_model=16", "--d_ff=32", "--experts=4",
                          "--k=1", "--capacity_factor=1.0", "--group_size=128", "--dispatch=index",
                          "--reps=2", "--max_seconds=0")
    assert record["skipped"].startswith("estimated")
    assert "ms" not in record


def test_train_benchmark_times_a_config_against_a_baseline():
    first, second, ratio = run_bench("train", "--config=configs/switch_tiny.py", *TINY_MODEL,
                                     "--baseline=configs/dense_tiny.py",
                                     *[f.replace("--config.", "--baseline.") for f in TINY_MODEL],
                                     "--steps=2", "--compile_reps=1")
    assert (first["config"].startswith("configs/switch_tiny.py")
            and second["config"].startswith("configs/dense_tiny"))
    for r in (first, second):
        assert r["tokens_per_step"] == 4 * (16 + 8)
        for field in ("compile_s", "step_ms", "tokens_per_s", "params", "temp_bytes"):
            assert r[field] > 0, field
    assert first["params"] > second["params"]  # the experts
    assert ratio["tokens_per_s_ratio"] > 0 and ratio["compile_s_ratio"] > 0


def test_train_benchmark_compile_only():
    (record,) = run_bench("train", "--config=configs/switch_tiny.py", *TINY_MODEL, "--compile_only",
                          "--compile_reps=2")
    assert record["compile_s"] > 0 and record["lower_s"] > 0
    assert record["compile_reps"] == 2 and len(record["compile_s_rounds"]) == 2  # two fresh rounds
    assert min(record["compile_s_rounds"]) <= record["compile_s"] <= max(record["compile_s_rounds"])
    assert "step_ms" not in record
