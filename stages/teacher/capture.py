"""Stage one: score the training data with the teacher and fill the cache, shard by shard.

Any number of workers run `run_capture` on one cache at once. Each:
1. opens the data as a RowSource (stages.rows: one indexing pass, nothing held
   in memory) and computes the cache identity (teacher, tokenizer, the data's
   content fingerprint and the settings that shape tokens, top_k, ...) and the
   shard plan (row ranges of `sequences_per_shard` rows), identical in every
   worker;
2. creates the cache or opens it, which refuses a different identity or plan;
3. claims unfinished shards through the cache's leases; for each, reads and
   tokenises only that shard's rows, scores them with the engine (started only
   once there is a shard to claim, so a rerun of a finished cache returns at
   once) and hands the scores to a background writer (shard_writer.py), so the
   engine scores the next shard while this one is built and committed. Every
   in-flight shard's lease is renewed by its own heartbeat until its commit.

A shard's content depends only on its rows and the engine, so a worker killed
at any moment leaves nothing behind but leases that expire; a rerun scores the
unfinished shards and the cache ends equal to an uninterrupted run's.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field

from stages import data as data_mod
from stages import split
from stages.data_config import DataConfig
from stages.errors import EngineError
from stages.progress import restart_clock, tqdm
from stages.teacher import provenance
from stages.teacher.config import CacheConfig, TeacherConfig
from stages.teacher.identity import cache_identity, check_teacher, explain_mismatch, refuse_legacy, shard_plan
from stages.teacher.shard_writer import (LOGPROB_FLOOR, Heartbeat, ScoredShard, ShardWriter,  # noqa: F401
                                         build_shard, engine_overlaps)
from storage.diff import changes
from storage.lease import default_worker_id, release_quietly


@dataclass
class CaptureSummary:
    cache: str
    engine: str = ""  # "" when no shard was left to claim
    engine_reason: str = ""
    shards_total: int = 0
    shards_skipped: int = 0  # already complete when this worker started
    shards_written: int = 0
    written_shards: list[int] = field(default_factory=list)
    shards_lost: int = 0  # lease taken over while scoring (another worker finished it)
    sequences: int = 0
    tokens: int = 0
    targets: int = 0
    seconds: float = 0.0  # wall time of run_capture (data loading and engine start-up included)
    busy_seconds: float = 0.0  # scoring + writing this worker's shards
    data: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.busy_seconds if self.busy_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _log(msg: str) -> None:
    print(f"[teacher] {msg}", file=sys.stderr, flush=True)


def expected_cache(data_cfg: DataConfig, teacher_cfg: TeacherConfig, cache_cfg: CacheConfig):
    """(identity, shard plan, log-prob encoding, source, tokenizer, vocab size) of a cache of this
    config: one indexing pass over the data, the teacher's tokenizer loaded, nothing written."""
    from storage.encoding import LogprobEncoding

    tokenizer, vocab_size = check_teacher(teacher_cfg)
    source = data_mod.open_source(data_cfg)
    rows = data_mod.num_rows(data_cfg, source)
    if rows == 0:
        raise data_mod.DataError(f"the dataset {data_cfg.path!r} has no rows; check data.path, data.split "
                                 "and data.limit")
    identity = cache_identity(data_cfg, teacher_cfg, tokenizer, source, vocab_size)
    plan = shard_plan(data_cfg, rows, cache_cfg.sequences_per_shard)
    if not plan:
        raise data_mod.DataError(f"the {data_cfg.holdout.part} part of {data_cfg.path!r} has no rows; "
                                 "raise its size in data.holdout")
    encoding = LogprobEncoding.from_config(cache_cfg.logprob_encoding, cache_cfg.logprob_step)
    return identity, plan, encoding, source, tokenizer, vocab_size


