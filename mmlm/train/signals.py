"""Preemption and Ctrl-C during training: finish the step, save a checkpoint, stop.

SIGTERM (a preemption notice) or a first Ctrl-C (SIGINT) sets a flag that
the train loop reads after each step (`PreemptionWatch.reached`); on several
hosts JAX's preemption sync point makes them agree on the step. The loop
then saves and raises `Preempted`, and `mmlm train` exits with
`PREEMPTED_EXIT_CODE` (`INTERRUPTED_EXIT_CODE` for Ctrl-C), so rerunning the
same command resumes. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
from typing import Any

import jax
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a killed process reports
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was saved."""


class PreemptionWatch:
    """SIGTERM / first Ctrl-C -> save and stop. Multi-host: JAX's preemption sync point agrees on the step.

    A second Ctrl-C raises KeyboardInterrupt at once (the default behaviour).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.flag = False
        self.signal_name = ""
        self._old: dict[int, Any] = {}
        if jax.process_count() == 1:
            for sig in self.SIGNALS:
                try:
                    self._old[sig] = signal.signal(sig, self._handler)
                except ValueError:  # not the main thread (e.g. called from a notebook worker)
                    pass

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.flag:
            raise KeyboardInterrupt
        self.flag = True
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to stop at once)", flush=True)

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        return self.flag

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
