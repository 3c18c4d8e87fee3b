"""Test-wide settings: tests compile many small XLA programs, so ask XLA:CPU for fast compiles
(less LLVM optimization of the generated code; numerics are unchanged)."""
import os
import tempfile

# An installed libtpu (the [tpu] extra) must not try to start a TPU in tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

os.environ.setdefault("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# One persistent compilation cache for the whole run, inherited by pytest-xdist workers and by the
# command-line jobs the tests start: tests that build the same tiny models (and the CLI jobs that
# train, resume and evaluate one) compile each program once.
# (pytest-xdist names the run in each worker; without it the cache is this process's own.)
RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"moe_jax_tests_xla_cache_{RUN}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# tests/sharding needs 8 emulated devices, fixed when JAX starts: it runs in its own process
# (`pytest tests/sharding`), so a plain `pytest tests` leaves it out. So does the fault suite
# (`pytest tests/faults`), which takes minutes of kills and restarts, and the multi-host suite
# (`pytest tests/multihost`: several processes per test, a storage emulator).
collect_ignore = ["sharding", "faults", "multihost"]
