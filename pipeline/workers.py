"""`atkd teacher --workers N`: one command for a whole node.

The parent starts N worker processes (`python -m pipeline.workers CONFIG`),
each pinned to its own group of `tensor_parallel_size x pipeline_parallel_size`
GPUs through CUDA_VISIBLE_DEVICES, on the same cache. They split the shard plan
by leases exactly like independently started workers (so a dead worker's shard
is taken over, and more nodes may join with the same command). The parent
shows one progress line for the cache (shards, tok/s, ETA) from the shards'
own attributes, fails with a worker's error when any worker fails (stopping the
others), and stops them all on Ctrl-C. Each worker's output goes to
`<run_dir>/logs/teacher-worker-<i>.log`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stages.teacher.config import TeacherConfig
from storage.errors import AtkdError

_POLL_SECONDS = 0.5


class WorkerError(AtkdError, RuntimeError):
    """A teacher worker process failed; the message carries its last lines."""


class WorkerCountError(AtkdError, ValueError):
    """The number of teacher workers asked for cannot run here (below 1, or more GPUs than are visible)."""


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES, else every GPU torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def resolve_workers(requested, teacher_cfg: TeacherConfig) -> tuple[int, list[list[str]]]:
    """(number of workers, the GPU ids of each; empty lists on a CPU machine).

    "auto": one worker per group of tensor_parallel_size x pipeline_parallel_size
    visible GPUs (one worker on a machine without GPUs).
    """
    per_worker = max(1, int(teacher_cfg.tensor_parallel_size) * int(teacher_cfg.pipeline_parallel_size))
    gpus = visible_gpus()
    if requested == "auto":
        n = max(1, len(gpus) // per_worker)
    else:
        n = int(requested)
        if n < 1:
            raise WorkerCountError(f"teacher workers: must be >= 1 or auto, got {requested!r}")
    if not gpus:
        return n, [[] for _ in range(n)]
    if n * per_worker > len(gpus):
        raise WorkerCountError(f"{n} teacher workers x {per_worker} GPUs each (tensor x pipeline parallel) need "
                               f"{n * per_worker} GPUs, but {len(gpus)} are visible ({','.join(gpus)}); use "
                               f"--workers {max(1, len(gpus) // per_worker)} or auto")
    return n, [gpus[i * per_worker:(i + 1) * per_worker] for i in range(n)]


def _worker_env(gpus: list[str], n: int) -> dict[str, str]:
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    elif "OMP_NUM_THREADS" not in env:  # CPU workers share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_workers(cfg, n: int, gpu_groups: list[list[str]], *, progress: bool = True) -> None:
    """Run stage one over the training data with n worker processes (see module doc)."""
    import copy

    from pipeline.config import save_resolved

    logs = Path(cfg.run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec = logs / "teacher-workers.yaml"  # the resolved config every worker loads
    one = copy.deepcopy(cfg)
    one.teacher.num_workers = 1
    save_resolved(one, spec)
    procs = []
    for i in range(n):
        log = open(logs / f"teacher-worker-{i}.log", "w")
        cmd = [sys.executable, "-m", "pipeline.workers", str(spec), str(i)]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_worker_env(gpu_groups[i], n)),
                      log))
        where = f"GPUs {','.join(gpu_groups[i])}" if gpu_groups[i] else "CPU"
        print(f"[teacher] worker {i}: pid {procs[-1][0].pid} on {where}, log {log.name}", file=sys.stderr)
    try:
        _watch(cfg.cache.path, procs, logs, progress)
    except BaseException:
        _stop(procs)
        raise
    finally:
        for _, log in procs:
            log.close()


def _watch(cache_url: str, procs, logs: Path, progress: bool) -> None:
    """Wait for every worker; show the cache's progress; raise on the first failure."""
    from stages.teacher.progress import CacheProgress

    bar = CacheProgress(cache_url, enabled=progress)
    try:
        while True:
            bar.update()
            codes = [p.poll() for p, _ in procs]
            for i, code in enumerate(codes):
                if code not in (None, 0):
                    _stop(procs)
                    raise WorkerError(f"teacher worker {i} failed (exit code {code}):\n"
                                      + _tail(logs / f"teacher-worker-{i}.log")
                                      + f"\nfull log: {logs / f'teacher-worker-{i}.log'}; committed shards are "
                                        "kept, rerun the same command to continue")
            if all(code == 0 for code in codes):
                bar.update()
                return
            time.sleep(_POLL_SECONDS)
    finally:
        bar.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("  | " + line for line in text[-lines:])


def _stop(procs, grace_seconds: float = 10.0) -> None:
    for p, _ in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for p, _ in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    """A worker: stage one over the training data of the config, no progress bar."""
    from pipeline.config import load_config
    from stages.teacher.capture import run_capture

    argv = sys.argv[1:] if argv is None else argv
    config, index = argv[0], int(argv[1])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run finally blocks: release leases
    cfg = load_config(config)
    print(f"[teacher] worker {index} (pid {os.getpid()}) starting on {cfg.cache.path}", flush=True)
    run_capture(cfg.data, cfg.teacher, cfg.cache, progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
