"""The lossy top-k encoding u8-rel (storage/encoding.py): round trip against a dense float64
reference, the stated KL bound on peaked, flat and split distributions, verify on good and
tampered shards, the reader, and exact caches staying format v1 bit for bit."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import zarr

from tests.support.target_kl import target_kl
from storage.cache import Cache, CacheMismatchError
from storage.dataset import CacheDataset
from storage.encoding import LogprobEncoding, decode_u8
from storage.inspect import inspect_cache
from storage.schema import SequenceRecord, ShardData
from storage.shard import array_checksum
from storage.verify import verify_cache

V, K = 400, 32
U8 = LogprobEncoding.from_config("u8-rel", 0.08).for_top_k(K)


def dense_rows(rng, P: int, kind: str):
    """(logits float64 [P, V]) of one family: peaked, flat, mixed temperatures, or two-way splits
    with an almost empty tail (where a quantised top-k moves the residual bucket the most)."""
    z = rng.normal(size=(P, V)) * 3
    if kind == "peaked":
        return z / rng.uniform(0.05, 0.3, (P, 1))
    if kind == "flat":
        return z / rng.uniform(2.0, 8.0, (P, 1))
    if kind == "mixed":
        return z / np.exp(rng.uniform(np.log(0.05), np.log(4.0), (P, 1)))
    logits = np.full((P, V), -40.0) + rng.normal(size=(P, V))  # split: 2-5 tokens share the mass
    for i in range(P):
        n = rng.integers(2, 6)
        logits[i, rng.choice(V, n, replace=False)] = rng.normal(0, 0.7, n)
    return logits


def shard_of(rng, logits: np.ndarray, k: int = K):
    """One sequence holding a row per position: exact float16 top-k (as stage one stores it),
    a gold token drawn from the row (now and then one outside the top-k), float64 reference."""
    lp64 = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    P = len(lp64)
    ids = np.argsort(-lp64, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(lp64, ids, 1)
    gold = np.array([rng.choice(V, p=np.exp(r) / np.exp(r).sum()) for r in lp64])
    outside = rng.random(P) < 0.1
    gold[outside] = np.argsort(-lp64[outside], axis=1)[:, k + 3]
    tokens = np.concatenate([[1], gold]).astype(np.int32)
    rec = SequenceRecord(0, tokens, np.arange(P, dtype=np.int32), ids.astype(np.int32),
                         np.maximum(top, -1e4).astype(np.float16), lp64[np.arange(P), gold].astype(np.float32))
    data = ShardData.from_sequences([rec])
    assert data.validate(vocab_size=V) == []
    return data, lp64


def decoded(enc: LogprobEncoding, data: ShardData) -> ShardData:
    return ShardData.from_arrays(enc.decode(enc.encode(data)))


def kl_of(data: ShardData, dec: ShardData) -> np.ndarray:
    gold = data.input_ids[data.target_positions + 1]
    return target_kl(data.topk_ids, data.topk_logprobs, dec.topk_ids, dec.topk_logprobs, gold,
                     data.target_logprobs, V)


@pytest.mark.parametrize("step", [0.02, 0.08, 0.2])
@pytest.mark.parametrize("kind", ["peaked", "flat", "mixed", "split"])
def test_round_trip_within_the_stated_bound_of_the_float64_reference(kind, step):
    rng = np.random.default_rng(3)
    data, lp64 = shard_of(rng, dense_rows(rng, 300, kind))
    enc = LogprobEncoding.from_config("u8-rel", step)
    dec = decoded(enc, data)
    assert dec.validate(vocab_size=V, logprob_atol=enc.max_abs_error, grid_floor=enc.grid_floor) == []
    assert dec.topk_logprobs.dtype == np.float32
    # Same ids per row (lossless), values within step of the float64 reference plus
    # float16's rounding of what stage one stored; rows descending, <= 0.
    assert np.array_equal(np.sort(dec.topk_ids, 1), np.sort(data.topk_ids, 1))
    ref = np.take_along_axis(lp64, dec.topk_ids.astype(np.int64), 1)
    got = dec.topk_logprobs.astype(np.float64)
    on_grid = ref > lp64.max(1, keepdims=True) - (enc.grid_floor - step)
    fp16 = np.abs(ref) * 2.0 ** -11 + 1e-7
    assert np.all(np.abs(got - ref)[on_grid] <= (step + fp16 + 1e-6)[on_grid])
    # Below the grid a value means "this or less": it is at the floor, and the truth is not above it.
    top = lp64.max(1, keepdims=True).repeat(K, 1)
    below = ref < top - enc.grid_floor - step
    assert np.all(got[below] <= top[below] - enc.grid_floor + fp16[below])
    assert np.all(ref[below] <= got[below] + step)
    if kind == "peaked" and step == 0.02:  # a 5-nat grid: the floor is exercised
        assert below.sum() > 1000
    assert np.all(np.diff(got, axis=1) <= 0) and got.max() <= 0
    assert enc.describe()["max_abs_error"] == step


@pytest.mark.parametrize("step", [0.03, 0.08, 0.2])
@pytest.mark.parametrize("kind", ["peaked", "flat", "mixed", "split"])
def test_kl_to_the_exact_target_stays_under_the_stated_bound(kind, step):
    rng = np.random.default_rng(5)
    data, _ = shard_of(rng, dense_rows(rng, 400, kind))
    enc = LogprobEncoding.from_config("u8-rel", step).for_top_k(K)
    kl = kl_of(data, decoded(enc, data))
    assert kl.min() >= -1e-12 and kl.max() <= enc.kl_bound, (kl.max(), enc.kl_bound)


def test_the_stated_bound_at_the_default_step_meets_the_goal_and_uses_the_losses_floor():
    from stages.buckets import TEACHER_RESIDUAL_FLOOR
    from storage.encoding import RESIDUAL_FLOOR

    assert RESIDUAL_FLOOR == TEACHER_RESIDUAL_FLOOR
    assert 0.08 ** 2 / 8 < LogprobEncoding.from_config("u8-rel").for_top_k(64).kl_bound < 8.01e-4
    assert LogprobEncoding.from_config("u8-rel").for_top_k(1024).kl_bound < 1e-3
    # A fine grid is short (255 codes): the floor's term dominates the bound, as it should.
    assert LogprobEncoding.from_config("u8-rel", 0.03).for_top_k(64).kl_bound > 1.0


def test_without_the_mass_preserving_anchor_the_bound_would_fail():
    """The anchor shift is what keeps the residual bucket exact: anchored at the plain top-1,
    split rows (mass on a few tokens, an almost empty tail) exceed the bound."""
    rng = np.random.default_rng(5)
    data, _ = shard_of(rng, dense_rows(rng, 400, "split"))
    stored = U8.encode(data)
    codes = np.cumsum(stored["topk_code_deltas"], axis=1)
    plain_anchor = data.topk_logprobs[:, 0].astype(np.float32)  # the top-1, no shift
    ids, lp = decode_u8(stored["topk_id_deltas"], stored["topk_code_deltas"], plain_anchor, U8.step)
    assert np.all(codes[:, 0] == 0)
    plain = ShardData.from_arrays({**data.arrays(), "topk_ids": ids, "topk_logprobs": lp})
    assert kl_of(data, plain).max() > U8.kl_bound
    assert kl_of(data, decoded(U8, data)).max() <= U8.kl_bound


def _cache(url, data, enc=U8):
    cache = Cache.create_or_open(url, {"top_k": K, "vocab_size": V}, [{"index": 0}], logprob_encoding=enc)
    cache.write_shard(0, data)
    return cache


def test_manifest_and_shard_state_the_encoding_and_verify_passes(local_url):
    rng = np.random.default_rng(0)
    data, _ = shard_of(rng, dense_rows(rng, 200, "mixed"))
    cache = _cache(local_url, data)
    manifest = json.loads(cache.fs.read_bytes("manifest.json"))
    assert manifest["format_version"] == 2
    assert manifest["logprob_encoding"] == {"name": "u8-rel", "step": 0.08, "top_k": K, "max_abs_error": 0.08,
                                            "kl_bound": U8.kl_bound, "grid_floor": 254.5 * 0.08,
                                            "ids": "lossless"}
    assert manifest["dtypes"]["topk_code_deltas"] == "uint8" and "topk_logprobs" not in manifest["dtypes"]
    g = zarr.open_group(cache.fs.path(cache.shard_rel(0)), mode="r")
    assert g.attrs["format_version"] == 2 and g.attrs["logprob_encoding"] == manifest["logprob_encoding"]
    # Plain zarr decode, as docs/cache-format.md shows it, gives what atkd's reader gives.
    dc, idd, anchor = g["topk_code_deltas"][...], g["topk_id_deltas"][...], g["topk_anchor"][...]
    codes = np.cumsum(dc, axis=1)
    plain = np.minimum(anchor[:, None] - codes * manifest["logprob_encoding"]["step"], 0)
    start = np.ones(dc.shape, bool)
    start[:, 1:] = dc[:, 1:] != 0
    summed = np.cumsum(idd, axis=1, dtype=np.int64)
    before = np.where(start, summed - idd, 0)
    plain_ids = summed - np.maximum.accumulate(before, axis=1)
    back = cache.read_shard(0)
    assert np.allclose(plain, back.topk_logprobs, atol=1e-5) and np.array_equal(plain_ids, back.topk_ids)
    report = verify_cache(local_url)
    assert report.ok, report.summary()
    assert "u8-rel, step 0.08" in inspect_cache(local_url).text()


def _tamper(cache, name, fn):
    g = zarr.open_group(cache.fs.path(cache.shard_rel(0)), mode="r+")
    a = fn(np.asarray(g[name][...]).copy())
    g[name][...] = a
    g.attrs["checksums"] = {**g.attrs["checksums"], name: array_checksum(a)}  # a buggy writer, not bit rot


def _set(index, value):
    def fn(a):
        a[index] = value
        return a
    return fn


@pytest.mark.parametrize("name, fn, words", [
    ("topk_anchor", _set(3, 0.5), "anchors above step/2"),
    ("topk_code_deltas", _set((2, 0), 1), "do not start at code 0"),
    ("topk_code_deltas", _set((4, slice(1, None)), 9), "leave the 8-bit grid"),
    ("topk_id_deltas", _set((0, slice(None)), 0), "not ascending within a run"),
])
def test_verify_names_a_tampered_shard(local_url, name, fn, words):
    rng = np.random.default_rng(1)
    data, _ = shard_of(rng, dense_rows(rng, 50, "peaked"))
    cache = _cache(local_url, data)
    _tamper(cache, name, fn)
    report = verify_cache(local_url)
    assert not report.ok and 0 in report.bad
    assert any(words in p for p in report.bad[0]), report.bad
    assert "BAD shard 0" in report.summary() and "shard-00000.zarr" in report.summary()


def test_a_shard_of_another_encoding_is_reported_with_both(local_url, tmp_path):
    rng = np.random.default_rng(2)
    data, _ = shard_of(rng, dense_rows(rng, 40, "mixed"))
    cache = _cache(local_url, data)
    other = _cache(str(tmp_path / "exact"), data, LogprobEncoding())
    import shutil
    shutil.rmtree(cache.fs.path(cache.shard_rel(0)))
    shutil.copytree(other.fs.path(other.shard_rel(0)), cache.fs.path(cache.shard_rel(0)))
    report = verify_cache(local_url)
    assert not report.ok
    assert "written with log-prob encoding exact" in report.bad[0][0] and "manifest says u8-rel" in report.bad[0][0]
    with pytest.raises(Exception, match="written with log-prob encoding exact"):
        cache.read_shard(0)


def test_reopening_with_another_encoding_is_refused(local_url):
    rng = np.random.default_rng(2)
    data, _ = shard_of(rng, dense_rows(rng, 20, "mixed"))
    _cache(local_url, data)
    with pytest.raises(CacheMismatchError, match="stores top-k log-probs as u8-rel.*asks for exact"):
        Cache.create_or_open(local_url, {"top_k": K, "vocab_size": V}, [{"index": 0}])
    Cache.create_or_open(local_url, {"top_k": K, "vocab_size": V}, [{"index": 0}], logprob_encoding=U8)


def test_an_exact_cache_is_still_format_v1_with_the_same_fingerprint(local_url):
    """Nothing changes for exact caches: the manifest and shards read as before this encoding existed
    (the fingerprint was computed by the code before it)."""
    identity, plan = {"teacher": "t", "top_k": 4, "vocab_size": 100}, [{"index": 0, "row_start": 0, "row_end": 3}]
    cache = Cache.create_or_open(local_url, identity, plan)
    assert cache.fingerprint == "6d5bd0c2835823a7361f201f551ab9ed"
    manifest = json.loads(cache.fs.read_bytes("manifest.json"))
    assert manifest["format_version"] == 1 and "logprob_encoding" not in manifest
    assert not cache.encoding.lossy and cache.encoding.describe() is None


def test_the_reader_decodes_transparently(tmp_path):
    rng = np.random.default_rng(4)
    data, _ = shard_of(rng, dense_rows(rng, 120, "mixed"))
    _cache(str(tmp_path / "u8"), data)
    _cache(str(tmp_path / "exact"), data, LogprobEncoding())
    batches = [next(iter(CacheDataset(str(tmp_path / name), batch_size=1, seed=0, epochs=1, drop_last=False)))
               for name in ("exact", "u8")]
    a, b = batches
    assert a["topk_logprobs"].dtype == b["topk_logprobs"].dtype
    ia, la = a["topk_ids"].numpy(), a["topk_logprobs"].numpy()
    ib, lb = b["topk_ids"].numpy(), b["topk_logprobs"].numpy()
    oa, ob = np.argsort(ia, 1), np.argsort(ib, 1)
    assert np.array_equal(np.take_along_axis(ia, oa, 1), np.take_along_axis(ib, ob, 1))
    diff = np.abs(np.take_along_axis(la, oa, 1) - np.take_along_axis(lb, ob, 1))
    on_grid = np.take_along_axis(la, oa, 1) > la[:, :1] - 20
    assert diff[on_grid].max() <= U8.max_abs_error + 1e-5
    for key in ("input_ids", "target_ids", "target_logprobs", "row_pos"):
        assert np.array_equal(a[key].numpy(), b[key].numpy())


# ---------------------------------------------------------------- with sampled targets (both v2 features)
N_DRAWS = 16
BOTH = {"top_k": K, "vocab_size": V, "targets": "topk+sampled", "samples": N_DRAWS, "sampling": "exact"}


def with_samples(rng, data: ShardData, lp64: np.ndarray) -> ShardData:
    """``data`` plus format v2's sample arrays: N_DRAWS draws per position from the float64 rows."""
    offsets, ids, counts = [0], [], []
    for row in np.exp(lp64):
        u, c = np.unique(rng.choice(V, N_DRAWS, p=row / row.sum()), return_counts=True)
        ids.append(u)
        counts.append(c)
        offsets.append(offsets[-1] + len(u))
    return dataclasses.replace(data, sample_offsets=np.array(offsets, np.int64),
                               sample_ids=np.concatenate(ids).astype(np.int32),
                               sample_counts=np.concatenate(counts).astype(np.uint8))


