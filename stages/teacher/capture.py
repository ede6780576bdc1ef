"""Stage one: score the training data with the teacher and fill the cache, shard by shard.

Any number of workers run `run_capture` on one cache at once. Each:
1. loads and tokenises the data (stages.data) and computes the cache identity
   (teacher, tokenizer, data fingerprints, top_k, template, ...) and the shard
   plan (examples in order, `sequences_per_shard` per shard);
2. creates the cache or opens it, which refuses a different identity/plan;
3. claims unfinished shards through the cache's leases, scores each with the
   engine (started only once there is a shard to claim, so a rerun of a
   finished cache returns at once), and commits it atomically; a heartbeat
   thread renews the lease while the engine works.

A shard's content depends only on its examples and the engine, so a worker
killed at any moment leaves nothing behind but a lease that expires; a rerun
scores the unfinished shards and the cache ends equal to an uninterrupted run's.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from stages import data as data_mod
from stages.teacher import provenance
from stages.fingerprint import (
    data_fingerprint,
    describe_tokenizer_difference,
    model_fingerprint,
    tokenizer_fingerprint,
    tokenizer_info,
    tokenizer_summary,
)

# float16 cannot hold -inf-like values from masked vocab entries; the storage
# validator refuses non-finite log-probs. exp(-1e4) is 0 in any precision.
LOGPROB_FLOOR = -1.0e4


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


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _looks_local(model: str) -> bool:
    return os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1


def load_tokenizer(model: str, trust_remote_code: bool = False):
    """The teacher's tokenizer; a missing directory or tokenizer is a clear error naming teacher.model."""
    from transformers import AutoTokenizer

    if _looks_local(model) and not os.path.isdir(os.path.expanduser(model)):
        raise ValueError(f"teacher.model {model!r}: no such directory; set teacher.model to the teacher's "
                         "model directory (saved with save_pretrained) or a hub name")
    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, ... with long messages
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"teacher.model {model!r}: cannot load its tokenizer ({type(e).__name__}: {first}). The directory "
            "needs the tokenizer files (tokenizer.json / tokenizer_config.json): save them next to the model "
            "with tokenizer.save_pretrained(...)"
        ) from None


def model_vocab_size(model: str, trust_remote_code: bool = False) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and hasattr(config, "get_text_config"):
        vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is None:
        raise ValueError(f"teacher.model {model!r}: its config has no vocab_size")
    return int(vocab)


def cache_identity(data_cfg, teacher_cfg, tokenizer, examples, vocab_size: int) -> dict:
    """Everything that decides the cache's content; a rerun must match it key by key."""
    info = tokenizer_info(tokenizer)
    identity = {
        "teacher": os.path.basename(os.path.normpath(teacher_cfg.model)),
        "teacher_fingerprint": model_fingerprint(teacher_cfg.model),
        "tokenizer_fingerprint": tokenizer_fingerprint(info),
        "tokenizer_info": tokenizer_summary(info),  # what describe_tokenizer_difference needs
        "vocab_size": vocab_size,
        "top_k": int(teacher_cfg.top_k),
        "data_kind": data_cfg.kind,
        "template": data_cfg.template if data_cfg.kind == "prompt_response" else None,
        "chat_template": (getattr(tokenizer, "chat_template", None) or data_mod.BUILTIN_CHAT_TEMPLATE)
        if data_cfg.kind == "messages"
        else None,
        "max_seq_len": int(data_cfg.max_seq_len),
        "overlong": data_cfg.overlong,
        "data_fingerprint": data_fingerprint(examples),
        "num_examples": len(examples),
        "topk_logprobs_dtype": "float16",
        "target_logprobs_dtype": "float32",
    }
    return identity


def shard_plan(examples, sequences_per_shard: int) -> list[dict]:
    plan = []
    for index, start in enumerate(range(0, len(examples), sequences_per_shard)):
        part = examples[start : start + sequences_per_shard]
        plan.append(
            {
                "index": index,
                "example_start": start,
                "example_end": start + len(part),
                "num_tokens": sum(len(ex.input_ids) for ex in part),
                "num_targets": sum(ex.num_targets for ex in part),
            }
        )
    return plan


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
        records.append(
            SequenceRecord(
                example_id=ex.example_id,
                input_ids=np.asarray(ex.input_ids, dtype=np.int32),
                target_positions=np.asarray(ex.target_positions, dtype=np.int32),
                topk_ids=np.asarray(r.topk_ids, dtype=np.int32),
                topk_logprobs=np.maximum(r.topk_logprobs, LOGPROB_FLOOR).astype(np.float16),
                target_logprobs=np.maximum(r.target_logprobs, LOGPROB_FLOOR).astype(np.float32),
            )
        )
    return ShardData.from_sequences(records, top_k=top_k)


class _Heartbeat:
    """Renews a lease in the background while the engine works on its shard."""

    def __init__(self, lease, lease_seconds: float):
        self.lease, self.error = lease, None
        self._interval = max(lease_seconds / 4.0, 0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self._interval):
            try:
                self.lease.renew()
            except Exception as e:  # LeaseLostError, or the filesystem failing
                self.error = e
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _log(msg: str) -> None:
    print(f"[teacher] {msg}", file=sys.stderr, flush=True)


