"""Local file writes shared by every stage: atomic replace, fsync, the usual permissions.

Every layer writes its small outputs (manifest.json, config.yaml, results.json,
report.md, log.jsonl, done.json, demo data ...) through ``atomic_write`` or
``atomic_open``, so a reader, or a rerun after a kill, sees the old file or the
new one and never a mix:

1. the new content goes to a temporary file in the same directory, named
   ``<name>.partial-<pid>-<hex>`` (same filesystem, so the rename is atomic;
   the pid lets cleanup code tell a dead writer's leftover from a live one's,
   see stages/training/checkpoint.py ``stale_partials``);
2. the file is flushed and fsynced, then renamed over the target;
3. the directory is fsynced where the platform allows it, so the rename
   itself survives a power cut.

The temporary file is created with mode ``0o666 & ~umask``, the mode a plain
``open(path, "w")`` gives (``tempfile.mkstemp`` would give 0600).

Directories committed by a rename (checkpoint step directories, a student's
``final/``, shard groups, the demo's build steps) keep their own protocols and
use ``usual_permissions`` and ``fsync_dir`` from here.

This module is in ``storage`` because that is the bottom layer every other
layer may import; it knows nothing about the cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Callable, Iterator

__all__ = ["atomic_write", "atomic_open", "temp_name", "fsync_dir", "usual_mode", "usual_permissions",
           "current_umask"]


def current_umask() -> int:
    """The process umask, read without changing it where the platform allows.

    Linux reports it in /proc/self/status; elsewhere it is set and restored at
    once (the only portable way, briefly visible to other threads).
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0o666 & ~umask."""
    return 0o666 & ~current_umask()


def usual_permissions(root: str | os.PathLike) -> None:
    """Give ``root`` (a file) or every file under it (a directory) the usual mode.

    safetensors (and anything built on tempfile.mkstemp) creates its files 0600;
    without this, weights would be private while every other output is 0644.
    Symlinks are left alone.
    """
    mode = usual_mode()
    root = Path(root)
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames into it are durable; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory (EINVAL)
        pass
    finally:
        os.close(fd)


def temp_name(path: str | os.PathLike) -> Path:
    """A private temporary name beside ``path``: ``<name>.partial-<pid>-<hex>``."""
    path = Path(path)
    return path.with_name(f"{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8",
                before_replace: Callable[[], None] | None = None) -> Iterator[IO]:
    """Open a temporary file for writing that replaces ``path`` when the block ends.

    ``mode`` is "w" (text, ``encoding``) or "wb". If the block raises, ``path``
    is untouched and the temporary file is removed. ``before_replace`` runs
    after the data is on disk and before the rename (a crash point for tests).
    The parent directory must exist.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = temp_name(path)
    # O_EXCL: the name is ours alone; 0o666 is reduced by the umask as for open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str, *,
                 before_replace: Callable[[], None] | None = None) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8) atomically; see the module docstring."""
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_open(path, "wb", before_replace=before_replace) as f:
        f.write(payload)


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON object written by atomic_write; None when missing, unreadable or not an object
    (the callers' "not done / not recorded yet")."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one of another user counts as alive).
    Temporary files and leases name their writer's pid, so a dead writer's can be cleaned up."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
