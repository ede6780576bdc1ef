"""vLLM's engine processes die with the worker that started them, even a SIGKILLed one.

vLLM 0.32 starts its engine core (and its model workers) as child processes and
does not watch its parent: an atkd worker killed with SIGKILL (a fault test,
the OOM killer, a launcher's `kill -9`) left `VLLM::EngineCore` and
`VLLM::Worker` running, the worker holding its KV cache (7 GiB here) until
killed by hand. `watch` starts one small watchdog process per engine (its own
session, so a Ctrl-C to the worker's group does not stop it): it checks each
second whether the worker is alive and, once it is gone, SIGKILLs the processes
vLLM started, recorded with their start times so that a reused pid is never
hit, then exits. `stop` ends it after a normal shutdown. In-process vLLM
(ATKD_VLLM_IN_PROCESS=1) starts no processes and needs none.
"""

from __future__ import annotations

import subprocess
import sys

_WATCHDOG = r"""
import os, signal, sys, time
import psutil

def alive(spec):
    pid, created = spec.split(":")
    try:
        return psutil.Process(int(pid)).create_time() == float(created)
    except psutil.Error:
        return False

parent, children = sys.argv[1], sys.argv[2:]
while alive(parent):
    time.sleep(1.0)
for spec in children:
    if alive(spec):
        try:
            os.kill(int(spec.split(":")[0]), signal.SIGKILL)
        except OSError:
            pass
"""


def child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def watch(before: set[int]) -> subprocess.Popen | None:
    """A watchdog over this process's descendants that are not in `before` (None if there are none)."""
    import psutil

    me = psutil.Process()
    new = [p for p in me.children(recursive=True) if p.pid not in before]
    if not new:
        return None
    specs = [f"{p.pid}:{p.create_time()!r}" for p in (me, *new)]
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, *specs], start_new_session=True,  # noqa: S603
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(watchdog: subprocess.Popen | None) -> None:
    if watchdog is not None and watchdog.poll() is None:
        watchdog.kill()
        watchdog.wait()