def check_cache(data_cfg: DataConfig, teacher_cfg: TeacherConfig, cache_cfg: CacheConfig) -> None:
    """Read-only (`atkd status`, --dry-run): CacheMismatchError, one `key: cache's -> config's` line per
    difference, when the cache at cache_cfg.path was built from another config."""
    from storage.cache import Cache, CacheMismatchError

    identity, plan, encoding, *_ = expected_cache(data_cfg, teacher_cfg, cache_cfg)
    refuse_legacy(cache_cfg.path)
    cache = Cache.open(cache_cfg.path)
    wanted = encoding.for_top_k(identity.get("top_k")).describe()
    if cache.manifest.logprob_encoding != wanted:
        raise CacheMismatchError(f"the cache at {cache.url} stores top-k log-probs otherwise than "
                                 f"cache.logprob_encoding / cache.logprob_step ask: "
                                 f"{'; '.join(changes(cache.manifest.logprob_encoding, wanted))}")
    try:
        cache.manifest.check_matches(identity, plan, cache.url)
    except CacheMismatchError as e:
        raise explain_mismatch(e, cache_cfg.path, identity) from None


def open_for_capture(data_cfg: DataConfig, teacher_cfg: TeacherConfig, cache_cfg: CacheConfig):
    """(cache, source, tokenizer, vocab_size): the data indexed, the cache created or checked."""
    from storage.cache import Cache, CacheMismatchError

    identity, plan, encoding, source, tokenizer, vocab_size = expected_cache(data_cfg, teacher_cfg, cache_cfg)
    refuse_legacy(cache_cfg.path)
    tasks = int(os.environ.get("SLURM_ARRAY_TASK_COUNT") or 1)
    refuse_unshared_cache(cache_cfg.path, tasks, f"a SLURM array of {tasks} tasks")
    if not Cache.exists(cache_cfg.path):
        _preflight(source, tokenizer, data_cfg, plan[0], data_mod.num_rows(data_cfg, source))
    try:
        cache = Cache.create_or_open(cache_cfg.path, identity, plan, logprob_encoding=encoding)
    except CacheMismatchError as e:
        raise explain_mismatch(e, cache_cfg.path, identity) from None
    cache.remove_stale_partials()  # killed writers' shard-N.zarr.partial-* (logged)
    return cache, source, tokenizer, vocab_size


def refuse_unshared_cache(url: str, writers: int, how: str) -> None:
    """Several workers on one cache claim shards through leases, which rest on an exclusive create
    that exactly one of them wins: refuse a backend that has none (storage/fs.py), before anything
    is written. `how`: the launcher, for the message (e.g. '2 teacher workers')."""
    from storage.errors import BackendError
    from storage.fs import CacheFS

    if writers <= 1:
        return
    problem = CacheFS(url).shared_writers_problem()
    if problem:
        raise BackendError(f"{how} cannot share the cache: {problem}. Run stage one there with one worker "
                           "(--workers 1, no --ray, no array), or put the cache on a local/NFS path or s3://")


def check_complete(data_cfg: DataConfig, teacher_cfg: TeacherConfig, cache_cfg: CacheConfig) -> None:
    """A complete cache compared with the config (CacheMismatchError naming the keys); its manifest
    brought up to date when a worker was killed between its last commit and the manifest update."""
    cache = open_for_capture(data_cfg, teacher_cfg, cache_cfg)[0]
    if cache.manifest.shards_done != cache.completed_shards():
        cache.refresh_manifest()


def _preflight(source, tokenizer, data_cfg: DataConfig, entry, num_rows: int) -> None:
    """Tokenise the first shard's rows before the cache exists, so wrong field names, a
    wrong kind or a max_seq_len that drops most rows fail before anything is written."""
    start, end = int(entry["row_start"]), int(entry["row_end"])
    indices, rows = split.read_part(data_cfg, source, num_rows, start, end)
    _, stats = data_mod.tokenize_rows(rows, tokenizer, data_cfg, start=start, locate=source.location,
                                      indices=indices)
    data_mod.check_dropped(stats, data_cfg, f"the first shard's {len(rows)} rows")


