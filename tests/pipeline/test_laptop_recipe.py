"""The paper's recipe at laptop size (configs/laptop-dolly.yaml), end to end through `atkd run`:
held-out split, teacher fine-tune, cache, SFT/KD/ATKD students, evaluation on the test part.
And the laptop config is the real configs' recipe: the same sections and settings, other sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.support.fixtures import atkd_here

ROOT = Path(__file__).resolve().parents[2]
LAPTOP = ROOT / "configs" / "laptop-dolly.yaml"
REAL = [ROOT / "configs" / "opt-6.7b-dolly.yaml", ROOT / "configs" / "pythia-6.9b-dolly.yaml"]


def _keys(node, prefix="") -> set[str]:
    """Every key path of a config, students by loss kind (their names differ)."""
    if isinstance(node, dict):
        return set().union(*[{prefix + k} | _keys(v, f"{prefix}{k}.") for k, v in node.items()]) if node else set()
    if isinstance(node, list) and all(isinstance(v, dict) for v in node):
        return set().union(*[_keys(v, f"{prefix}[{v.get('loss', {}).get('kind')}].") for v in node])
    return set()


# What a laptop may leave out or add: hub/GPU-only settings and the sizes of things.
GPU_ONLY = {"data.format", "data.split", "teacher.max_num_seqs", "teacher.tensor_parallel_size",
            "teacher.finetune.fsdp", "teacher.finetune.gradient_checkpointing"}
LAPTOP_ONLY = {"teacher.enforce_eager"}


@pytest.mark.parametrize("real", REAL, ids=lambda p: p.name)
def test_the_laptop_recipe_has_the_real_configs_sections_and_stages(real):
    laptop, paper = yaml.safe_load(LAPTOP.read_text()), yaml.safe_load(real.read_text())
    lk = {k for k in _keys(laptop) if not k.endswith("gradient_checkpointing")}
    pk = {k for k in _keys(paper) if not k.endswith("gradient_checkpointing")}
    assert pk - lk <= GPU_ONLY, pk - lk
    assert lk - pk <= LAPTOP_ONLY, lk - pk
    for key in ("template", "template_fields", "kind", "response_field"):
        assert laptop["data"][key] == paper["data"][key], key
    assert laptop["teacher"]["finetune"]["enabled"] is True and laptop["data"]["holdout"]
    assert "path" not in laptop["eval"] and "path" not in paper["eval"]  # both evaluate on the test part
    kinds = lambda cfg: sorted({s["loss"]["kind"] for s in cfg["students"]})  # noqa: E731
    assert kinds(laptop) == kinds(paper) == ["atkd", "kd", "sft"]


def _load_recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("laptop_recipe", ROOT / "scripts" / "laptop_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_the_laptop_recipe_runs_end_to_end(tmp_path, monkeypatch, capsys):
    recipe = _load_recipe()

    monkeypatch.chdir(tmp_path)  # the config's paths are relative, as for a user in the repo
    recipe.build(Path("runs/laptop-dolly/workspace"), rows=1200)
    rc, out = atkd_here(capsys, "run", str(LAPTOP))
    assert rc == 0, out[-3000:]
    run = tmp_path / "runs" / "laptop-dolly"
    split = json.loads((run / "split.json").read_text())
    assert (split["sizes"]["validation"], split["sizes"]["test"]) == (100, 100)
    assert json.loads((run / "teacher-finetuned" / "final" / "atkd_finetune.json").read_text())
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results) == {"teacher", "sft", "kd", "atkd"}
    for name, r in results.items():
        assert r["train_overlap"] == 0 and r["num_examples"] == 100, (name, r)
        assert 0.0 <= r["rouge_l"] <= 1.0
    # The cached teacher is the fine-tuned one, and the distilled students have a KL to it.
    assert results["teacher"]["model_dir"].endswith("teacher-finetuned/final")
    assert results["kd"]["kl_to_teacher"] is not None and results["atkd"]["kl_to_teacher"] is not None
    rc, out = atkd_here(capsys, "run", str(LAPTOP))
    assert rc == 0 and "nothing to do" in out
