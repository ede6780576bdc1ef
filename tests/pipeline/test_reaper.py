"""Processes a command starts die with it (stages/reaper.py; issue 23, item 5).

A command killed with SIGKILL cannot stop what it started: vLLM's engine core and workers kept gigabytes of
RAM (or the GPU) for minutes. Every process of a run is found here by a marker the test puts into the
command's environment (inherited by everything it starts, forked or exec'd), and must be gone a few seconds
after the command is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support import harness as fh
from tests.support.fixtures import prompt_response_rows, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")]

REPO = Path(__file__).resolve().parents[2]
MARK = "ATKD_TEST_MARK"


def marked(mark: str) -> dict[int, str]:
    """pid -> name of every running process whose environment carries the marker."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{name}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if f"{MARK}={mark}".encode() in env and state not in (b"Z", b"X"):
            found[int(name)] = comm
    return found


def gone_within(mark: str, seconds: float) -> dict[int, str]:
    """Wait up to `seconds` for every marked process to end; what is left (then killed, not to leak)."""
    deadline = time.monotonic() + seconds
    while marked(mark) and time.monotonic() < deadline:
        time.sleep(0.25)
    left = marked(mark)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


FAKE_COMMAND = """
import os, subprocess, sys, time
from stages.reaper import start
reaper = start()
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])           # exec'd: carries the token
if os.fork() == 0:                                                                  # forked, no exec
    time.sleep(300); os._exit(0)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                 start_new_session=True)                                            # left the process group
print("started", flush=True)
sys.stdin.readline()  # the test has looked: end normally (a SIGKILL comes first otherwise)
reaper.stop()  # what still carries the token is stopped
os._exit(0)
"""


@pytest.mark.parametrize("how", ["sigkill", "end"])
def test_what_a_command_started_dies_with_it(how):
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", FAKE_COMMAND], cwd=REPO, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 20
    while len(marked(mark)) < 5 and time.monotonic() < deadline:  # the command, its watchdog, three children
        time.sleep(0.2)
    assert len(marked(mark)) == 5, marked(mark)
    time.sleep(1.0)  # the watchdog has seen the descendants
    if how == "sigkill":
        proc.kill()
    else:
        proc.stdin.write("end\n")
        proc.stdin.flush()
    proc.wait(timeout=30)
    left = gone_within(mark, 8)
    assert left == {}, f"processes outlived the command: {left}"
    assert "stopped" in proc.stderr.read()


GUARD = """
import subprocess, sys, time
from stages.reaper import start
guard = start()  # as a vLLM engine does around its start-up, in a process that goes on afterwards
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(child.pid, guard.proc.pid, flush=True)
if sys.argv[1] == "cancel":
    guard.cancel()  # the engine shut down cleanly: the watchdog leaves at once, killing nothing
    print("cancelled", flush=True)
time.sleep(300)
"""


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


@pytest.mark.parametrize("how", ["sigkill", "cancel"])
def test_an_engine_guard_kills_on_death_and_leaves_on_cancel(how):
    proc = subprocess.Popen([sys.executable, "-c", GUARD, how], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    child, dog = map(int, proc.stdout.readline().split())
    try:
        if how == "sigkill":
            time.sleep(1.0)  # the watchdog has seen the child
            proc.kill()
            proc.wait()
            deadline = time.monotonic() + 10
            while (running(child) or running(dog)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not running(child), "the child outlived its SIGKILLed parent"
            assert not running(dog), "the watchdog did not exit after its work"
        else:
            assert proc.stdout.readline().strip() == "cancelled"
            assert not running(dog), "cancel() returned before the watchdog left"
            time.sleep(1.0)
            assert running(child), "a cancelled guard killed what it had guarded"
    finally:
        proc.kill()
        proc.wait()
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass


# ---------------------------------------------------------------- the vLLM engine of `atkd teacher`


def vllm_run(tmp_path: Path, model: str) -> tuple[subprocess.Popen, str, Path]:
    """`atkd teacher` (vLLM backend) on enough rows to still be scoring when it is stopped."""
    data = write_jsonl(tmp_path / "big.jsonl", prompt_response_rows(3000))
    cfg = fh.write_config(tmp_path / "cfg.yaml", model=model, data=str(data), run_dir=str(tmp_path / "run"),
                          cache=str(tmp_path / "run" / "cache"), sequences_per_shard=10,
                          extra={"teacher": {"model": model, "backend": "vllm", "top_k": 8, "dtype": "float32",
                                             "gpu_memory_utilization": 0.3, "enforce_eager": True}})
    mark = uuid.uuid4().hex
    env = {**os.environ, **fh.BASE_ENV, MARK: mark, "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "atkd.log", "w")
    # SIGINT at its default, as in a terminal: a suite started in the background (`pytest ... &` from a
    # script) hands its children SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "teacher", str(cfg)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = tmp_path / "run" / "cache" / "shards" / "shard-00000.zarr"
    deadline = time.monotonic() + 500
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, (tmp_path / "atkd.log").read_text()[-3000:]
    assert first.exists(), "no shard within 500 s"
    assert any(name.startswith("VLLM") for name in marked(mark).values()), marked(mark)
    return proc, mark, tmp_path / "atkd.log"


@pytest.mark.vllm
@pytest.mark.parametrize("how", ["sigkill", "ctrl-c"])
def test_a_killed_teacher_leaves_no_vllm_engine_behind(tmp_path, tiny_llama_dir, how):
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    proc, mark, log = vllm_run(tmp_path, str(tiny_llama_dir))
    if how == "sigkill":
        proc.kill()
    else:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:  # a failing test leaves nothing running either
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    left = gone_within(mark, 10)
    assert left == {}, f"processes outlived `atkd teacher` by 10 s: {left}"
    text = log.read_text()
    if how == "sigkill":
        assert rc == -signal.SIGKILL and "was killed; stopped" in text and "VLLM::EngineCor" in text
    else:
        assert rc == 130 and "interrupted; rerun the same command to continue" in text, text[-3000:]
