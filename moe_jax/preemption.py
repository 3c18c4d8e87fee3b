"""Preemption notices. A Cloud TPU preemption is a SIGTERM: the job saves a checkpoint after the step
in flight and exits 0. On one host the notice is our SIGTERM handler's flag. On several, every host
must save the same step, or one enters a save (and its collectives) that the others never reach: the
hosts agree through JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`),
whose coordination service catches the SIGTERM on any host and picks the next step every host
reaches; it is asked after every step, as it requires."""
from __future__ import annotations

import signal

from jax.experimental import multihost_utils


class Preemption:
    """`with Preemption(multihost) as p:` ... `p.after(step)` says whether to save that step and stop."""

    def __init__(self, multihost: bool):
        self.multihost, self.noticed, self._previous = multihost, False, None

    def __enter__(self) -> Preemption:
        if not self.multihost:  # under jax.distributed the coordination service owns SIGTERM
            self._previous = signal.signal(signal.SIGTERM, self._notice)
        return self

    def __exit__(self, *exc) -> None:
        if not self.multihost:
            signal.signal(signal.SIGTERM, self._previous)

    def _notice(self, *_) -> None:
        self.noticed = True

    def before_start(self) -> bool:
        """A notice while the run started (one host; several hosts learn it at the first step's sync)."""
        return self.noticed

    def after(self, step: int) -> bool:
        """Save step `step` and stop? Read once per step: a notice after this is handled after the next."""
        if self.multihost and not self.noticed:
            self.noticed = multihost_utils.reached_preemption_sync_point(step)
        return self.noticed
