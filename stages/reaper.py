"""Processes a command starts die with it, even when the command is killed with SIGKILL.

vLLM runs its engine core (`VLLM::EngineCore`) and workers in processes of their
own, `--workers N` starts N teacher processes, DataLoader workers and torchrun
start more. A command killed with SIGKILL cannot stop them, and they keep
gigabytes of RAM or the GPU. So the `atkd` command (and `python -m pipeline`)
first starts a watchdog when it may start processes (`start()`, from
pipeline/cli.py; not when Python code calls `cli.main(argv)` in a process of its own),
and so does each vLLM engine for the process that starts it (stages/teacher/engine_vllm.py:
a `--workers` child killed on its own, or a library caller, leaves no engine behind):

- the command's environment gets a token of its own (`ATKD_RUN_TOKENS`, after
  an outer command's), which every process it execs inherits;
- the watchdog is a small separate process in a session of its own (a Ctrl-C
  in the terminal does not reach it). Every 0.2 s it checks that the command
  is alive and notes the command's descendants (pid and start time, from /proc):
  that also covers children forked without exec, whose /proc environ does not
  show a token set after the command started;
- when the command is gone, it gives what it left half a second to end by
  itself (multiprocessing's resource tracker cleans up then), and stops every
  process that carries the token (/proc/<pid>/environ) or that it saw
  descending from the command and that still runs (same start time): SIGTERM,
  SIGKILL after 2 s, and says so on stderr. A command that ends normally
  (Ctrl-C included: its engines were closed on the way out) says so
  (`Reaper.stop()`) and the watchdog does the same once the process has exited.
  A guard over one thing that ended cleanly while the process goes on (an engine
  shut down) is called off with `Reaper.cancel()`: its watchdog exits at once.

Linux only (it reads /proc); elsewhere `start()` returns None and nothing changes.
This file runs as the watchdog's script too (`python reaper.py PID TOKEN`),
importing nothing of the project.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid

ENV = "ATKD_RUN_TOKENS"
POLL_SECONDS = 0.2
GRACE_SECONDS = 2.0


class Reaper:
    """The running watchdog of one command; `stop()` when the command ends normally."""

    def __init__(self, proc: subprocess.Popen, saved_env: str | None) -> None:
        self.proc, self._saved = proc, saved_env

    def stop(self) -> None:
        """The command ends normally: the watchdog checks for leftovers once this process has exited."""
        self._tell(b"done\n")

    def cancel(self) -> None:
        """What this guard covers ended cleanly and the process goes on: the watchdog exits now."""
        self._tell(b"cancel\n")
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _tell(self, message: bytes) -> None:
        try:
            self.proc.stdin.write(message)
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass  # it acts on its own once this process is gone
        if self._saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = self._saved


def start() -> Reaper | None:
    """Start the watchdog of this process (module doc); None where /proc is not there."""
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"):
        return None
    token = uuid.uuid4().hex
    saved = os.environ.get(ENV)
    env = dict(os.environ)  # the watchdog carries the outer tokens, not its own
    proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), token],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, start_new_session=True,
                            close_fds=True)
    os.environ[ENV] = f"{saved},{token}" if saved else token
    return Reaper(proc, saved)


# ---------------------------------------------------------------- the watchdog (its own process)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a running process; None when it is gone (or a zombie
    waiting to be reaped: it holds nothing any more)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid ... starttime (field 22)
    return None if fields[0] in ("Z", "X") else (int(fields[1]), int(fields[19]))


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _carries(pid: int, token: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:  # gone, or another user's
        return False
    for entry in env.split(b"\0"):
        if entry.startswith(ENV.encode() + b"="):
            return token.encode() in entry.split(b"=", 1)[1].split(b",")
    return False


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _descendants(root: int, since: int, seen: dict[int, int]) -> None:
    """Add the running descendants of `root` started at or after `since` (clock ticks) to `seen`."""
    stats = {pid: st for pid in _pids() if (st := _stat(pid)) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if stats[pid][1] >= since and pid != os.getpid():
            seen[pid] = stats[pid][1]
        todo += children.get(pid, [])
    for pid in [p for p, started in seen.items() if stats.get(p, (0, -1))[1] != started]:
        del seen[pid]  # gone (or its pid reused)


def _leftovers(token: str, seen: dict[int, int]) -> list[int]:
    me = os.getpid()
    found = {pid for pid in _pids() if pid != me and _carries(pid, token) and _stat(pid) is not None}
    found |= {pid for pid, started in seen.items() if (st := _stat(pid)) is not None and st[1] == started}
    return sorted(found - {me})


def _stop_all(pids: list[int]) -> list[int]:
    """SIGTERM, then SIGKILL what is still there after GRACE_SECONDS; the pids that were running."""
    hit = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            hit.append(pid)
        except OSError:
            pass
    deadline = time.monotonic() + GRACE_SECONDS
    while hit and time.monotonic() < deadline and any(_stat(p) is not None for p in hit):
        time.sleep(0.05)
    for pid in hit:
        if _stat(pid) is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return hit


def watch(parent: int, token: str) -> None:
    """Wait for `parent` to be gone, then stop what it left (module doc)."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # only the end of `parent` ends this process
    own = _stat(os.getpid())
    since = own[1] if own else 0
    seen: dict[int, int] = {}
    normal, open_stdin = False, True
    stdin = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
    while os.getppid() == parent:
        _descendants(parent, since, seen)
        if open_stdin and select.select([stdin], [], [], POLL_SECONDS)[0]:
            data = os.read(stdin.fileno(), 64)
            if b"cancel" in data:
                return  # the guarded work ended cleanly; the process goes on
            normal = normal or b"done" in data
            open_stdin = bool(data)  # closed: keep polling the parent
        else:
            time.sleep(0 if open_stdin else POLL_SECONDS)
    time.sleep(0.5)  # what ends by itself once the command is gone (resource trackers) may do so first
    for _ in range(3):  # a process may start another while stopping: look again
        pids = _leftovers(token, seen)
        if not pids:
            break
        names = {pid: _name(pid) for pid in pids}
        hit = _stop_all(pids)
        if hit:
            what = "ended" if normal else "was killed"
            print(f"[atkd] the command (pid {parent}) {what}; stopped {len(hit)} process(es) it had started: "
                  + ", ".join(f"{names[p]} (pid {p})" for p in hit), file=sys.stderr, flush=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
