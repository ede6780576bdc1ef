"""Where a training run (a student, the teacher fine-tune) starts, said out loud: its newest good
checkpoint, or step 0.

- resuming: `resuming <name> from step N (checkpoint <path>)`, plus a warning
  per config key that differs from the checkpoint's (the current value wins)
  and, when the learning-rate schedule changed (e.g. `optim.max_steps` raised
  after a finished run), what the learning rate does at the step it resumes.
- from scratch: `starting <name> from scratch`; checkpoints that all failed
  their checks are renamed `checkpoints/corrupt-step_NNNNNN` (kept for a look,
  never resumed, never mistaken for newer ones when pruning).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

from stages.training import checkpoint as ckpt
from stages.training.config import OptimConfig

log = logging.getLogger(__name__)

SCHEDULE_KEYS = ("lr", "warmup_steps", "max_steps", "min_lr_ratio")


def say(message: str) -> None:
    """A line the user should see whatever the logging set-up (the CLI configures none)."""
    print(f"[student] {message}", flush=True)


def find_checkpoint(out: Path, name: str, config: dict, *, is_main: bool) -> ckpt.Checkpoint | None:
    """The newest good checkpoint, checked against `config` (ResumeError when it cannot be resumed)."""
    found = ckpt.latest_valid_checkpoint(out)
    if found is None:
        return None
    for line in ckpt.check_resume_config(found.meta["config"], config, where=str(out)):
        if is_main:
            log.warning("student %s: config differs from checkpoint step %d, the current value wins: %s",
                        name, found.step, line)
    return found


def announce_resume(found: ckpt.Checkpoint, name: str, optim: OptimConfig, lr_at: Callable) -> None:
    say(f"resuming {name} from step {found.step} (checkpoint {found.path})")
    change = schedule_change(found.meta["config"].get("optim", {}), optim, found.step, lr_at)
    if change:
        log.warning("student %s: %s", name, change)
    for path, problem in found.skipped:  # newer, damaged: this run redoes those steps
        log.warning("student %s: removing unusable checkpoint %s (%s)", name, path, problem)


def schedule_change(saved_optim: dict, optim: OptimConfig, step: int, lr_at: Callable) -> str | None:
    """What the learning rate does at `step` when the schedule's settings changed since the checkpoint."""
    old = dataclasses.replace(optim, **{k: saved_optim.get(k, getattr(optim, k)) for k in SCHEDULE_KEYS})
    changed = [k for k in SCHEDULE_KEYS if getattr(old, k) != getattr(optim, k)]
    if not changed:
        return None
    before, after = lr_at(step, old), lr_at(step, optim)
    settings = ", ".join(f"optim.{k} {getattr(old, k)} -> {getattr(optim, k)}" for k in changed)
    what = (f"the learning rate jumps from {before:.3g} to {after:.3g} at step {step + 1}" if before != after
            else f"the learning rate at step {step + 1} is {after:.3g} either way")
    return (f"the learning-rate schedule changed ({settings}) and is recomputed for the new settings (warmup "
            f"{optim.warmup_steps}, cosine from {optim.lr:.3g} to {optim.lr * optim.min_lr_ratio:.3g} at step "
            f"{optim.max_steps}): {what} (checkpoint's schedule vs the new one), then follows the new schedule")


def start_from_scratch(out: Path, name: str) -> None:
    """Say so; move checkpoints that all failed their checks out of the way (main rank only)."""
    moved = [ckpt.set_aside(path) for _, path in ckpt.list_checkpoints(out)]
    if not moved:
        say(f"starting {name} from scratch")
        return
    say(f"starting {name} from scratch: every checkpoint in {out / ckpt.CHECKPOINTS} is unusable (see the "
        f"warnings above); moved aside as {', '.join(p.name for p in moved)}")
