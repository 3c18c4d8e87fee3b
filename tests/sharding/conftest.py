"""Sharding tests run on 8 emulated CPU devices, in their own pytest process:

    pytest -q tests/sharding

(XLA fixes the device count when JAX starts, so these cannot share a process with the rest;
tests/conftest.py leaves this folder out of a plain `pytest tests`.)"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

if jax.device_count() != 8:
    raise RuntimeError(f"tests/sharding needs 8 emulated devices but JAX started with {jax.device_count()}: "
                       "run `pytest tests/sharding` in its own process, before anything imports jax")
