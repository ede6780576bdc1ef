"""Deterministic crash points for the fault-injection tests (a no-op in normal runs).

    ATKD_FAULT_POINT=shard.commit:3      SIGKILL this process at the 3rd hit of "shard.commit"
    ATKD_FAULT_POINT=a:1,b:2             several points; the first one reached kills

Code that wants a crash point calls ``fault_point("name")``. Without the
environment variable the call returns at once.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("ATKD_FAULT_POINT")
    if not spec:
        return
    _hits[name] = _hits.get(name, 0) + 1
    for item in spec.split(","):
        point, _, nth = item.strip().rpartition(":")
        if point == name and nth.isdigit() and _hits[name] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
