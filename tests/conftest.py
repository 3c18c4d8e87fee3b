"""Test-wide settings: tests compile many small XLA programs, so ask XLA:CPU for fast compiles
(less LLVM optimization of the generated code; numerics are unchanged)."""
import os

# An installed libtpu (the [tpu] extra) must not try to start a TPU in tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

os.environ.setdefault("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# tests/sharding needs 8 emulated devices, fixed when JAX starts: it runs in its own process
# (`pytest tests/sharding`), so a plain `pytest tests` leaves it out. So does the fault suite
# (`pytest tests/faults`), which takes minutes of kills and restarts.
collect_ignore = ["sharding", "faults"]