def run_capture(data_cfg, teacher_cfg, cache_cfg, *, progress: bool = True, engine=None) -> CaptureSummary:
    """Fill the cache at cache_cfg.path with the teacher's top-k (see module doc).

    `engine`: an already started engine to use (tests, benchmarks); by default
    one is made from teacher_cfg when the first shard is claimed, and closed
    at the end.
    """
    from storage.cache import Cache, CacheMismatchError
    from storage.errors import LeaseLostError, ShardExistsError
    from stages.teacher.engines import make_engine

    t_start = time.perf_counter()
    if not teacher_cfg.model:
        raise ValueError("teacher.model is empty: set it to the teacher's path or hub name")
    tokenizer = load_tokenizer(teacher_cfg.model, teacher_cfg.trust_remote_code)
    vocab_size = model_vocab_size(teacher_cfg.model, teacher_cfg.trust_remote_code)
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"teacher.model {teacher_cfg.model!r}: the tokenizer has {len(tokenizer)} tokens but the model "
            f"only {vocab_size} logits; they do not belong together"
        )
    if teacher_cfg.top_k > vocab_size:
        raise ValueError(f"teacher.top_k={teacher_cfg.top_k} exceeds the vocabulary of teacher.model "
                         f"{teacher_cfg.model!r} ({vocab_size} tokens); set teacher.top_k to at most {vocab_size}")
    examples, stats = data_mod.load_examples(data_cfg, tokenizer)
    _log(f"data: {stats.summary()}")
    identity = cache_identity(data_cfg, teacher_cfg, tokenizer, examples, vocab_size)
    plan = shard_plan(examples, cache_cfg.sequences_per_shard)
    try:
        cache = Cache.create_or_open(cache_cfg.path, identity, plan)
    except CacheMismatchError as e:
        raise _explain_mismatch(e, cache_cfg.path, identity) from None
    cache.remove_stale_partials()  # killed writers' shard-N.zarr.partial-* (logged)

    summary = CaptureSummary(cache=str(cache_cfg.path), shards_total=len(plan), data=stats.as_dict())
    done_at_start = set(cache.completed_shards())
    summary.shards_skipped = len(done_at_start)
    worker_id = teacher_cfg.worker_id or default_worker_id()
    own_engine = engine is None
    bar = _progress_bar(progress, len(plan), len(done_at_start))
    try:
        while True:
            lease = cache.claim_shard(worker_id, teacher_cfg.lease_seconds)
            if lease is None:
                if not _wait_for_others(cache, teacher_cfg.lease_seconds, bar):
                    break
                continue
            entry = plan[lease.shard_index]
            part = examples[entry["example_start"] : entry["example_end"]]
            try:
                if engine is None:
                    engine = make_engine(teacher_cfg, max_seq_len=data_cfg.max_seq_len)
                    if engine.vocab_size != vocab_size:
                        raise RuntimeError(
                            f"engine vocabulary {engine.vocab_size} != model config vocab_size {vocab_size}"
                        )
                summary.engine = engine.name
                summary.engine_reason = getattr(engine, "choice_reason", "")
                provenance.record_start(cache, teacher_cfg, engine)
                t_shard = time.perf_counter()
                with _Heartbeat(lease, teacher_cfg.lease_seconds) as beat:
                    rows = engine.score(part, teacher_cfg.top_k)
                    if beat.error is not None:
                        raise beat.error
                    cache.write_shard(lease.shard_index, build_shard(part, rows, teacher_cfg.top_k), lease=lease)
            except (LeaseLostError, ShardExistsError) as e:
                summary.shards_lost += 1
                _log(f"shard {lease.shard_index}: {e}")
                continue
            except BaseException:
                _release_quietly(lease)  # let another worker take the shard at once
                raise
            summary.busy_seconds += time.perf_counter() - t_shard
            summary.shards_written += 1
            summary.written_shards.append(lease.shard_index)
            summary.sequences += len(part)
            summary.tokens += entry["num_tokens"]
            summary.targets += entry["num_targets"]
            if bar is not None:
                bar.n = len(cache.completed_shards())  # all workers' progress, so the ETA is the cache's
                bar.set_postfix_str(f"{summary.tokens_per_second:,.0f} tok/s (this worker)")
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()
        if own_engine and engine is not None:
            engine.close()
    if summary.shards_written:
        provenance.record_end(cache)
    if cache.manifest.shards_done != cache.completed_shards():
        cache.refresh_manifest()  # e.g. a worker was killed between its last commit and the manifest update
    summary.seconds = time.perf_counter() - t_start
    _log(
        f"worker {worker_id}: wrote {summary.shards_written} shard(s) ({summary.tokens:,} tokens, "
        f"{summary.tokens_per_second:,.0f} tok/s), {summary.shards_skipped} were already done, "
        f"{len(cache.completed_shards())}/{len(plan)} complete"
    )
    return summary


def _explain_mismatch(error, path, identity):
    """Add what differs between the tokenizers when the fingerprints alone say 'different'."""
    from storage.cache import Cache, CacheMismatchError

    try:
        old = Cache.open(path).manifest.identity.get("tokenizer_info")
    except Exception:
        return error
    if not isinstance(old, dict) or old == identity["tokenizer_info"]:
        return error
    detail = describe_tokenizer_difference(old, identity["tokenizer_info"])
    return CacheMismatchError(f"{error}\nTokenizer (cache vs now): {detail or 'differs'}")


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


def _release_quietly(lease) -> None:
    try:
        lease.release()
    except Exception:
        pass


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from stages.progress import tqdm

    return tqdm(total=total, initial=initial, unit="shard", desc="teacher", file=sys.stderr, dynamic_ncols=True)
