"""The configs users copy (pipeline.yaml, configs/*.yaml) load and validate, and their templates
render a Dolly row with and without its context as intended."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from stages.data import DataError
from stages.template import fill_template

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _field(row, where, name):
    if not isinstance(row.get(name), str):
        raise DataError(f"{where}: field {name!r} is missing")
    return row[name]


@pytest.mark.parametrize("path", [ROOT / "pipeline.yaml", *CONFIGS], ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.students and cfg.teacher.model


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_dolly_configs_keep_the_context_when_a_row_has_one(path):
    data = load_config(path).data
    with_context = fill_template(data, {"instruction": "Summarise.", "context": "Some text."}, "row 0", _field)
    without = fill_template(data, {"instruction": "Summarise.", "context": ""}, "row 0", _field)
    assert "### Instruction:\nSummarise.\n\n### Input:\nSome text.\n\n### Response:\n" in with_context
    assert without.endswith("### Instruction:\nSummarise.\n\n### Response:\n") and "Input" not in without


@pytest.mark.parametrize("path", [p for p in CONFIGS if "laptop" not in p.name], ids=lambda p: p.name)
def test_paper_configs_dry_run_prints_the_whole_plan_without_downloading(path, tmp_path, monkeypatch, capsys):
    from tests.support.fixtures import atkd_here

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt would fail, not hang
    rc, out = atkd_here(capsys, "run", str(path), "--dry-run")
    assert rc == 0, out
    cfg = load_config(path)
    ft = f"{cfg.run_dir}/teacher-finetuned"
    assert f"teacher fine-tune -> {ft}: not started: would fine-tune {cfg.teacher.model}" in out
    assert f"stage one: teacher {cfg.run_dir}/teacher-finetuned/final (backend vllm, top-64 log-probs" in out
    assert "row count unknown (a hub dataset: a dry run downloads nothing)" in out
    for s in cfg.students:
        assert f"student {s.name} ({s.loss.kind}, parameters unknown" in out and "would train 3 epoch(s)" in out
    assert not list(tmp_path.iterdir())  # nothing written
