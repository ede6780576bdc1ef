"""The same write/read/verify/lease tests on every backend (local directory, fsspec memory://)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from storage import shard as shard_io
from storage.cache import Cache, CacheMismatchError, CorruptShardError, ShardExistsError
from storage.errors import LeaseLostError, ManifestError
from storage.fs import CacheFS
from storage.verify import status_summary, verify_cache
from tests.support.synthetic import build_cache, make_identity, make_plan, shard_for_plan

SIZES = [6, 0, 9, 4]


# ---- round trip and manifest ----------------------------------------------
def test_round_trip_is_bit_exact(cache_url):
    cache = build_cache(cache_url, SIZES)
    reopened = Cache.open(cache_url)
    assert reopened.completed_shards() == [0, 1, 2, 3]
    assert reopened.manifest.shards_done == [0, 1, 2, 3]
    for i, entry in enumerate(reopened.manifest.shard_plan):
        assert reopened.read_shard(i).equals(shard_for_plan(entry))
    assert reopened.fingerprint == cache.fingerprint


def test_shards_are_plain_zarr_v3_groups(cache_url):
    import zarr

    cache = build_cache(cache_url, SIZES, write=[2])
    group = zarr.open_group(cache.fs.zarr_store(cache.shard_rel(2), read_only=True), mode="r")
    assert group.attrs["complete"] is True and group.attrs["format_version"] == 1
    assert group["topk_logprobs"].dtype == np.float16
    assert group["topk_ids"].shape == (group.attrs["counts"]["num_positions"], 8)


def test_reopen_with_same_config_and_mismatch_names_keys(cache_url):
    build_cache(cache_url, SIZES, write=[])
    Cache.create_or_open(cache_url, make_identity(), make_plan(SIZES))  # same: fine
    with pytest.raises(CacheMismatchError) as err:
        Cache.create_or_open(cache_url, make_identity(teacher="other", top_k=16), make_plan(SIZES))
    msg = str(err.value)
    assert "(cache -> requested)" in msg
    assert 'identity.teacher: "synthetic-teacher" -> "other"' in msg
    assert "identity.top_k: 8 -> 16" in msg
    with pytest.raises(CacheMismatchError, match=r"shard_plan\[1\]"):
        Cache.create_or_open(cache_url, make_identity(), make_plan([6, 1, 9, 4]))


def test_missing_manifest_and_other_format_version(cache_url):
    with pytest.raises(ManifestError, match="does not exist"):
        Cache.open(cache_url)
    build_cache(cache_url, SIZES, write=[])
    fs = CacheFS(cache_url)
    raw = json.loads(fs.read_bytes("manifest.json"))
    raw["format_version"] = 3  # 1 (top-k) and 2 (sampled targets / lossy encoding) are read
    fs.write_bytes_atomic("manifest.json", json.dumps(raw).encode())
    with pytest.raises(ManifestError, match="format version 3"):
        Cache.open(cache_url)


def test_write_refuses_invalid_data_and_existing_shard(cache_url):
    cache = build_cache(cache_url, SIZES, write=[0])
    bad = shard_for_plan(cache.manifest.shard_plan[2])
    bad.topk_logprobs[0, 0] = 1.0
    with pytest.raises(ValueError, match="log-probs must be <= 0"):
        cache.write_shard(2, bad)
    assert not cache.is_shard_complete(2)
    with pytest.raises(ShardExistsError):
        cache.write_shard(0, shard_for_plan(cache.manifest.shard_plan[0]))


def test_failed_write_is_invisible_and_rewrite_succeeds(cache_url, monkeypatch):
    cache = build_cache(cache_url, SIZES, write=[])
    data = shard_for_plan(cache.manifest.shard_plan[2])
    real = shard_io._mark_complete

    def crash(store):
        raise RuntimeError("simulated crash before commit")

    monkeypatch.setattr(shard_io, "_mark_complete", crash)
    with pytest.raises(RuntimeError):
        cache.write_shard(2, data)
    assert cache.completed_shards() == [] and not cache.is_shard_complete(2)
    with pytest.raises(CorruptShardError, match="shard-00002"):
        cache.read_shard(2)
    monkeypatch.setattr(shard_io, "_mark_complete", real)
    cache.write_shard(2, data)
    assert cache.read_shard(2).equals(data)


# ---- verify and corruption --------------------------------------------------
def _chunk(cache: Cache, index: int, array: str) -> str:
    return f"{cache.shard_rel(index)}/{array}/c/0" + ("/0" if array.startswith("topk") else "")


def _corrupt(cache: Cache, how: str) -> str:
    fs = cache.fs
    if how == "flip_byte":
        rel = _chunk(cache, 2, "topk_logprobs")
        raw = bytearray(fs.read_bytes(rel))
        raw[len(raw) // 2] ^= 0xFF
        fs.write_bytes_atomic(rel, bytes(raw))
        return "topk_logprobs"
    if how == "truncate":
        rel = _chunk(cache, 2, "topk_ids")
        fs.write_bytes_atomic(rel, fs.read_bytes(rel)[:20])
        return "topk_ids"
    if how == "delete_array":
        fs.remove(f"{cache.shard_rel(2)}/target_logprobs", recursive=True)
        return "target_logprobs"
    if how == "delete_chunk":  # zarr would silently return fill values: the checksum catches it
        fs.remove(_chunk(cache, 2, "input_ids"))
        return "input_ids"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["flip_byte", "truncate", "delete_array", "delete_chunk"])
def test_corruption_is_named_by_verify_and_refused_by_reader(cache_url, how):
    cache = build_cache(cache_url, SIZES)
    assert verify_cache(cache_url).ok
    array = _corrupt(cache, how)
    report = verify_cache(cache_url)
    assert not report.ok and list(report.bad) == [2], report.summary()
    assert any(array in p for p in report.bad[2]), report.bad
    assert "BAD shard 2" in report.summary() and "shard-00002.zarr" in report.summary()
    with pytest.raises(CorruptShardError) as err:
        Cache.open(cache_url).read_shard(2)
    assert "shard-00002.zarr" in str(err.value) and array in str(err.value)
    Cache.open(cache_url).read_shard(0)  # the others stay readable


def test_verify_reports_values_pending_and_status(cache_url):
    cache = build_cache(cache_url, SIZES, write=[0, 2])
    report = verify_cache(cache_url)
    assert report.ok and report.done == [0, 2] and report.pending == [1, 3]
    assert "2/4 shards done" in report.summary()
    assert "shards done 2/4" in status_summary(cache_url)
    # A shard whose bytes are intact but whose values break the format: rewrite
    # the attrs' checksums to match, so only the deep value checks can catch it.
    data = shard_for_plan(cache.manifest.shard_plan[3])
    data.topk_ids[0, 0] = 10_000
    shard_io.write_shard(cache.fs, cache.shard_rel(3), data)
    report = verify_cache(cache_url)
    assert list(report.bad) == [3] and any("ids must be in [0, 97)" in p for p in report.bad[3])
    assert verify_cache(cache_url, deep=False).ok
    assert not verify_cache(cache_url + "-nothing").ok


# ---- leases -----------------------------------------------------------------
def test_claims_are_exclusive_and_skip_completed(cache_url):
    cache = build_cache(cache_url, SIZES, write=[0])
    a = cache.claim_shard("a", lease_seconds=60)
    b = cache.claim_shard("b", lease_seconds=60)
    assert (a.shard_index, b.shard_index) == (1, 2)
    cache.write_shard(1, shard_for_plan(cache.manifest.shard_plan[1]), lease=a)
    c = cache.claim_shard("c", lease_seconds=60)
    assert c.shard_index == 3
    assert cache.claim_shard("d", lease_seconds=60) is None  # all done or leased
    b.release()
    assert cache.claim_shard("d", lease_seconds=60).shard_index == 2
    with pytest.raises(ValueError, match="lease is for shard 3"):
        cache.write_shard(2, shard_for_plan(cache.manifest.shard_plan[2]), lease=c)


def test_expired_lease_is_taken_over(cache_url):
    cache = build_cache(cache_url, SIZES, write=[])
    dead = cache.claim_shard("dead-worker", lease_seconds=0.2)
    assert dead.shard_index == 0
    assert cache.claim_shard("w2", lease_seconds=60).shard_index == 1  # 0 still held
    time.sleep(0.3)
    taker = cache.claim_shard("w3", lease_seconds=60)
    assert taker.shard_index == 0 and taker.record.generation == 1
    with pytest.raises(LeaseLostError):
        dead.renew()
    data = shard_for_plan(cache.manifest.shard_plan[0])
    with pytest.raises(LeaseLostError):
        cache.write_shard(0, data, lease=dead)
    assert not cache.is_shard_complete(0)
    taker.renew(30)
    cache.write_shard(0, data, lease=taker)
    assert cache.read_shard(0).equals(data)


# ---- group attributes without decoding ---------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "not_an_object", "array_metadata"])
def test_shard_attrs_missing_readable_and_unreadable(cache_url, damage):
    cache = build_cache(cache_url, SIZES, write=[0, 2])
    assert cache.shard_attrs(1) is None  # never written
    assert not cache.fs.exists(cache.shard_rel(1))  # and reading did not create it
    # Attributes come from zarr.json alone: no array needs to be there.
    fs = cache.fs
    fs.remove(f"{cache.shard_rel(0)}/topk_ids", recursive=True)
    attrs = cache.shard_attrs(0)
    assert attrs["complete"] is True and attrs["counts"]["num_sequences"] == SIZES[0]
    assert [i for i, _ in cache.iter_shard_attrs([2, 0, 1])] == [2, 0, 1]
    assert [a is None for _, a in cache.iter_shard_attrs([2, 0, 1], batch=2)] == [False, False, True]
    meta = f"{cache.shard_rel(2)}/zarr.json"
    fs.write_bytes_atomic(meta, {"truncated": fs.read_bytes(meta)[:40], "not_an_object": b"[1, 2]",
                                 "array_metadata": b'{"zarr_format": 3, "node_type": "array"}'}[damage])
    assert cache.shard_attrs(2) == {"_unreadable": True}
    report = verify_cache(cache_url)
    assert list(report.bad) == [0, 2] and "zarr.json is not valid JSON" in " ".join(report.bad[2])
    assert "zarr.json is not valid JSON" in " ".join(verify_cache(cache_url, deep=False).bad[2])
    with pytest.raises(CorruptShardError, match=r"shard-00002\.zarr is unusable: zarr.json is not valid JSON"):
        cache.read_shard(2)
    assert Cache.open(cache_url).completed_shards() == ([0, 2] if cache.fs.is_local else [0])
