"""The watchdog that ends vLLM's engine processes with the worker that started them
(stages/teacher/vllm_watchdog.py), on plain processes: a parent starts a child and the
watchdog, is SIGKILLed, and the child must end; a normal stop leaves the child alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

REPO = Path(__file__).resolve().parents[2]
PARENT = r"""
import subprocess, sys, time
from stages.teacher import vllm_watchdog
before = vllm_watchdog.child_pids()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
dog = vllm_watchdog.watch(before)
print(child.pid, dog.pid, flush=True)
if sys.argv[1] == "stop":
    vllm_watchdog.stop(dog)
    print("stopped", flush=True)
time.sleep(120)
"""


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_parent(mode: str):
    proc = subprocess.Popen([sys.executable, "-c", PARENT, mode], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    child, dog = map(int, proc.stdout.readline().split())
    return proc, child, dog


def wait_until(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_children_die_with_a_sigkilled_parent():
    proc, child, dog = start_parent("watch")
    assert running(child) and running(dog)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert wait_until(lambda: not running(child)), "the child outlived its SIGKILLed parent"
    assert wait_until(lambda: not running(dog)), "the watchdog did not exit after its work"


def test_a_stopped_watchdog_kills_nothing():
    proc, child, dog = start_parent("stop")
    try:
        assert proc.stdout.readline().strip() == "stopped"
        assert wait_until(lambda: not running(dog))
        assert running(child)
    finally:
        proc.kill()
        proc.wait()
        os.kill(child, signal.SIGKILL)
