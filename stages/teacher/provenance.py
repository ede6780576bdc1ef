"""What stage one records in the cache manifest's provenance (never part of its identity).

    teacher_model   the teacher's absolute path, or its hub id
    engine          vllm / transformers, its version and description (device, dtype, parallelism)
    engine_route    vLLM only: hidden (hidden states, head applied by atkd) or logprobs, and why
    dtype           teacher.dtype as configured
    hosts           every host whose worker wrote shards
    started_at      when the first worker started scoring (seconds since the epoch)
    finished_at     when a worker committed the last missing shard

capture.py calls `record_start` once its engine is up and `record_end` after
its loop; both are cheap and idempotent.
"""

from __future__ import annotations

import importlib
import os
import socket
import time

from stages.teacher.config import TeacherConfig
from storage.manifest import read_manifest


def engine_version(name: str) -> str:
    try:
        return str(getattr(importlib.import_module(name), "__version__", "unknown"))
    except Exception:  # not importable here: still record the rest
        return "unknown"


def teacher_location(model: str) -> str:
    local = os.path.expanduser(model)
    return os.path.abspath(local) if os.path.isdir(local) else model


def record_start(cache, teacher_cfg: TeacherConfig, engine) -> None:
    """Once per worker and cache: teacher, engine, dtype, this host; started_at if nobody set it."""
    if getattr(cache, "_atkd_provenance_started", False):
        return
    cache._atkd_provenance_started = True
    known = read_manifest(cache.fs).provenance  # what other workers recorded meanwhile
    host = socket.gethostname()
    cache.update_provenance({
        "teacher_model": teacher_location(teacher_cfg.model),
        "engine": getattr(engine, "name", type(engine).__name__),
        "engine_version": engine_version(getattr(engine, "name", "")),
        "engine_description": getattr(engine, "description", ""),
        "dtype": teacher_cfg.dtype,
        **({"engine_route": f"{engine.route} ({getattr(engine, 'choice_reason', '')})"}
           if getattr(engine, "route", None) else {}),
        "hosts": sorted(set(known.get("hosts", [])) | {host}),
        "started_at": known.get("started_at", time.time()),
    })


def record_end(cache) -> None:
    """finished_at, once the cache is complete (call only from a worker that wrote shards)."""
    if cache.is_complete() and "finished_at" not in cache.manifest.provenance:
        cache.update_provenance({"finished_at": time.time()})
