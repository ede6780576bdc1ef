"""`atkd run` end to end on sampled teacher targets (cache format v2): teacher.targets sampled and
topk+sampled, kd and atkd students, evaluation on a top-k validation cache; and the refusals."""

from __future__ import annotations

import json

import pytest
import yaml

from bench import _harness as fh
from tests.fixtures import atkd_here


def sampled_config(tmp_path, model, data, targets: str, students: list[dict] | None = None):
    path = fh.write_config(tmp_path / "pipeline.yaml", model=model, data=data, run_dir=str(tmp_path / "run"),
                           cache=str(tmp_path / "run" / "cache"), sequences_per_shard=10, max_steps=4)
    cfg = yaml.safe_load(path.read_text())
    cfg["teacher"].update(targets=targets, samples=8)
    base = cfg["students"][0]
    cfg["students"] = [{**base, "name": s["name"], "loss": {**base["loss"], **s["loss"]}}
                       for s in (students or [{"name": "kd", "loss": {"kind": "kd"}},
                                              {"name": "atkd", "loss": {"kind": "atkd"}}])]
    cfg["data"]["holdout"] = {"validation": 8, "test": 4}  # the validation cache and eval rows are held out
    cfg["eval"] = {"max_examples": 4, "backend": "transformers", "max_new_tokens": 8}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.integration
@pytest.mark.parametrize("targets", ["sampled", "topk+sampled"])
def test_atkd_run_end_to_end_on_sampled_targets(tmp_path, capsys, tiny_llama_dir, train_jsonl, targets):
    import torch

    from storage.cache import Cache

    torch.set_num_threads(1)
    config = sampled_config(tmp_path, str(tiny_llama_dir), str(train_jsonl), targets)
    rc, out = atkd_here(capsys, "run", str(config))
    assert rc == 0, out[-4000:]
    run = tmp_path / "run"
    cache = Cache.open(str(run / "cache"))
    assert cache.manifest.format_version == 2 and cache.manifest.identity["targets"] == targets
    assert Cache.open(str(run / "cache-val")).manifest.format_version == 1  # KL / top-1 need the top-k
    for name in ("kd", "atkd"):
        log = [json.loads(line) for line in (run / "students" / name / "log.jsonl").read_text().splitlines()]
        assert len(log) == 4 and all(row["loss"] == row["loss"] for row in log)  # finite
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["kd"]["kl_to_teacher"] is not None and results["atkd"]["ece"] is not None
    rc, out = atkd_here(capsys, "inspect", str(run / "cache"))
    assert rc == 0 and f"targets {targets} (8 draws per position" in out
    rc, out = atkd_here(capsys, "verify", str(run / "cache"))
    assert rc == 0, out


def test_bad_samples_and_targets_are_refused(tmp_path, tiny_llama_dir, train_jsonl):
    from pipeline.config import ConfigError, load_config

    config = sampled_config(tmp_path, str(tiny_llama_dir), str(train_jsonl), "sampled")
    assert load_config(config, ["teacher.backend=vllm"]).teacher.targets == "sampled"  # allowed: full rows
    with pytest.raises(ConfigError, match=r"teacher.samples: must be in \[1, 255\]"):
        load_config(config, ["teacher.samples=0"])
    with pytest.raises(ConfigError, match="teacher.targets: 'top-k' is not one of"):
        load_config(config, ["teacher.targets=top-k"])


@pytest.mark.integration
def test_student_loss_that_does_not_fit_the_cache_is_a_config_error(tmp_path, capsys, tiny_llama_dir, train_jsonl):
    import torch

    torch.set_num_threads(1)
    config = sampled_config(tmp_path, str(tiny_llama_dir), str(train_jsonl), "sampled",
                            [{"name": "rkl", "loss": {"kind": "kd", "divergence": "reverse_kl"}}])
    rc, out = atkd_here(capsys, "run", str(config))
    assert rc != 0 and "students[0].loss (rkl).divergence=reverse_kl on sampled teacher targets" in out, out[-2000:]
