"""Held-out splits (stages/split.py): exact, disjoint, deterministic parts read by range; the
cache identity records the part; the teacher caches only its part's rows."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import CacheConfig, DataConfig, TeacherConfig
from stages import split
from stages.data_config import HoldoutConfig
from stages.rows import DataError
from tests.support import fixtures


def _cfg(path="x.jsonl", **holdout) -> DataConfig:
    return DataConfig(path=str(path), max_seq_len=64, holdout=HoldoutConfig(**holdout) if holdout else None)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4099])
def test_the_permutation_is_a_bijection_and_its_inverse_undoes_it(n):
    for seed in (0, 1, 12345):
        p = split.permute(np.arange(n), n, seed)
        assert np.array_equal(np.sort(p), np.arange(n))
        assert np.array_equal(split.permute(p, n, seed, inverse=True), np.arange(n))
    if n >= 64:
        assert not np.array_equal(split.permute(np.arange(n), n, 0), split.permute(np.arange(n), n, 1))
        assert not np.array_equal(split.permute(np.arange(n), n, 0), np.arange(n))


@pytest.mark.parametrize("spec, expect", [
    ({"validation": 100, "test": 50}, {"train": 850, "validation": 100, "test": 50}),
    ({"validation": 0.1, "test": 0.05}, {"train": 850, "validation": 100, "test": 50}),
    ({"validation": 0, "test": 0.0015}, {"train": 998, "validation": 0, "test": 2}),  # 1.5 rounds to 2
])
def test_parts_have_exact_sizes_are_disjoint_and_cover_every_row(spec, expect):
    n = 1000
    cfg = _cfg(**spec, seed=3)
    assert split.sizes(cfg.holdout, n) == expect
    parts = split.part_of(cfg, n, np.arange(n))
    for name, size in expect.items():
        assert int((parts == name).sum()) == size  # union = all rows, disjoint (one label each)
    for name in ("validation", "test"):
        assert np.array_equal(split.members(cfg, n, name), np.flatnonzero(parts == name))
    train = np.concatenate([split.members_in(cfg, n, a, min(a + 37, n), "train") for a in range(0, n, 37)])
    assert np.array_equal(train, np.flatnonzero(parts == "train"))  # by range = all at once
    again = split.part_of(_cfg(**spec, seed=3), n, np.arange(n))
    assert np.array_equal(parts, again)  # a pure function of (seed, i, n)
    assert not np.array_equal(parts, split.part_of(_cfg(**spec, seed=4), n, np.arange(n)))


def test_sizes_that_leave_no_training_rows_or_are_not_counts_are_refused():
    with pytest.raises(DataError, match="leave no training rows out of 10"):
        split.sizes(HoldoutConfig(validation=5, test=5), 10)
    with pytest.raises(DataError, match="fraction must be in"):
        split.sizes(HoldoutConfig(validation=1.5), 10)


def test_plans_cut_the_train_part_by_rows_and_small_parts_by_members():
    n, cfg = 1000, _cfg(validation=30, test=20, seed=0)
    assert split.shard_plan(cfg, n, 128) == split.shard_plan(DataConfig(path="x"), n, 128)
    assert len(split.shard_plan(cfg, n, 128)) == 8
    cfg.holdout.part = "validation"
    plan = split.shard_plan(cfg, n, 8)
    got = [split.members_in(cfg, n, e["row_start"], e["row_end"]) for e in plan]
    assert [len(g) for g in got] == [8, 8, 8, 6]
    assert np.array_equal(np.concatenate(got), split.members(cfg, n, "validation"))


def test_train_rows_streams_exactly_the_training_rows(tmp_path):
    path = fixtures.write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(300)])
    cfg = _cfg(path, validation=40, test=0.1, seed=7)
    seen = [(int(i), row) for idx, rows in split.train_rows(cfg, chunk_rows=64) for i, row in zip(idx, rows)]
    want = np.flatnonzero(split.part_of(cfg, 300, np.arange(300)) == "train")
    assert [i for i, _ in seen] == want.tolist() and len(seen) == 230
    assert all(row["prompt"] == f"p{i}" for i, row in seen)
    test = [(int(i), row) for idx, rows in split.iter_part(cfg, "test", chunk_rows=8) for i, row in zip(idx, rows)]
    assert len(test) == 30 and all(row["prompt"] == f"p{i}" for i, row in test)
    cfg.limit = 100  # the split is over the used rows
    assert sum(len(idx) for idx, _ in split.train_rows(cfg)) == 100 - 40 - 10
    plain = DataConfig(path=str(path))
    assert sum(len(idx) for idx, _ in split.train_rows(plain)) == 300


def _teacher(model) -> TeacherConfig:
    return TeacherConfig(model=str(model), backend="transformers", top_k=4, dtype="float32", device="cpu")


def test_the_cache_holds_its_part_records_it_and_refuses_another_split(tmp_path, train_jsonl, tiny_llama_dir):
    """40 rows, 6 validation + 4 test: the cache holds the 30 training rows; its identity names the
    split, and stage one and stage two refuse a cache of another split."""
    from stages.teacher.capture import run_capture
    from stages.teacher.identity import check_for_students
    from storage.cache import Cache
    from storage.errors import CacheMismatchError

    cfg = DataConfig(path=str(train_jsonl), max_seq_len=64, holdout=HoldoutConfig(validation=6, test=4, seed=1))
    url = str(tmp_path / "cache")
    run_capture(cfg, _teacher(tiny_llama_dir), CacheConfig(path=url, sequences_per_shard=16), progress=False)
    cache = Cache.open(url)
    assert cache.manifest.identity["holdout"] == {"part": "train", "rows": 30, "validation": 6, "test": 4,
                                                  "seed": 1, "permutation": split.PERMUTATION}
    ids = np.concatenate([cache.read_shard(i).example_ids for i in cache.completed_shards()])
    assert np.array_equal(ids, np.flatnonzero(split.part_of(cfg, 40, np.arange(40)) == "train"))
    for i, entry in enumerate(cache.manifest.shard_plan):  # rows in range = rows of the part + held out
        attrs = cache.shard_attrs(i)
        assert attrs["data"]["rows"] + attrs["held_out"] == entry["row_end"] - entry["row_start"]
        assert attrs["data"]["examples"] == attrs["data"]["rows"] - attrs["data"]["skipped_overlong"]

    assert check_for_students(cache, cfg, _teacher(tiny_llama_dir))[0] == 4
    other = DataConfig(path=str(train_jsonl), max_seq_len=64, holdout=HoldoutConfig(validation=6, test=4, seed=2))
    with pytest.raises(CacheMismatchError, match="\n  holdout.seed: 1 -> 2\n"):
        check_for_students(cache, other, _teacher(tiny_llama_dir))
    with pytest.raises(CacheMismatchError, match="holdout"):
        check_for_students(cache, DataConfig(path=str(train_jsonl), max_seq_len=64), _teacher(tiny_llama_dir))
    with pytest.raises(CacheMismatchError, match="holdout"):
        run_capture(other, _teacher(tiny_llama_dir), CacheConfig(path=url, sequences_per_shard=16), progress=False)

    cfg.holdout.part = "validation"  # the validation cache: 6 rows in one shard, named as such
    val = str(tmp_path / "cache-val")
    run_capture(cfg, _teacher(tiny_llama_dir), CacheConfig(path=val, sequences_per_shard=16), progress=False)
    vcache = Cache.open(val)
    assert vcache.num_shards == 1 and vcache.manifest.identity["holdout"]["part"] == "validation"
    assert vcache.read_shard(0).example_ids.tolist() == split.members(cfg, 40, "validation").tolist()
