"""The multi-host suite: several JAX processes on this machine as one job (jax.distributed with a
coordinator on 127.0.0.1, gloo collectives), and gs:// workdirs against a Cloud Storage emulator.

    pytest -q -n auto tests/multihost

It runs in its own pytest process group (tests/conftest.py leaves it out of `pytest tests`): its
tests start the main job as subprocesses, two at a time for the multi-process ones."""
