"""A training run's output directory (a student's, the teacher fine-tune's), and whether it is finished,
without importing torch.

    <out>/checkpoints/step_NNNNNN/   see stages.training.checkpoint (its `complete` marker is written last)
    <out>/final/                     the exported model (stages.training.export)
    <out>/log.jsonl, tb/             one line per step, TensorBoard (stages.training.steplog)
    <out>/done.json                  written last by the trainer: {"steps": N, "final_loss": ..., ...}

    is_done(out, max_steps)   done.json is there and reached max_steps (raising max_steps trains further)
    read_done(out)            done.json's contents, or None (missing or unreadable)
    last_checkpoint(out)      the newest step directory with its `complete` marker, or None

The orchestrator asks these for `atkd status` and to decide what runs, so this
module stays light (stages.training.checkpoint re-exports all of it).
"""

from __future__ import annotations

import re
from pathlib import Path

from storage.files import read_json

CHECKPOINTS = "checkpoints"
COMPLETE_FILE = "complete"
DONE_FILE = "done.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step_{step:06d}"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every step directory, complete or not, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def last_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint whose writer finished (`complete` marker; checksums are not verified here)."""
    complete = [p for _, p in list_checkpoints(out_dir) if (p / COMPLETE_FILE).is_file()]
    return complete[-1] if complete else None


def read_done(out_dir: str | Path) -> dict | None:
    """done.json of a finished student; None when there is none or it cannot be read."""
    return read_json(Path(out_dir) / DONE_FILE)


def is_done(out_dir: str | Path, max_steps: int, epochs: float | None = None) -> bool:
    """Whether the student reached `max_steps`, or with `epochs` (optim.epochs) that many epochs,
    which done.json records (its steps depend on the number of ranks). An unreadable done.json is
    not done: the trainer then resumes from its checkpoints and writes a new one."""
    done = read_done(out_dir)
    try:
        if epochs is not None:
            return done is not None and float(done.get("epochs") or 0) >= epochs
        return done is not None and int(done.get("steps", 0)) >= max_steps
    except (TypeError, ValueError):
        return False
