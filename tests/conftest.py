"""Test-wide settings: tests compile many small XLA programs, so ask XLA:CPU for fast compiles
(less LLVM optimization of the generated code; numerics are unchanged)."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
