"""A training run's step log: one JSON line per logged step in <out>/log.jsonl, and TensorBoard in <out>/tb/.

    steplog = StepLog(out, start_step, enabled=is_main)   a resumed run first drops the lines past its checkpoint
    steplog.write({"step": 3, "loss": ...}); steplog.close()

stages/eval/report.py draws the loss curves from log.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from storage.faults import fault_point
from storage.files import atomic_write

log = logging.getLogger(__name__)


class StepLog:
    """log.jsonl + TensorBoard on rank 0; a resumed run first drops lines past its checkpoint."""

    def __init__(self, out: Path, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / "log.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            # Drop the lines of steps this run redoes; via a temporary file and a
            # rename, so a kill during the rewrite cannot lose the earlier steps.
            kept = [line for line in self.path.read_text().splitlines() if _logged_step(line) <= start_step]
            atomic_write(self.path, "".join(line + "\n" for line in kept),
                         before_replace=lambda: fault_point("log.rewrite"))  # kept lines aside, not yet replaced
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # pragma: no cover - tensorboard is a dependency; keep training without it
            log.warning("tensorboard is not installed: logging to log.jsonl only")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        fault_point("student.step")  # the step's log line written, its checkpoint not yet
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _logged_step(line: str) -> float:
    """The step of a log.jsonl line; a torn last line (killed mid-append) counts as after any step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf
