"""Stage one with the transformers engine: numerics, capture, refusals; resume after SIGKILL and
concurrent workers (some killed) in worker processes of tests/support/harness.py (integration tier)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support import harness as fh
from pipeline.config import CacheConfig, DataConfig, TeacherConfig
from stages.data import load_examples
from stages.teacher.engine_hf import HFTeacherEngine, length_batches

TOP_K = 8
SEED = 6


def dense_reference(model_dir, examples):
    """float64 log-softmax over the full vocabulary, one sequence at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = []
    with torch.inference_mode():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            lp = logits.log_softmax(-1)[torch.as_tensor(ex.target_positions, dtype=torch.long)]
            out.append(lp.numpy())
    return out


def check_rows_against_dense(rows, dense, examples, atol):
    """Top-k ids equal where the log-probs are not tied; log-probs and gold within atol."""
    for r, d, ex in zip(rows, dense, examples):
        order = np.argsort(-d, axis=1, kind="stable")[:, :TOP_K]
        ref_lp = np.take_along_axis(d, order, axis=1)
        np.testing.assert_allclose(r.topk_logprobs, ref_lp, atol=atol)
        # ids: equal unless the neighbouring reference log-probs are within tolerance (a tie)
        for i in range(len(order)):
            for j in range(TOP_K):
                if r.topk_ids[i, j] != order[i, j]:
                    assert abs(d[i, r.topk_ids[i, j]] - ref_lp[i, j]) <= 2 * atol, (i, j)
        gold = np.asarray(ex.input_ids)[np.asarray(ex.target_positions) + 1]
        np.testing.assert_allclose(r.target_logprobs, d[np.arange(len(gold)), gold], atol=atol)


@pytest.fixture(scope="module")
def data_cfg(train_jsonl):
    return DataConfig(path=str(train_jsonl), max_seq_len=64)


@pytest.fixture(scope="module")
def examples(data_cfg, tiny_tokenizer):
    exs, stats = load_examples(data_cfg, tiny_tokenizer)
    assert stats.truncated > 0  # the data exercises truncation
    return exs


def teacher_cfg(model_dir, **kw) -> TeacherConfig:
    # overlap_writes: the background writer runs beside scoring as on a GPU, so kills land in it too
    base = dict(model=str(model_dir), backend="transformers", top_k=TOP_K, batch_tokens=256, logprob_chunk=37,
                overlap_writes=True)
    base.update(kw)
    return TeacherConfig(**base)


