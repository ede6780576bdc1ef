"""Atomic, step-numbered checkpoints of a training run (a student, the teacher fine-tune, the demo
teacher) and resuming from them.

    <out>/checkpoints/step_000050/
        model.safetensors   weights (float32, tied tensors stored once)
        optim.pt            optimiser state (torch.save; loaded with weights_only=True)
        meta.json           step, config, loss-curve tail, reader state, RNG states, schedule
        complete            written last: size and sha256 of every file above

A checkpoint is written into a hidden temporary directory and renamed into
place, so a reader sees either nothing or the whole thing. A killed writer
leaves at most a `.step_*.partial-<pid>-*` directory, which is ignored and
removed at the next trainer start once its pid is gone (`remove_stale_partials`).
`latest_valid_checkpoint` verifies the `complete` checksums and falls back to an
older checkpoint when the newest is damaged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from storage.errors import AtkdError
from stages.training.layout import (CHECKPOINTS, COMPLETE_FILE, DONE_FILE, is_done, last_checkpoint,  # noqa: F401
                                   list_checkpoints, read_done, step_dir)
from storage.faults import fault_point
from storage.files import fsync_dir as _fsync_dir
from storage.files import pid_alive
from storage.files import usual_permissions  # noqa: F401 - the permission helper of every layer; export uses it

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.pt"
META_FILE = "meta.json"

# Config keys whose change makes a checkpoint meaningless for the run, and why.
FATAL_CONFIG_KEYS = {
    "model": "another student model is a new experiment",
    "init": "another architecture is a new experiment",
    "loss.kind": "another objective is a new experiment",
    "seed": "the data order is a function of the seed, so the run could not continue its epoch",
    "fsdp": "FSDP and DDP checkpoints store the optimiser state differently",
}
# Keys that are fatal only for the loss kind that uses them.
_FATAL_FOR_KIND = {"loss.divergence": "kd", "loss.base": "atkd"}


class ResumeError(AtkdError, RuntimeError):
    """A checkpoint cannot be resumed with the current config; the message says why."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict
    skipped: list[tuple[str, str]] = field(default_factory=list)  # newer (path, reason) passed over


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _dedup_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier one (tied embeddings): safetensors refuses shared storage."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) \
            if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t.detach().to("cpu").contiguous()
    return unique, aliases


def set_aside(path: Path) -> Path:
    """Rename an unusable checkpoint to `corrupt-step_NNNNNN` beside it (kept for a look, never resumed)."""
    target = path.with_name(f"corrupt-{path.name}")
    if target.exists():
        target = path.with_name(f"corrupt-{path.name}-{uuid.uuid4().hex[:8]}")
    path.rename(target)
    return target


def save_checkpoint(out_dir: str | Path, step: int, *, model_state: dict[str, torch.Tensor],
                    optim_state: dict, meta: dict, keep: int) -> Path:
    """Write step `step` atomically, then keep only the newest `keep` complete checkpoints."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(out_dir, step)
    tmp = root / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    unique, aliases = _dedup_state(model_state)
    save_file(unique, str(tmp / MODEL_FILE), metadata={"aliases": json.dumps(aliases), "step": str(step)})
    fault_point("ckpt.model")  # weights written, nothing else yet
    torch.save(optim_state, tmp / OPTIM_FILE)
    fault_point("ckpt.optim")  # optimiser state written, no meta.json / marker yet
    (tmp / META_FILE).write_text(json.dumps({**meta, "step": step}, indent=1, sort_keys=True))
    usual_permissions(tmp)
    files = {}
    for name in (MODEL_FILE, OPTIM_FILE, META_FILE):
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    with open(tmp / COMPLETE_FILE, "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    fault_point("ckpt.rename")  # complete in its temporary directory, not renamed
    if final.exists():  # a damaged checkpoint of the same step from a killed run: swap it out
        trash = root / f".{final.name}.trash-{uuid.uuid4().hex[:8]}"
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    fault_point("ckpt.renamed")  # renamed into place, older ones not yet pruned
    prune_checkpoints(out_dir, keep)
    return final


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints carrying a `complete` marker; remove the rest and debris."""
    root = Path(out_dir) / CHECKPOINTS
    complete = [(s, p) for s, p in list_checkpoints(out_dir) if (p / COMPLETE_FILE).is_file()]
    survivors = {p for _, p in complete[-max(keep, 1):]}
    newest = complete[-1][0] if complete else -1
    for s, p in list_checkpoints(out_dir):
        # Incomplete directories newer than the newest good one are left for
        # latest_valid_checkpoint to report; everything else old goes.
        if p not in survivors and (s < newest or (p / COMPLETE_FILE).is_file()):
            shutil.rmtree(p, ignore_errors=True)
    # Debris of killed writers (one trainer writes an output directory; its own
    # temporary directory is already renamed when this runs).
    for p in root.iterdir():
        if p.name.startswith(".step_") and (".partial-" in p.name or ".trash-" in p.name):
            shutil.rmtree(p, ignore_errors=True)


