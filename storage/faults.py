"""Deterministic crash points for the fault-injection tests (a no-op in normal runs).

    ATKD_FAULT_POINT=shard.commit:3      SIGKILL this process at the 3rd hit of "shard.commit"
    ATKD_FAULT_POINT=a:1,b:2             several points; the first one reached kills
    ATKD_FAULT_TRACE=FILE                append "name detail pid" to FILE at every hit (before any kill)
    ATKD_FAULT_ONCE=FILE                 kill only the first process to reach its point (it creates FILE):
                                         e.g. one Ray actor once, not again after its restart

Code that wants a crash point calls ``fault_point("name")`` (``detail``: what
the point is about, e.g. the shard). Without the environment variables the
call returns at once. The points, both stages:

    shard.write  shard.commit  shard.committed      storage/shard.py, both commit protocols (detail: the shard's path)
    fs.replace.<file>                               storage/fs.py, e.g. fs.replace.manifest.json
    student.step                                    a step's log line written, its checkpoint not yet
    ckpt.model  ckpt.optim  ckpt.rename  ckpt.renamed   stages/training/checkpoint.py, in write order
    log.rewrite                                     a resume's shortened log written aside, not yet renamed
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault_point(name: str, detail: str = "") -> None:
    trace = os.environ.get("ATKD_FAULT_TRACE")
    if trace:  # one O_APPEND write per line: lines of concurrent processes do not interleave
        fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{name} {detail or '-'} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
    spec = os.environ.get("ATKD_FAULT_POINT")
    if not spec:
        return
    _hits[name] = _hits.get(name, 0) + 1
    for item in spec.split(","):
        point, _, nth = item.strip().rpartition(":")
        if point == name and nth.isdigit() and _hits[name] == int(nth) and _first_kill():
            os.kill(os.getpid(), signal.SIGKILL)


def _first_kill() -> bool:
    """True unless ATKD_FAULT_ONCE names a file that another kill already created."""
    once = os.environ.get("ATKD_FAULT_ONCE")
    if not once:
        return True
    try:
        os.close(os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    return True
