"""`teacher.finetune`: plain SFT of the teacher on the training rows, before stage one caches it.

    finetune_teacher(data_cfg, teacher_cfg, out_dir, train=...) -> bool   trains (or resumes); True if it did work
    finetuned_teacher(teacher_cfg, out_dir) -> TeacherConfig     the teacher stage one then scores
    finetune_state(data_cfg, teacher_cfg, out_dir) -> str        "done" | "in progress ..." | "not started"

The paper fine-tunes the teacher on the training instructions, then distils.
This module owns what the fine-tuned weights are and when they may be used;
the training itself is the caller's `train()`: the pipeline passes plain SFT of
`teacher.model` on the training rows into `out_dir` with the settings of
`teacher.finetune` (pipeline/orchestrator.py: the student trainer's loop over
the training kit's pieces, stages/training/), so `out_dir` is laid out like any
training run (stages.training.layout: checkpoints, log.jsonl, final/,
done.json; killed, it resumes).
Finished, it writes `final/atkd_finetune.json`, the record of what the weights
were trained from: the base model and its fingerprint, the fine-tune settings
and the training rows' identity. The cache identity (stages.teacher.identity)
copies that record, so a cache of the raw teacher, or of a teacher fine-tuned
otherwise, is refused. A finished fine-tune is never trained again or further:
one whose record differs from the config (a raised optim.max_steps included) is
refused before any step, naming each differing key (`settings.optim.max_steps:
60 -> 80`), so the weights the cache and the students were made from survive.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

from stages import data as data_mod
from stages.data_config import DataConfig
from stages.errors import TeacherError
from stages.fingerprint import model_fingerprint
from stages.teacher.config import TeacherConfig
from stages.training.layout import is_done, last_checkpoint, read_done
from storage.diff import changes
from storage.files import atomic_write, read_json

RECORD = "atkd_finetune.json"  # in the fine-tuned model's directory (final/)


def finetune_record(data_cfg: DataConfig, teacher_cfg: TeacherConfig) -> dict:
    """What fine-tuned weights made from this config are: base model, settings, training rows."""
    source, rows = data_mod.training_rows(data_cfg)
    return {"base_model": os.path.basename(os.path.normpath(teacher_cfg.model)),
            "base_fingerprint": model_fingerprint(teacher_cfg.model), "settings": _settings(teacher_cfg),
            "data": data_mod.rows_identity(data_cfg, source, rows)}


def read_record(model_dir: str) -> dict | None:
    """The fine-tune record of a model directory; None for a model this stage did not make."""
    return read_json(Path(os.path.expanduser(model_dir)) / RECORD)


def finetuned_teacher(teacher_cfg: TeacherConfig, out_dir: str | Path) -> TeacherConfig:
    """The teacher stage one scores: teacher_cfg with model = the fine-tuned final/."""
    return dataclasses.replace(teacher_cfg, model=str(Path(out_dir) / "final"))


def _done(teacher_cfg: TeacherConfig, out: Path) -> bool:
    return is_done(out, teacher_cfg.finetune.optim.max_steps, teacher_cfg.finetune.optim.epochs)


def _settings(teacher_cfg: TeacherConfig) -> dict:
    settings = dataclasses.asdict(teacher_cfg.finetune)
    settings.pop("enabled")
    return settings


def finetune_state(teacher_cfg: TeacherConfig, out_dir: str | Path) -> str:
    """For `atkd status` and --dry-run (reads no data, loads no model: the training rows are compared
    when the fine-tune is used)."""
    out = Path(out_dir)
    have = read_record(str(out / "final"))
    if have is not None:
        diffs = changes({"settings": have.get("settings")}, {"settings": _settings(teacher_cfg)})
        return "done" if not diffs else f"done, but with other settings ({'; '.join(diffs)}): it would be refused"
    if read_done(out) is not None:
        return ("trained; its record is written next" if _done(teacher_cfg, out) else
                "finished with other settings (optim.max_steps / epochs): it would be refused")
    last = last_checkpoint(out)
    return f"in progress (last checkpoint {last.name})" if last else "not started"


def _refuse(out: Path, diffs: list[str]) -> TeacherError:
    return TeacherError(f"the fine-tuned teacher in {out} was made from another config (its record -> this config: "
                        f"{'; '.join(diffs)}); a finished fine-tune is never changed: delete {out} to fine-tune "
                        "again with these settings (its cache must then be rebuilt too), or set them back")


def finetune_teacher(data_cfg: DataConfig, teacher_cfg: TeacherConfig, out_dir: str | Path, *,
                     train: Callable[[], object], on_start: Callable[[], object] | None = None) -> bool:
    """Fine-tune teacher.model on the training rows into out_dir (module doc); True if it trained.

    A finished fine-tune (its record in final/, or done.json) is never trained further or
    again: one whose record differs from this config is refused before any step. `on_start`:
    called once the checks passed, before training starts; `train()`: the training run (SFT of
    teacher.model on the rows into out_dir, as teacher.finetune says), resumed if killed."""
    out = Path(out_dir)
    if not teacher_cfg.model:
        raise TeacherError("teacher.finetune.enabled needs teacher.model: the model to fine-tune")
    want = finetune_record(data_cfg, teacher_cfg)
    final = out / "final"
    have = read_record(str(final))
    if have is not None:
        diffs = changes(have, want)
        if diffs:
            raise _refuse(out, diffs)
        return False
    done = read_done(out)
    if done is not None:
        if not _done(teacher_cfg, out):  # finished, then the config asked for more steps
            optim = teacher_cfg.finetune.optim
            key, old, new = (("epochs", done.get("epochs"), optim.epochs) if optim.epochs is not None
                             else ("max_steps", done.get("steps"), optim.max_steps))
            raise _refuse(out, [f"settings.optim.{key}: {old} -> {new}"])
        # Killed between done.json and the record: the weights are this config's.
        atomic_write(final / RECORD, json.dumps(want, indent=1, sort_keys=True))
        return False
    if on_start is not None:
        on_start()
    print(f"[teacher] fine-tuning {teacher_cfg.model} on the training rows (plain SFT) into {out}", flush=True)
    train()
    if os.environ.get("RANK", "0") == "0":
        atomic_write(final / RECORD, json.dumps(want, indent=1, sort_keys=True))
    return True
