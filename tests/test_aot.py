"""The TPU compile check (moe_jax.aot) through its command line: switch_base compiles for a real
v5e topology on this CPU machine and reports memory; a step that cannot fit exits 1."""
import os
import re
import subprocess
import sys

import pytest

from moe_jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_aot(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "moe_jax.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_accelerator_types_map_to_topologies():
    assert aot.parse_accelerator_type("v5e-16") == ("v5e:4x4", 16, 16)
    assert aot.parse_accelerator_type("v5litepod-8") == ("v5e:2x4", 8, 16)
    assert aot.parse_accelerator_type("v4-8") == ("v4:2x2x1", 4, 32)   # v4 counts TensorCores
    assert aot.parse_accelerator_type("v5p-32") == ("v5p:2x2x4", 16, 95)
    assert aot.parse_accelerator_type("v6e-8") == ("v6e:2x4", 8, 32)
    with pytest.raises(aot.TopologyError, match="accelerator type such as v4-8"):
        aot.parse_accelerator_type("tpu-v5e-16")
    with pytest.raises(aot.TopologyError, match="no known slice shape"):
        aot.parse_accelerator_type("v5e-12")


def needs_libtpu():
    pytest.importorskip("libtpu",
                        reason="libtpu is not installed (`pip install -e .[tpu]`); it is the TPU compiler")


def test_switch_base_compiles_and_fits_on_v5e_8():
    needs_libtpu()
    # The paper's Switch-Base (128 experts, 7.4B parameters), experts over 8 chips, 16 sequences a step.
    r = run_aot("--config=configs/switch_base.py", "--topology=v5e-8", "--config.batch_size=16")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "train step compiled for v5e-8 (v5e:2x4, 8 devices" in r.stdout
    params = float(re.search(r"parameters\s+([\d.]+) GiB", r.stdout).group(1))
    assert 3.9 < params < 4.1  # 7.2B float32 expert parameters / 8 expert shards + 0.2B replicated dense ones
    peak, hbm = map(float, re.search(r"peak .* ([\d.]+) GiB of +([\d.]+) GiB HBM", r.stdout).groups())
    assert 0 < peak <= hbm == 16.0
    assert re.search(r"cost estimate per device, loop bodies counted once .*: [\d.]+ TFLOPs", r.stdout)
    # Tokens move to their experts' devices and back with all-to-alls (GSPMD, from the layout constraints).
    assert re.search(r"collectives in the step: .*all-to-all x[1-9]", r.stdout)


def test_a_step_that_cannot_fit_exits_1_before_compiling():
    needs_libtpu()
    # 29.7 GB of parameters, one 16 GiB chip. Two checks at once: both load libtpu (its lockfile is
    # no obstacle to compiling without a TPU).
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("ALLOW_MULTIPLE_LIBTPU_LOAD", None)
    jobs = [subprocess.Popen([sys.executable, "-m", "moe_jax.aot", "--config=configs/switch_base.py",
                              "--topology=v5e-1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for job in jobs:
        stdout, stderr = job.communicate(timeout=600)
        assert job.returncode == 1, stderr[-2000:]
        assert "parameters and optimizer state alone exceed a device's HBM" in stdout
        assert "error: the step does not fit: shard more (config.mesh_shape)" in stderr


def test_unknown_topology_is_a_clear_error():
    r = run_aot("--config=configs/switch_base.py", "--topology=v5e-12")
    assert r.returncode == 1 and "no known slice shape for 'v5e-12'" in r.stderr