def test_topk_plus_sampled_with_u8_rel_stores_both_features(local_url, tmp_path):
    """teacher.targets topk+sampled with cache.logprob_encoding u8-rel: one format v2 cache whose
    manifest names both; the draws are stored and read back bit for bit, the top-k as u8-rel
    (ids lossless, log-probs within step, KL within the bound); verify, inspect and the reader agree."""
    rng = np.random.default_rng(6)
    plain, lp64 = shard_of(rng, dense_rows(rng, 150, "mixed"))
    data = with_samples(rng, plain, lp64)
    assert data.validate(vocab_size=V) == []
    cache = Cache.create_or_open(local_url, BOTH, [{"index": 0}], logprob_encoding=U8)
    cache.write_shard(0, data)
    manifest = json.loads(cache.fs.read_bytes("manifest.json"))
    assert manifest["format_version"] == 2 and manifest["logprob_encoding"]["name"] == "u8-rel"
    assert manifest["identity"]["targets"] == "topk+sampled"
    assert {"sample_offsets": "int64", "sample_ids": "int32", "sample_counts": "uint8", "topk_code_deltas": "uint8",
            "topk_id_deltas": "int32", "topk_anchor": "float32"}.items() <= manifest["dtypes"].items()
    assert not {"topk_ids", "topk_logprobs"} & set(manifest["dtypes"])
    g = zarr.open_group(cache.fs.path(cache.shard_rel(0)), mode="r")
    assert g.attrs["format_version"] == 2 and g.attrs["logprob_encoding"] == manifest["logprob_encoding"]
    assert set(manifest["dtypes"]) == {name for name, _ in g.arrays()}
    for name in ("sample_offsets", "sample_ids", "sample_counts"):  # stored as they are: plain zarr reads them
        assert np.asarray(g[name][...]).tobytes() == getattr(data, name).tobytes(), name

    back = Cache.open(local_url).read_shard(0)
    for name in ("sample_offsets", "sample_ids", "sample_counts", "input_ids", "target_logprobs"):
        assert getattr(back, name).tobytes() == getattr(data, name).tobytes(), name
    alone = decoded(U8, plain)  # the top-k decodes exactly as without samples
    assert np.array_equal(back.topk_ids, alone.topk_ids) and np.array_equal(back.topk_logprobs, alone.topk_logprobs)
    assert kl_of(plain, back).max() <= U8.kl_bound
    assert verify_cache(local_url).ok
    text = inspect_cache(local_url).text()
    assert f"targets topk+sampled ({N_DRAWS} draws per position, sampling exact, cache format v2)" in text
    assert "log-probs: u8-rel, step 0.08" in text
    batch = next(iter(CacheDataset(local_url, batch_size=1, seed=0, epochs=1, drop_last=False)))
    assert batch["sample_counts"].sum(1).eq(N_DRAWS).all() and batch["topk_logprobs"].shape[1] == K

    # The same data exact: also v2 (for the samples), another fingerprint, no logprob_encoding.
    exact = Cache.create_or_open(str(tmp_path / "exact"), BOTH, [{"index": 0}])
    exact.write_shard(0, data)
    raw = json.loads(exact.fs.read_bytes("manifest.json"))
    assert raw["format_version"] == 2 and "logprob_encoding" not in raw and raw["dtypes"]["topk_logprobs"] == "float16"
    assert exact.fingerprint != cache.fingerprint and exact.read_shard(0).equals(data)


