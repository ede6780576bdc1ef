"""`atkd run` end to end on sampled teacher targets (cache format v2): teacher.targets sampled and
topk+sampled, kd and atkd students, evaluation on a top-k validation cache; and the refusals."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.support import harness as fh
from tests.support.fixtures import atkd_here


def sampled_config(tmp_path, model, data, targets: str, students: list[dict] | None = None, encoding: str = "exact"):
    path = fh.write_config(tmp_path / "pipeline.yaml", model=model, data=data, run_dir=str(tmp_path / "run"),
                           cache=str(tmp_path / "run" / "cache"), sequences_per_shard=10, max_steps=4)
    cfg = yaml.safe_load(path.read_text())
    cfg["teacher"].update(targets=targets, samples=8)
    cfg["cache"]["logprob_encoding"] = encoding
    base = cfg["students"][0]
    cfg["students"] = [{**base, "name": s["name"], "loss": {**base["loss"], **s["loss"]}}
                       for s in (students or [{"name": "kd", "loss": {"kind": "kd"}},
                                              {"name": "atkd", "loss": {"kind": "atkd"}}])]
    cfg["data"]["holdout"] = {"validation": 8, "test": 4}  # the validation cache and eval rows are held out
    cfg["eval"] = {"max_examples": 4, "backend": "transformers", "max_new_tokens": 8}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.integration
@pytest.mark.parametrize("targets, encoding", [("sampled", "exact"), ("topk+sampled", "exact"),
                                               ("topk+sampled", "u8-rel")])
def test_atkd_run_end_to_end_on_sampled_targets(tmp_path, capsys, tiny_llama_dir, train_jsonl, targets, encoding):
    import torch

    from storage.cache import Cache

    torch.set_num_threads(1)
    config = sampled_config(tmp_path, str(tiny_llama_dir), str(train_jsonl), targets, encoding=encoding)
    rc, out = atkd_here(capsys, "run", str(config))
    assert rc == 0, out[-4000:]
    run = tmp_path / "run"
    cache = Cache.open(str(run / "cache"))
    assert cache.manifest.format_version == 2 and cache.manifest.identity["targets"] == targets
    assert cache.encoding.name == encoding
    val = Cache.open(str(run / "cache-val"))  # KL / top-1 need the top-k; it takes the same encoding
    assert val.manifest.format_version == (1 if encoding == "exact" else 2) and val.encoding.name == encoding
    for name in ("kd", "atkd"):
        log = [json.loads(line) for line in (run / "students" / name / "log.jsonl").read_text().splitlines()]
        assert len(log) == 4 and all(row["loss"] == row["loss"] for row in log)  # finite
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["kd"]["kl_to_teacher"] is not None and results["atkd"]["ece"] is not None
    rc, out = atkd_here(capsys, "inspect", str(run / "cache"))
    assert rc == 0 and f"targets {targets} (8 draws per position" in out
    assert ("log-probs: no top-k log-probs (sampled targets" if targets == "sampled"
            else f"log-probs: {encoding}") in out
    assert "teacher model 'tiny_llama" in out
    rc, out = atkd_here(capsys, "verify", str(run / "cache"))
    assert rc == 0, out
    rc, out = atkd_here(capsys, "status", str(config))
    assert rc == 0 and ("8 draws per position (no top-k)" if targets == "sampled"
                        else "top-8 log-probs and 8 draws per position") in out
    if targets == "sampled":
        rc, out = atkd_here(capsys, "inspect", str(run / "cache"))
        assert "mean top-0 mass" not in out
        assert "mass" not in (run / "report" / "report.md").read_text()  # a cache of draws keeps no top-k


def test_bad_samples_and_targets_are_refused(tmp_path, tiny_llama_dir, train_jsonl):
    from pipeline.config import ConfigError, load_config

    config = sampled_config(tmp_path, str(tiny_llama_dir), str(train_jsonl), "sampled")
    assert load_config(config, ["teacher.backend=vllm"]).teacher.targets == "sampled"  # allowed: full rows
    with pytest.raises(ConfigError, match=r"teacher.samples: must be in \[1, 255\]"):
        load_config(config, ["teacher.samples=0"])
    with pytest.raises(ConfigError, match="teacher.targets: 'top-k' is not one of"):
        load_config(config, ["teacher.targets=top-k"])
    # u8-rel encodes the top-k: a sampled-only cache has none; with topk+sampled it composes.
    with pytest.raises(ConfigError, match="cache.logprob_encoding: u8-rel encodes the top-k log-probs, but "
                                          "teacher.targets: sampled stores no top-k"):
        load_config(config, ["cache.logprob_encoding=u8-rel"])
    both = load_config(config, ["cache.logprob_encoding=u8-rel", "teacher.targets=topk+sampled"])
    assert (both.teacher.targets, both.cache.logprob_encoding) == ("topk+sampled", "u8-rel")


def test_dry_run_estimates_the_draws_and_the_encoding_together(tmp_path, tiny_llama_dir, train_jsonl):
    import re

    from pipeline.config import load_config
    from pipeline.dryrun import plan

    config = sampled_config(tmp_path, str(tiny_llama_dir), str(train_jsonl), "topk")
    sizes = {}
    for targets in ("topk", "topk+sampled"):
        for encoding in ("exact", "u8-rel"):
            text, problems = plan(load_config(config, [f"teacher.targets={targets}",
                                                       f"cache.logprob_encoding={encoding}"]), "teacher")
            assert problems == [], problems
            what = "top-8 log-probs" + (" and 8 draws per position" if targets != "topk" else "")
            assert f"{what}, log-probs {encoding})" in text
            line = next(x for x in text.splitlines() if "estimated cache size" in x)
            assert f"B per top-k entry ({encoding})" in line
            assert ("B per position for 8 draws" in line) == (targets != "topk"), line
            sizes[targets, encoding] = float(re.search(r"~([\d.,]+) KiB", line).group(1).replace(",", ""))
    for targets in ("topk", "topk+sampled"):
        assert sizes[targets, "u8-rel"] < sizes[targets, "exact"]
    # the draws add the same bytes whatever the top-k encoding
    assert sizes["topk+sampled", "exact"] - sizes["topk", "exact"] == pytest.approx(
        sizes["topk+sampled", "u8-rel"] - sizes["topk", "u8-rel"], abs=0.11)
    assert sizes["topk+sampled", "u8-rel"] > sizes["topk", "u8-rel"]


@pytest.mark.integration
def test_student_loss_that_does_not_fit_the_cache_is_a_config_error(tmp_path, capsys, tiny_llama_dir, train_jsonl):
    import torch

    torch.set_num_threads(1)
    config = sampled_config(tmp_path, str(tiny_llama_dir), str(train_jsonl), "sampled",
                            [{"name": "rkl", "loss": {"kind": "kd", "divergence": "reverse_kl"}}])
    rc, out = atkd_here(capsys, "run", str(config))
    assert rc != 0 and "students[0].loss (rkl).divergence=reverse_kl on sampled teacher targets" in out, out[-2000:]
