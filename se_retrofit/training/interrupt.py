"""Ctrl-C and SIGTERM stop the run at the next step boundary, where a checkpoint is consistent.

A KeyboardInterrupt raised in the middle of ``optimizer.step()`` could leave half the weights updated;
so the first signal only sets a flag that the loop polls after each step (then saves and returns).
A second Ctrl-C interrupts at once, for a run stuck in data loading; the last checkpoint remains.
SIGTERM is handled the same way because schedulers (SLURM, Kubernetes) send it before killing a job.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager; ``requested`` turns True on the first SIGINT/SIGTERM.

    Only the main thread can install signal handlers; elsewhere this is inert (never requested).
    """

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.announce = announce
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> "GracefulStop":
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            # a forked data-loader worker inherited the handler: the main process stops the run and its
            # workers, so a worker only waits (Ctrl-C reaches the whole process group, workers included)
            return
        if self.requested and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print(f"\n{signal.Signals(signum).name} received: stopping after this step and saving a checkpoint "
                  "(press Ctrl-C again to quit at once)", file=sys.stderr, flush=True)