def test_a_shard_missing_the_draws_of_a_sampled_cache_is_reported(local_url, tmp_path):
    """The manifest (not the shard) says which arrays a shard must hold."""
    import shutil

    rng = np.random.default_rng(7)
    plain, lp64 = shard_of(rng, dense_rows(rng, 30, "mixed"))
    cache = Cache.create_or_open(local_url, BOTH, [{"index": 0}], logprob_encoding=U8)
    cache.write_shard(0, with_samples(rng, plain, lp64))
    other = _cache(str(tmp_path / "topk"), plain)  # u8-rel, top-k only
    shutil.rmtree(cache.fs.path(cache.shard_rel(0)))
    shutil.copytree(other.fs.path(other.shard_rel(0)), cache.fs.path(cache.shard_rel(0)))
    report = verify_cache(local_url)
    assert not report.ok and any("array 'sample_ids' is missing" in p for p in report.bad[0]), report.bad
    with pytest.raises(Exception, match="sample_ids"):
        cache.read_shard(0)


def test_a_lossy_encoding_of_a_cache_without_top_k_is_refused(local_url):
    from storage.encoding import EncodingError

    identity = {**BOTH, "targets": "sampled", "top_k": 0}
    with pytest.raises(EncodingError, match="no top-k to encode"):
        Cache.create_or_open(local_url, identity, [{"index": 0}], logprob_encoding=U8)
    assert Cache.create_or_open(local_url, identity, [{"index": 0}]).manifest.format_version == 2