# Temporary names of interrupted writes: `.final.partial-<pid>`, `log.jsonl.partial-<pid>-<hex>` and
# `done.json.partial-<pid>-<hex>` (storage.files), `checkpoints/.step_000004.partial-<pid>-<hex>`.
_PARTIAL = re.compile(r"^.+\.partial-(\d+)(?:-[0-9a-f]+)?$")


def stale_partials(out_dir: str | Path) -> list[Path]:
    """Temporary files/directories of killed saves in a student directory: their pid is not alive here."""
    out = Path(out_dir)
    found = []
    for folder in (out, out / CHECKPOINTS):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            m = _PARTIAL.match(p.name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
                found.append(p)
    return found


def remove_stale_partials(out_dir: str | Path) -> list[Path]:
    """Delete what `stale_partials` finds (call at trainer start, on one process per host); return it."""
    removed = stale_partials(out_dir)
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a usable checkpoint, or None when every file matches its marker."""
    marker = path / COMPLETE_FILE
    if not marker.is_file():
        return "no `complete` marker (the writer was interrupted)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable `complete` marker ({e})"
    for name in (MODEL_FILE, OPTIM_FILE, META_FILE):
        p = path / name
        if name not in files:
            return f"{name} not listed in the `complete` marker"
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != files[name]["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, the marker says {files[name]['bytes']}"
        if _sha256(p) != files[name]["sha256"]:
            return f"{name} does not match its sha256 in the marker (corrupted)"
    return None


def latest_valid_checkpoint(out_dir: str | Path) -> Checkpoint | None:
    """The newest checkpoint whose files verify; damaged newer ones are skipped with a warning."""
    skipped: list[tuple[str, str]] = []
    for step, path in reversed(list_checkpoints(out_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            try:
                meta = json.loads((path / META_FILE).read_text())
            except ValueError as e:  # pragma: no cover - checksum passed, so only a writer bug
                problem = f"meta.json is not JSON ({e})"
            else:
                if skipped:
                    log.warning("resuming from %s instead (the newer checkpoint(s) above are unusable)", path)
                return Checkpoint(path=path, step=step, meta=meta, skipped=skipped)
        log.warning("checkpoint %s is unusable: %s; falling back to the previous one", path, problem)
        skipped.append((str(path), problem))
    return None


def load_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The saved weights with tied names restored (ready for load_state_dict)."""
    from safetensors import safe_open

    with safe_open(str(path / MODEL_FILE), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state = load_file(str(path / MODEL_FILE))
    for name, source in aliases.items():
        state[name] = state[source]
    return state


def load_optim_state(path: Path) -> dict:
    return torch.load(path / OPTIM_FILE, map_location="cpu", weights_only=True)  # noqa: TID251 - weights_only=True


# ---------------------------------------------------------------- config differences


def flatten_config(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"loss.kind": "atkd", ...}; dict-valued leaves such as `init` stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "init":
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume_config(saved: dict, current: dict, *, where: str = "") -> list[str]:
    """Differences between the checkpoint's config and the current one.

    Returns readable lines for changed keys (the current config wins); raises
    ResumeError for keys that would make resuming meaningless.
    """
    a, b = flatten_config(saved), flatten_config(current)
    changed = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    fatal = [k for k in changed if k in FATAL_CONFIG_KEYS
             or (k in _FATAL_FOR_KIND and b.get("loss.kind") == _FATAL_FOR_KIND[k])]
    if fatal:
        detail = "; ".join(f"{k}: checkpoint {a.get(k, '<unset>')!r}, now {b.get(k, '<unset>')!r} "
                           f"({FATAL_CONFIG_KEYS.get(k, 'another objective is a new experiment')})" for k in fatal)
        raise ResumeError(
            f"cannot resume {where or 'this run'} from its checkpoint: {detail}. Train into a new output "
            "directory (or delete its checkpoints) to start over."
        )
    return [f"{k}: checkpoint {a.get(k, '<unset>')!r} -> now {b.get(k, '<unset>')!r}" for k in changed]


# ---------------------------------------------------------------- RNG states as JSON


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Every RNG the loop can touch (torch CPU/CUDA, Python, NumPy), JSON-serialisable."""
    np_state = np.random.get_state()
    state = {
        "torch": _b64(torch.get_rng_state()),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
