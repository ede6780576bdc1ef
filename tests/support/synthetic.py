"""Small random caches (valid format v1 data, built with numpy) for the storage tests and benches."""

from __future__ import annotations

import numpy as np

from storage.cache import Cache
from storage.schema import SequenceRecord, ShardData

VOCAB = 97
TOP_K = 8


def random_sequence(rng: np.random.Generator, example_id: int, k: int = TOP_K, vocab: int = VOCAB,
                    min_len: int = 2, max_len: int = 24) -> SequenceRecord:
    """One sequence with valid teacher rows (distinct ids, descending log-probs,
    the gold log-prob consistent with the top-k)."""
    length = int(rng.integers(min_len, max_len + 1))
    input_ids = rng.integers(0, vocab, length).astype(np.int32)
    positions = np.flatnonzero(rng.random(length - 1) < 0.7).astype(np.int32)
    p = len(positions)
    topk_ids = np.argsort(rng.random((p, vocab)), axis=1)[:, :k].astype(np.int32)
    topk_lp = (-np.cumsum(rng.exponential(1.0, (p, k)), axis=1)).astype(np.float16)
    gold = input_ids[positions + 1]
    hit = topk_ids == gold[:, None]
    target = np.where(hit.any(1), topk_lp[np.arange(p), hit.argmax(1)].astype(np.float32),
                      topk_lp[:, -1].astype(np.float32) - rng.exponential(1.0, p).astype(np.float32) - 0.1)
    return SequenceRecord(example_id, input_ids, positions, topk_ids, topk_lp, target.astype(np.float32))


def random_shard(rng: np.random.Generator, num_sequences: int, example_start: int = 0, **kw) -> ShardData:
    records = [random_sequence(rng, example_start + i, **kw) for i in range(num_sequences)]
    return ShardData.from_sequences(records, top_k=kw.get("k", TOP_K))


def make_plan(sizes: list[int]) -> list[dict]:
    plan, start = [], 0
    for i, n in enumerate(sizes):
        plan.append({"index": i, "example_start": start, "example_end": start + n, "num_sequences": n})
        start += n
    return plan


def make_identity(**extra) -> dict:
    return {"teacher": "synthetic-teacher", "tokenizer_fingerprint": "tok-abc", "top_k": TOP_K,
            "vocab_size": VOCAB, "data_fingerprint": "data-123", "template": "plain",
            "max_seq_len": 24, **extra}


def shard_for_plan(plan_entry: dict, seed: int = 0) -> ShardData:
    """The deterministic data of one planned shard (what a teacher would compute)."""
    rng = np.random.default_rng([seed, plan_entry["index"]])
    return random_shard(rng, plan_entry["num_sequences"], plan_entry["example_start"])


def build_cache(url: str, sizes: list[int], seed: int = 0, write: list[int] | None = None,
                **storage_options) -> Cache:
    """A cache with the given shard sizes; writes the shards in ``write`` (default all)."""
    plan = make_plan(sizes)
    cache = Cache.create_or_open(url, make_identity(), plan, **storage_options)
    for i in (range(len(sizes)) if write is None else write):
        cache.write_shard(i, shard_for_plan(plan[i], seed))
    return cache
