"""SIGINT/SIGTERM during training: finish the current step, write a checkpoint, then stop.

Without this a Ctrl-C or a scheduler's SIGTERM lost every step since the last
`checkpoint_every`. A second signal stops at once (checkpoints are atomic, so
that loses only the steps since the last one).
"""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on a signal after writing a checkpoint; the CLI reports it as an interrupt."""


class StopOnSignal:
    """Context manager: while active, SIGINT/SIGTERM only set `signum` (the loop checks it per step)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # the second signal: stop now
        self.signum = signum
        os.write(2, f"[student] {signal.Signals(signum).name}: stopping after this step, once its checkpoint "
                    "is written (send it again to stop at once)\n".encode())
