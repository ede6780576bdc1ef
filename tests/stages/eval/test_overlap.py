"""Evaluation refuses rows that are training rows (stages/eval/overlap.py), by content, wherever they are."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import DataConfig, EvalConfig
from stages import split
from stages.eval import overlap
from stages.data import open_source
from stages.data_config import HoldoutConfig
from stages.errors import EvalError
from tests.support import fixtures


def _rows(n):
    return [{"prompt": f"question {i}", "response": f"answer {i}", "other": i} for i in range(n)]


def _eval(data_cfg, eval_cfg):
    return overlap.eval_rows(data_cfg, eval_cfg, open_source(data_cfg))


def test_the_training_file_as_eval_data_is_refused_with_the_rows_and_the_fix(tmp_path):
    train = fixtures.write_jsonl(tmp_path / "train.jsonl", _rows(50))
    data_cfg = DataConfig(path=str(train))
    rows = _eval(data_cfg, EvalConfig(path=str(train), max_examples=6))
    with pytest.raises(EvalError) as info:
        overlap.check_train_overlap(data_cfg, [rows], allow=False)
    message = str(info.value)
    assert "6 of the 6 test rows have the same content (prompt, response)" in message
    assert f"test {train}:1 = training {train}:1" in message
    assert "data.holdout" in message and "eval.allow_train_overlap=true" in message


def test_the_override_warns_records_the_count_and_a_rerun_does_not_rescan(tmp_path, capsys, monkeypatch):
    train = fixtures.write_jsonl(tmp_path / "train.jsonl", _rows(50))
    # Another file: two training rows (one with other whitespace and another unused field) among new ones.
    other = fixtures.write_jsonl(tmp_path / "other.jsonl", [
        {"prompt": "new 1", "response": "x"}, {"prompt": "question  7 ", "response": "answer 7", "other": -1},
        {"prompt": "question 3", "response": "answer 3"}, {"prompt": "question 3", "response": "answer 4"}])
    data_cfg = DataConfig(path=str(train))
    rows = _eval(data_cfg, EvalConfig(path=str(other)))
    with pytest.raises(EvalError, match="2 of the 4 test rows"):
        overlap.check_train_overlap(data_cfg, [rows], allow=False)
    record = overlap.check_train_overlap(data_cfg, [rows], allow=True, out_dir=tmp_path / "eval")
    assert record["overlap"] == 2 and record["train_rows_scanned"] == 50
    assert {(e["eval_row"], e["train_row"]) for e in record["examples"]} == {(1, 7), (2, 3)}
    assert "WARNING: evaluation rows are training rows: 2 of the 4" in capsys.readouterr().err
    assert json.loads((tmp_path / "eval" / "overlap.json").read_text())["overlap"] == 2

    def no_scan(*a, **k):
        raise AssertionError("rescanned the training rows")

    monkeypatch.setattr(split, "train_rows", no_scan)
    assert overlap.check_train_overlap(data_cfg, [rows], allow=True, out_dir=tmp_path / "eval")["overlap"] == 2
    rows.rows = rows.rows[:1]  # other evaluation rows: another key, so a scan
    with pytest.raises(AssertionError, match="rescanned"):
        overlap.check_train_overlap(data_cfg, [rows], allow=True, out_dir=tmp_path / "eval")


def test_a_duplicate_row_that_lands_in_train_and_test_is_caught(tmp_path):
    n, holdout = 60, HoldoutConfig(validation=5, test=10, seed=0)
    probe = DataConfig(path="x", holdout=holdout)
    parts = split.part_of(probe, n, np.arange(n))
    a, b = int(np.flatnonzero(parts == "train")[0]), int(np.flatnonzero(parts == "test")[0])
    rows = _rows(n)
    clean = fixtures.write_jsonl(tmp_path / "clean.jsonl", rows)
    rows[b] = dict(rows[a])  # the same example at two indices: the split puts one in train, one in test
    dup = fixtures.write_jsonl(tmp_path / "dup.jsonl", rows)

    data_cfg = DataConfig(path=str(clean), holdout=holdout)
    test = _eval(data_cfg, EvalConfig(path=str(clean)))
    assert sorted(test.indices) == np.flatnonzero(parts == "test").tolist()  # same source: its test part
    assert overlap.check_train_overlap(data_cfg, [test], allow=False)["overlap"] == 0

    data_cfg = DataConfig(path=str(dup), holdout=holdout)
    test = _eval(data_cfg, EvalConfig(path=str(dup)))
    with pytest.raises(EvalError) as info:
        overlap.check_train_overlap(data_cfg, [test], allow=False)
    assert "1 of the 10 test rows" in str(info.value)
    assert "remove the repeated rows from data.path" in str(info.value)  # the fix for this cause
    assert f"test {dup}:{b + 1} = training {dup}:{a + 1}" in str(info.value)


def test_fingerprints_follow_the_fields_that_shape_the_sequence():
    cfg = DataConfig(template="{instruction}[[ {context}]] ->", template_fields=["instruction", "context"])
    assert overlap.content_fields(cfg) == ["instruction", "context", "response"]
    fields = overlap.content_fields(cfg)
    row = {"instruction": "do", "context": "c", "response": "r", "category": "x"}
    assert overlap.row_fingerprint(row, fields) == overlap.row_fingerprint({**row, "category": "y"}, fields)
    assert overlap.row_fingerprint(row, fields) != overlap.row_fingerprint({**row, "context": "d"}, fields)
    chat = DataConfig(kind="messages")
    msgs = {"messages": [{"role": "user", "content": "hi  there"}, {"role": "assistant", "content": "yo"}]}
    same = {"messages": [{"role": "user", "content": "hi there", "name": "u"}, {"role": "assistant", "content": "yo"}]}
    f = overlap.content_fields(chat)
    assert f == ["messages"] and overlap.row_fingerprint(msgs, f) == overlap.row_fingerprint(same, f)
