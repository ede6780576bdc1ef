"""`atkd run` end to end with the lossy top-k encoding (cache.logprob_encoding: u8-rel)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support import harness as fh
from tests.support.fixtures import atkd_here

pytestmark = pytest.mark.integration


def test_atkd_run_with_u8_rel_captures_trains_evaluates_and_verifies(tmp_path, tiny_llama_dir, train_jsonl, capsys):
    from storage.cache import Cache

    run_dir = tmp_path / "run"
    cache = {"path": str(run_dir / "cache"), "sequences_per_shard": 20, "logprob_encoding": "u8-rel"}
    data = {"path": str(train_jsonl), "max_seq_len": 64, "holdout": {"validation": 4, "test": 4}}
    evaluation = {"max_examples": 4, "max_new_tokens": 4, "batch_size": 4, "backend": "transformers"}
    cfg = fh.write_config(tmp_path / "pipeline.yaml", model=str(tiny_llama_dir), data=str(train_jsonl),
                          run_dir=str(run_dir), cache="", max_steps=6,
                          extra={"data": data, "cache": cache, "eval": evaluation})
    rc, out = atkd_here(capsys, "run", str(cfg))
    assert rc == 0, out
    done = json.loads((run_dir / "students" / "s1" / "done.json").read_text())
    assert done["steps"] == 6
    log = [json.loads(line) for line in (run_dir / "students" / "s1" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and all(np.isfinite(losses))
    for name in ("cache", "cache-val"):  # the validation cache takes the same encoding
        c = Cache.open(str(run_dir / name))
        assert c.is_complete() and c.manifest.format_version == 2 and c.encoding.name == "u8-rel"
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert np.isfinite(results["s1"]["kl_to_teacher"])

    rc, out = atkd_here(capsys, "verify", str(run_dir / "cache"))
    assert rc == 0 and "OK" in out, out
    rc, out = atkd_here(capsys, "inspect", str(run_dir / "cache"))
    assert rc == 0 and "log-probs: u8-rel, step 0.08" in out, out

    # The same cache path with the exact encoding is another cache: refused, naming both.
    rc, out = atkd_here(capsys, "teacher", str(cfg), "cache.logprob_encoding=exact")
    assert rc != 0 and "stores top-k log-probs as u8-rel" in out and "asks for exact" in out, out
