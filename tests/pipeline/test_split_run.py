"""`atkd run` with data.holdout: every stage reads its part of one source, and evaluation refuses
training rows unless eval.allow_train_overlap (through the CLI, tiny teacher and student)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests.support import harness as fh
from tests.support.fixtures import atkd_here


@pytest.mark.integration
def test_run_with_a_holdout_split_then_eval_on_training_rows(tmp_path, tiny_llama_dir, train_jsonl, capsys):
    from stages import split
    from stages.data_config import DataConfig, HoldoutConfig
    from storage.cache import Cache

    run_dir = tmp_path / "run"
    cfg = fh.write_config(tmp_path / "pipeline.yaml", model=str(tiny_llama_dir), data=str(train_jsonl),
                          run_dir=str(run_dir), cache=str(run_dir / "cache"), sequences_per_shard=16,
                          max_steps=2, checkpoint_every=2,
                          extra={"eval": {"max_examples": 4, "max_new_tokens": 4, "batch_size": 4,
                                          "backend": "transformers"}})
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["holdout"] = {"validation": 6, "test": 0.1, "seed": 0}
    cfg.write_text(yaml.safe_dump(raw))

    rc, out = atkd_here(capsys, "run", str(cfg), "--dry-run")
    assert rc == 0 and "data.holdout: train 30, validation 6, test 4 rows" in out, out
    rc, out = atkd_here(capsys, "run", str(cfg))
    assert rc == 0, out
    record = json.loads((run_dir / "split.json").read_text())
    assert record["sizes"] == {"train": 30, "validation": 6, "test": 4} and record["fingerprint"].startswith("sha256:")
    parts = split.part_of(DataConfig(path="x", holdout=HoldoutConfig(validation=6, test=0.1)), 40, np.arange(40))

    def ids(url):
        cache = Cache.open(url)
        return cache.manifest.identity["holdout"]["part"], np.concatenate(
            [cache.read_shard(i).example_ids for i in cache.completed_shards()]).tolist()

    assert ids(str(run_dir / "cache")) == ("train", np.flatnonzero(parts == "train").tolist())
    assert ids(str(run_dir / "cache-val")) == ("validation", np.flatnonzero(parts == "validation").tolist())
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["eval"]["path"] == str(train_jsonl)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert "generation metrics on 4 rows of the held-out test part" in out
    for res in results.values():
        assert res["num_examples"] == 4 and res["train_overlap"] == 0 and res["kl_to_teacher"] is not None

    # Another eval file holding one training row (and one new row): refused, then allowed loudly.
    rows = [json.loads(line) for line in train_jsonl.read_text().splitlines()]
    first_train = int(np.flatnonzero(parts == "train")[0])
    other = fh.write_jsonl(tmp_path / "other.jsonl", [{"prompt": "new", "response": " row"}, rows[first_train]])
    rc, out = atkd_here(capsys, "eval", str(cfg), f"eval.path={other}")
    assert rc != 0
    assert "1 of the 2 test rows have the same content" in out and f"training {train_jsonl}:{first_train + 1}" in out
    assert "eval.allow_train_overlap=true" in out
    rc, out = atkd_here(capsys, "eval", str(cfg), f"eval.path={other}", "eval.allow_train_overlap=true")
    assert rc == 0, out
    assert "WARNING: evaluation rows are training rows" in out
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["s1"]["train_overlap"] == 1 and results["s1"]["num_examples"] == 2
