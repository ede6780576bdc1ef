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