def test_length_batches_respect_budget_and_cover_all():
    lengths = [5, 50, 7, 50, 20, 3, 64]
    batches = length_batches(lengths, 100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 100 or len(b) == 1
    assert batches == length_batches(lengths, 100)


def test_hf_engine_matches_dense_float64_reference(tiny_llama_dir, examples):
    subset = examples[:12]
    engine = HFTeacherEngine(str(tiny_llama_dir), dtype="float32", device="cpu", batch_tokens=200, logprob_chunk=13)
    try:
        rows = engine.score(subset, TOP_K)
    finally:
        engine.close()
    for r, ex in zip(rows, subset):
        assert r.topk_ids.shape == (ex.num_targets, TOP_K) and r.topk_ids.dtype == np.int32
        assert np.all(np.diff(r.topk_logprobs, axis=1) <= 0)
    check_rows_against_dense(rows, dense_reference(tiny_llama_dir, subset), subset, atol=1e-4)


# ---------------------------------------------------------------- capture


def read_cache(path):
    from storage.cache import Cache

    cache = Cache.open(str(path))
    assert cache.is_complete()
    return cache, [cache.read_shard(i) for i in range(cache.num_shards)]


def assert_caches_equal(a, b):
    ca, sa = read_cache(a)
    cb, sb = read_cache(b)
    assert ca.manifest.identity == cb.manifest.identity and ca.manifest.shard_plan == cb.manifest.shard_plan
    for i, (x, y) in enumerate(zip(sa, sb)):
        assert x.equals(y), f"shard {i} differs"


@contextlib.contextmanager
def one_thread():
    """In-process captures that are compared bit for bit with worker processes run with one
    thread, as the workers do (capture_child): another thread count rounds differently,
    and earlier tests in the session may have changed this process's count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, data_cfg, tiny_llama_dir, examples):
    """An uninterrupted single-worker capture (5 shards of 8 sequences)."""
    from stages.teacher.capture import run_capture

    path = tmp_path_factory.mktemp("ref") / "cache"
    with one_thread():
        summary = run_capture(data_cfg, teacher_cfg(tiny_llama_dir), CacheConfig(path=str(path), sequences_per_shard=8))
    assert summary.shards_written == summary.shards_total == 5 and summary.engine == "transformers"
    assert summary.sequences == len(examples)
    return path


def test_capture_contents(reference_cache, tiny_llama_dir, examples):
    cache, shards = read_cache(reference_cache)
    ident = cache.manifest.identity
    assert ident["top_k"] == TOP_K and ident["vocab_size"] == 512 and ident["max_seq_len"] == 64
    records = [r for s in shards for r in s.sequences()]
    assert [r.example_id for r in records] == [e.example_id for e in examples]
    engine = HFTeacherEngine(str(tiny_llama_dir), dtype="float32", device="cpu")
    try:
        rows = engine.score(examples, TOP_K)
    finally:
        engine.close()
    for rec, ex, r in zip(records, examples, rows):
        assert rec.input_ids.tolist() == ex.input_ids
        assert rec.target_positions.tolist() == ex.target_positions.tolist()
        assert rec.topk_logprobs.dtype == np.float16
        np.testing.assert_allclose(rec.topk_logprobs.astype(np.float32), r.topk_logprobs, atol=4e-3, rtol=1e-3)
        np.testing.assert_allclose(rec.target_logprobs, r.target_logprobs, atol=1e-5)


def test_rerun_of_finished_cache_is_instant(reference_cache, data_cfg, tiny_llama_dir):
    from stages.teacher.capture import run_capture

    summary = run_capture(data_cfg, teacher_cfg(tiny_llama_dir),
                          CacheConfig(path=str(reference_cache), sequences_per_shard=8))
    assert summary.shards_written == 0 and summary.shards_skipped == 5 and summary.engine == ""


@pytest.mark.parametrize(
    "change, key",
    [
        ({"teacher": {"top_k": 4}}, "top_k"),
        ({"data": {"template": "Q: {prompt}\nA:"}}, "template"),
        ({"teacher": {"model": "OTHER"}}, "teacher_fingerprint"),
        ({"data": {"max_seq_len": 48}}, "max_seq_len"),
    ],
)
def test_mismatched_rerun_is_refused(reference_cache, data_cfg, tiny_llama_dir, other_llama_dir, change, key):
    from storage.cache import CacheMismatchError
    from stages.teacher.capture import run_capture

    d = dataclasses.replace(data_cfg, **change.get("data", {}))
    t_kw = dict(change.get("teacher", {}))
    model = other_llama_dir if t_kw.pop("model", None) == "OTHER" else tiny_llama_dir
    with pytest.raises(CacheMismatchError) as e:
        run_capture(d, teacher_cfg(model, **t_kw), CacheConfig(path=str(reference_cache), sequences_per_shard=8))
    assert f"identity.{key}" in str(e.value)


# ---------------------------------------------------------------- processes


def capture_child(spec: dict) -> None:
    """run_capture in a worker process (tests/support/harness.call): one thread, as the in-process
    references (one_thread); the summary is written as JSON to spec["summary_path"]."""
    import torch

    from stages.teacher.capture import run_capture

    torch.set_num_threads(1)
    summary = run_capture(DataConfig(**spec["data"]), TeacherConfig(**spec["teacher"]),
                          CacheConfig(**spec["cache"]), progress=False)
    Path(spec["summary_path"]).write_text(json.dumps(summary.as_dict()))


def worker_spec(data_cfg, model_dir, cache_path, summary_path, **teacher_kw):
    return {
        "data": dataclasses.asdict(data_cfg),
        "teacher": dataclasses.asdict(teacher_cfg(model_dir, **teacher_kw)),
        "cache": {"path": str(cache_path), "sequences_per_shard": 8},
        "summary_path": str(summary_path),
    }


@pytest.mark.integration
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, reference_cache, data_cfg, tiny_llama_dir):
    from stages.teacher.capture import run_capture
    from storage.cache import Cache

    path = tmp_path / "cache"
    spec = worker_spec(data_cfg, tiny_llama_dir, path, tmp_path / "s.json", lease_seconds=1.0)
    # SIGKILLed right after its second shard became visible (leases and manifest not yet updated)
    proc = fh.call(capture_child, (spec,), tmp_path / "killed.log", env={"ATKD_FAULT_POINT": "shard.committed:2"})
    assert proc.wait(120) in fh.KILLED, proc.output()
    assert not (tmp_path / "s.json").exists()
    done = Cache.open(str(path)).completed_shards()
    assert len(done) == 2
    with one_thread():
        summary = run_capture(data_cfg, teacher_cfg(tiny_llama_dir, lease_seconds=1.0),
                              CacheConfig(path=str(path), sequences_per_shard=8), progress=False)
    assert summary.shards_skipped == len(done) and summary.shards_written == 5 - len(done)
    assert_caches_equal(path, reference_cache)


@pytest.mark.integration
def test_concurrent_workers_some_killed_write_every_shard_once(tmp_path, reference_cache, data_cfg, tiny_llama_dir):
    """Four workers on one cache; one killed mid-commit, one mid-write, one at a seeded random moment.
    Whatever the killed workers held is taken over at once (same host, dead pid): w0 finishes the cache."""
    from pipeline import cli

    path, trace = tmp_path / "cache", tmp_path / "trace.txt"
    points = [None, "shard.commit:1", None, "shard.write:1"]
    procs = []
    for i, point in enumerate(points):
        env = {"ATKD_FAULT_TRACE": str(trace), **({"ATKD_FAULT_POINT": point} if point else {})}
        procs.append(fh.call(capture_child, (worker_spec(data_cfg, tiny_llama_dir, path, tmp_path / f"w{i}.json"),),
                             tmp_path / f"w{i}.log", env=env))
    time.sleep(random.Random(SEED).uniform(0.8, 1.6))
    procs[2].kill()
    rcs = [p.wait(120) for p in procs]
    assert rcs[0] == 0, procs[0].output()
    assert set(rcs) <= {0, *fh.KILLED} and sum(rc in fh.KILLED for rc in rcs) >= 2, rcs
    written = fh.committed_shards(trace)
    assert len(written) == len(set(written)), f"a shard was committed twice: {sorted(written)}"
    missing = set(range(5)) - set(written)
    assert not missing or rcs[2] in fh.KILLED, f"shards {missing} have no recorded commit"  # killed mid-trace only
    summaries = [json.loads((tmp_path / f"w{i}.json").read_text()) for i, rc in enumerate(rcs) if rc == 0]
    assert all(s["shards_lost"] == 0 for s in summaries), summaries
    for s in summaries:  # what a finished worker says it wrote, the trace saw it commit
        assert set(s["written_shards"]) <= set(written), (s, written)
    assert_caches_equal(path, reference_cache)
    assert cli.main(["verify", str(path)]) == 0


def test_other_tokenizer_is_refused_with_the_difference(tmp_path, reference_cache, data_cfg, tiny_llama_dir):
    import shutil

    from transformers import AutoTokenizer

    from storage.cache import CacheMismatchError
    from stages.teacher.capture import run_capture

    model = tmp_path / Path(tiny_llama_dir).name  # same directory name and weights, other EOS
    shutil.copytree(tiny_llama_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.eos_token = "<unk>"
    tok.save_pretrained(model)
    with pytest.raises(CacheMismatchError) as e:
        run_capture(data_cfg, teacher_cfg(model), CacheConfig(path=str(reference_cache), sequences_per_shard=8))
    msg = str(e.value)
    assert "identity.tokenizer_fingerprint" in msg and "identity.teacher_fingerprint" not in msg
    assert "eos token id 1 vs 2" in msg


def test_writes_overlap_scoring_only_for_an_engine_on_a_gpu():
    from types import SimpleNamespace

    from stages.teacher.shard_writer import engine_overlaps

    assert engine_overlaps(SimpleNamespace(device="cuda"))
    assert engine_overlaps(SimpleNamespace(device="cuda:3"))
    assert not engine_overlaps(SimpleNamespace(device="cpu"))
    assert not engine_overlaps(SimpleNamespace())


def test_an_engine_passed_in_is_checked_and_recorded_like_one_started_here(tmp_path, data_cfg, tiny_llama_dir):
    from stages.teacher.capture import run_capture
    from storage.cache import Cache

    engine = HFTeacherEngine(str(tiny_llama_dir), dtype="float32", device="cpu", batch_tokens=256)
    try:
        summary = run_capture(data_cfg, teacher_cfg(tiny_llama_dir), CacheConfig(path=str(tmp_path / "c"),
                              sequences_per_shard=8), progress=False, engine=engine)
    finally:
        engine.close()
    assert summary.engine == "transformers" and summary.shards_written == 5
    assert Cache.open(str(tmp_path / "c")).manifest.provenance["engine"] == "transformers"
