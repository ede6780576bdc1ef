"""`atkd teacher cfg.yaml --ray [ADDRESS]`: stage one's workers as Ray actors on a Ray cluster.

Ray only places processes. Each actor is one teacher worker running the same loop
as `atkd teacher` (stages.teacher.capture.run_capture): it claims shards through
the cache's leases, so the actors, independently started workers and a SLURM
array can all share one cache, and a dead actor's shard is taken over like any
dead worker's. There is no scheduler here beyond that.

- One actor per worker (`--workers N`; `auto`: one per `tensor_parallel_size x
  pipeline_parallel_size` GPUs of the cluster, one on a cluster without GPUs),
  each reserving that many GPUs (`num_gpus`), or as many CPUs on a CPU-only cluster.
- ADDRESS is a Ray address (`ray://host:10001`, `host:6379`, `auto`); without it
  Ray's own rule applies (RAY_ADDRESS, else a local cluster for this command).
- One progress line for the cache (stages/teacher/progress.py), as with --workers.
- An actor that dies (killed, OOM, node lost) is restarted by Ray (`max_restarts` =
  teacher.max_restarts) and resumes claiming shards; one that dies more often than
  that fails the command with its last log lines. An error the worker raises
  itself (bad data, a full disk) fails the command at once, as with --workers.
- Each actor writes its output to `<run_dir>/logs/teacher-worker-<i>.log` on its
  node (restarts append), which is where the last lines come from: keep run_dir on
  a filesystem the nodes share to see them from the driver.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pipeline.workers import WorkerCountError, WorkerError, _tail

_POLL_SECONDS = 0.5


class TeacherWorker:
    """One stage-one worker inside a Ray actor (made remote in run_ray_workers)."""

    def __init__(self, index: int, log_path: str) -> None:
        self.index = index
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)  # the engine's own processes inherit these too
        os.dup2(fd, 2)
        os.close(fd)
        print(f"[teacher] worker {index} (Ray actor, pid {os.getpid()}) started", flush=True)

    def run(self, cfg) -> dict:
        from stages.teacher.capture import run_capture
        from storage.fs import register_storage_options

        register_storage_options(cfg.cache.path, cfg.cache.storage_options)
        print(f"[teacher] worker {self.index} (pid {os.getpid()}) starting on {cfg.cache.path}", flush=True)
        try:
            return run_capture(cfg.data, cfg.teacher, cfg.cache, progress=False).as_dict()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def actor_resources(teacher_cfg, cluster: dict) -> dict:
    """Ray resources of one worker: tp x pp GPUs, or as many CPUs on a cluster without GPUs."""
    per_worker = max(1, int(teacher_cfg.tensor_parallel_size) * int(teacher_cfg.pipeline_parallel_size))
    if cluster.get("GPU", 0) > 0:
        return {"num_gpus": per_worker, "num_cpus": 1}
    return {"num_cpus": per_worker}


def resolve_actors(requested, teacher_cfg, cluster: dict) -> int:
    """The number of actors: N, or auto = the cluster's GPUs / (tp x pp) (1 without GPUs)."""
    per_worker = max(1, int(teacher_cfg.tensor_parallel_size) * int(teacher_cfg.pipeline_parallel_size))
    gpus = int(cluster.get("GPU", 0))
    n = max(1, gpus // per_worker) if requested == "auto" else int(requested)
    if n < 1:
        raise WorkerCountError(f"teacher workers: must be >= 1 or auto, got {requested!r}")
    if gpus and n * per_worker > gpus:
        raise WorkerCountError(f"{n} teacher workers x {per_worker} GPUs each need {n * per_worker} GPUs, but the "
                               f"Ray cluster has {gpus}; use --workers {max(1, gpus // per_worker)} or auto")
    return n


def run_ray_workers(cfg, requested, address: str | None, *, progress: bool = True) -> None:
    """Run stage one over the training data with one Ray actor per worker (see the module doc)."""
    try:
        import ray
    except ImportError:
        from stages.errors import LaunchError

        raise LaunchError("atkd teacher --ray needs Ray: pip install 'atkd[ray]' (on every node of the "
                          "cluster, with the same atkd)") from None
    from stages.teacher.capture import refuse_unshared_cache
    from stages.teacher.progress import CacheProgress

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address or None, log_to_driver=False, logging_level="ERROR")
    cluster = ray.cluster_resources()
    n = resolve_actors(requested, cfg.teacher, cluster)
    refuse_unshared_cache(cfg.cache.path, n, f"{n} Ray teacher workers")
    restarts = int(cfg.teacher.max_restarts)
    logs = Path(cfg.run_dir) / "logs"
    resources = actor_resources(cfg.teacher, cluster)
    where = ", ".join(f"{k.removeprefix('num_')} {v}" for k, v in resources.items())
    print(f"[teacher] Ray cluster {ray.get_runtime_context().gcs_address}: {n} actor(s), each {where}, "
          f"restarted up to {restarts} times; logs {logs}/teacher-worker-<i>.log", file=sys.stderr, flush=True)
    actor_class = ray.remote(max_restarts=restarts, max_task_retries=0)(TeacherWorker)
    # The driver's own atkd settings (ATKD_DEBUG, the fault-injection points) reach the actors as they
    # reach --workers processes; nothing else of this environment does (no credentials into Ray's records).
    env = {k: v for k, v in os.environ.items() if k.startswith("ATKD_")}
    options = {**resources, **({"runtime_env": {"env_vars": env}} if env else {})}
    actors = [actor_class.options(**options).remote(i, str(logs / f"teacher-worker-{i}.log")) for i in range(n)]
    bar = CacheProgress(cfg.cache.path, enabled=progress)
    try:
        _watch(ray, actors, cfg, restarts, logs, bar)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started_here:
            ray.shutdown()


def _watch(ray, actors, cfg, restarts: int, logs: Path, bar) -> None:
    """Wait for every actor's run; resubmit it after a death Ray restarts; raise on a failure."""
    from ray.exceptions import RayActorError

    pending = {actor.run.remote(cfg): i for i, actor in enumerate(actors)}
    deaths = [0] * len(actors)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=_POLL_SECONDS)
        bar.update()
        for ref in ready:
            i = pending.pop(ref)
            log = logs / f"teacher-worker-{i}.log"
            try:
                ray.get(ref)
            except RayActorError as e:  # the process died (killed, OOM, node lost): Ray restarts it
                deaths[i] += 1
                if deaths[i] > restarts:
                    raise WorkerError(f"teacher worker {i} (Ray actor) died {deaths[i]} times, more than "
                                      f"teacher.max_restarts={restarts}; its last lines:\n{_tail(log)}\nfull log: "
                                      f"{log} (on its node); committed shards are kept, rerun the same command "
                                      "to continue") from None
                reason = " ".join(str(e).split())[:160]
                print(f"[teacher] worker {i} (Ray actor) died ({reason}); restart {deaths[i]} of {restarts}",
                      file=sys.stderr, flush=True)
                time.sleep(0.2)
                pending[actors[i].run.remote(cfg)] = i
            except Exception as e:  # the worker raised: bad data, a full disk, ... (as with --workers)
                cause = getattr(e, "cause", None) or e
                raise WorkerError(f"teacher worker {i} (Ray actor) failed: {type(cause).__name__}: "
                                  f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}\n"
                                  f"{_tail(log)}\nfull log: {log}; committed shards are kept, rerun the same "
                                  "command to continue") from None
    bar.update()