def run_capture(data_cfg: DataConfig, teacher_cfg: TeacherConfig, cache_cfg: CacheConfig, *, progress: bool = True,
                engine=None, on_start=None) -> CaptureSummary:
    """Fill the cache at cache_cfg.path with the teacher's top-k (see module doc).

    `engine`: an already started engine to use (tests, benchmarks); by default
    one is made from teacher_cfg when the first shard is claimed, and closed
    at the end. `on_start`: called once the cache is checked (or created), before any shard
    is scored (the pipeline records the run's config then).
    """
    t_start = time.perf_counter()
    cache, source, tokenizer, vocab_size = open_for_capture(data_cfg, teacher_cfg, cache_cfg)
    if on_start is not None:
        on_start()
    plan = cache.manifest.shard_plan
    summary = CaptureSummary(cache=str(cache_cfg.path), shards_total=len(plan))
    done_at_start = set(cache.completed_shards())
    summary.shards_skipped = len(done_at_start)
    worker_id = teacher_cfg.worker_id or default_worker_id()
    own_engine = engine is None
    bar = _progress_bar(progress, len(plan), len(done_at_start))
    stats_total = data_mod.DataStats()
    t_first = None

    def get_engine():
        """The engine, started on the first shard to score (or the one passed in), checked once."""
        nonlocal engine
        if summary.engine:
            return engine
        nonlocal t_first
        if engine is None:
            from stages.teacher.engines import make_engine

            engine = make_engine(teacher_cfg, max_seq_len=data_cfg.max_seq_len)
            t_first = time.perf_counter()  # the rate is the scoring's, not the engine start-up's
            restart_clock(bar)
        if engine.vocab_size != vocab_size:
            raise EngineError(f"engine vocabulary {engine.vocab_size} != model config vocab_size {vocab_size}")
        summary.engine = engine.name
        summary.engine_reason = getattr(engine, "choice_reason", "")
        provenance.record_start(cache, teacher_cfg, engine)
        overlap = teacher_cfg.overlap_writes
        writer.overlap = engine_overlaps(engine) if overlap == "auto" else overlap
        return engine

    def on_commit(shard: ScoredShard) -> None:
        summary.shards_written += 1
        summary.written_shards.append(shard.lease.shard_index)
        data = shard.attrs["data"]
        summary.sequences += data["examples"]
        summary.tokens += data["tokens"]
        summary.targets += data["targets"]
        summary.busy_seconds = time.perf_counter() - t_first
        if bar is not None:
            bar.n = len(cache.completed_shards())  # all workers' progress, so the ETA is the cache's
            bar.set_postfix_str(f"{summary.tokens_per_second:,.0f} tok/s (this worker)")
            bar.refresh()

    def on_lost(shard: ScoredShard, error) -> None:
        summary.shards_lost += 1
        _log(f"shard {shard.lease.shard_index}: {error}")

    top_k = int(cache.manifest.identity["top_k"])  # 0 for sampled targets
    sampler = _sampler(cache.manifest.identity)
    writer = ShardWriter(cache, top_k, on_commit=on_commit, on_lost=on_lost)
    failed = True
    try:
        while True:
            lease = cache.claim_shard(worker_id, teacher_cfg.lease_seconds)
            if lease is None:
                if writer.busy:  # our own shards are still being written: let them land first
                    writer.drain()
                    continue
                if not _wait_for_others(cache, teacher_cfg.lease_seconds, bar):
                    break
                continue
            t_first = t_first or time.perf_counter()
            beat = Heartbeat(lease, teacher_cfg.lease_seconds)
            try:
                shard = _score_shard(lease, beat, plan[lease.shard_index], source, tokenizer, data_cfg,
                                     top_k, get_engine, data_mod.num_rows(data_cfg, source), sampler)
            except BaseException:
                beat.stop()
                release_quietly(lease)  # let another worker take the shard at once
                raise
            stats_total.add(data_mod.DataStats(**shard.attrs["data"]))
            writer.submit(shard)
        writer.close()
        failed = False
    finally:
        if failed:
            writer.close(abandon=True)
        if bar is not None:
            bar.close()
        if own_engine and engine is not None:
            engine.close()
    if summary.shards_written:
        provenance.record_end(cache)
    if cache.manifest.shards_done != cache.completed_shards():
        cache.refresh_manifest()  # e.g. a worker was killed between its last commit and the manifest update
    summary.seconds = time.perf_counter() - t_start
    summary.data = stats_total.as_dict()
    if stats_total.rows:
        _log(f"data: {stats_total.summary()}")
    if stats_total.dropped:
        st = stats_total
        _log(f"WARNING: {st.dropped:,} of {st.rows:,} rows ({st.dropped / st.rows:.1%}) were dropped "
             f"({st.skipped_overlong:,} over-long, {st.skipped_bad:,} bad); first reasons: "
             + "; ".join(st.reasons[:3]))
    _log(
        f"worker {worker_id}: wrote {summary.shards_written} shard(s) ({summary.tokens:,} tokens, "
        f"{summary.tokens_per_second:,.0f} tok/s), {summary.shards_skipped} were already done, "
        f"{len(cache.completed_shards())}/{len(plan)} complete"
    )
    return summary


def _sampler(identity: dict):
    """The seeded sampler of a cache with sampled targets (None for top-k only): its key is
    the cache identity's, so every worker and every rerun draws the same (sampling.py)."""
    from storage.schema import has_samples, targets_of

    if not has_samples(targets_of(identity)):
        return None
    from stages.teacher.sampling import Sampler, cache_key

    return Sampler(cache_key(identity), int(identity["samples"]))


def _score_shard(lease, beat, entry, source, tokenizer, data_cfg: DataConfig, top_k: int, get_engine,
                 num_rows: int, sampler=None) -> ScoredShard:
    """Read and tokenise one shard's rows, check what was dropped, score them."""
    start, end = int(entry["row_start"]), int(entry["row_end"])
    indices, part_rows = split.read_part(data_cfg, source, num_rows, start, end)
    examples, stats = data_mod.tokenize_rows(part_rows, tokenizer, data_cfg, start=start, locate=source.location,
                                             indices=indices)
    data_mod.check_dropped(stats, data_cfg, f"shard {lease.shard_index} (rows {start}-{end - 1})")
    if not examples:
        rows = []
    elif sampler is None:
        rows = get_engine().score(examples, top_k)
    else:
        rows = get_engine().score(examples, top_k, sampler=sampler)
    beat.raise_if_lost()
    attrs = {"data": stats.as_dict(), "rows": [start, end]}
    if data_cfg.holdout is not None:  # data.rows counts the part's rows in the range; the rest are held out
        attrs["held_out"] = (end - start) - len(part_rows)
    return ScoredShard(lease=lease, heartbeat=beat, examples=examples, rows=rows, attrs=attrs)


def _wait_for_others(cache, lease_seconds: float, bar) -> bool:
    """Nothing claimable: False when every shard is complete; otherwise wait a
    little (shards leased by live workers, or by dead ones whose leases will
    expire) and return True to try again. So one rerun always finishes the cache."""
    done = cache.completed_shards()
    if len(done) == cache.num_shards:
        return False
    if bar is not None:
        bar.n = len(done)
        bar.set_postfix_str(f"waiting for {cache.num_shards - len(done)} shard(s) leased by other workers")
        bar.refresh()
    if not getattr(cache, "_atkd_wait_logged", False):
        cache._atkd_wait_logged = True
        _log(f"{cache.num_shards - len(done)} shard(s) are leased by other workers; waiting until they are "
             f"written or their leases expire (teacher.lease_seconds={lease_seconds:g})")
    time.sleep(min(5.0, max(lease_seconds / 4.0, 0.1)))
    return True


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None

    return tqdm(total=total, initial=initial, unit="shard", desc="teacher", file=sys.stderr, dynamic_ncols=True)
