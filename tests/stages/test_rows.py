"""stages.rows: row counts, content fingerprints and row ranges without loading the whole set."""

from __future__ import annotations

import json
import random

import pytest

from stages import rows as rows_mod
from stages.rows import BadRow, DataError, open_rows


def _jsonl_with_blank_lines(path, n: int, seed: int = 0, trailing_newline: bool = True):
    """n rows with blank and whitespace-only lines between them; returns (rows, their 1-based lines)."""
    rng = random.Random(seed)
    lines, rows, where = [], [], []
    for i in range(n):
        while rng.random() < 0.2:
            lines.append(rng.choice(["", "   ", "\t", " \r"]))
        row = {"prompt": f"p{i}", "response": "r" * rng.randint(0, 30)}
        rows.append(row)
        where.append(len(lines) + 1)
        lines.append((" " if rng.random() < 0.1 else "") + json.dumps(row))  # some rows start with a space
    text = "\n".join(lines) + ("\n" if trailing_newline else "")
    path.write_text(text)
    return rows, where


@pytest.mark.parametrize("block,stride", [(1 << 20, 1024), (7, 3), (64, 1)])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_jsonl_ranges_and_lines_match_a_plain_read(tmp_path, monkeypatch, block, stride, trailing_newline):
    monkeypatch.setattr(rows_mod, "_READ_BYTES", block)  # rows and lines straddle read blocks
    monkeypatch.setattr(rows_mod, "_STRIDE", stride)
    rows, where = _jsonl_with_blank_lines(tmp_path / "a.jsonl", 57, trailing_newline=trailing_newline)
    src = open_rows(str(tmp_path / "a.jsonl"))
    assert src.num_rows == len(rows) and src.format == "jsonl"
    for a in range(0, len(rows), 5):
        for b in (a, a + 1, a + 13, len(rows)):
            assert src.read(a, min(b, len(rows))) == rows[a:min(b, len(rows))]
        assert src.location(a) == f"{tmp_path / 'a.jsonl'}:{where[a]}"


def test_a_directory_is_one_source_numbered_over_sorted_files(tmp_path):
    rows_a, _ = _jsonl_with_blank_lines(tmp_path / "part-0.jsonl", 10, seed=1)
    rows_b, where_b = _jsonl_with_blank_lines(tmp_path / "part-1.jsonl", 7, seed=2)
    src = open_rows(str(tmp_path))
    assert src.num_rows == 17
    assert src.read(8, 12) == rows_a[8:] + rows_b[:2]
    assert src.location(11) == f"{tmp_path / 'part-1.jsonl'}:{where_b[1]}"
    assert src.describe() == {"format": "jsonl", "files": ["part-0.jsonl", "part-1.jsonl"], "rows": 17}


def test_fingerprint_follows_the_content_not_the_name(tmp_path):
    _jsonl_with_blank_lines(tmp_path / "a.jsonl", 20)
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "b.jsonl").write_bytes((tmp_path / "a.jsonl").read_bytes())
    fp = open_rows(str(tmp_path / "a.jsonl")).fingerprint
    assert fp == open_rows(str(tmp_path / "copy" / "b.jsonl")).fingerprint
    text = (tmp_path / "a.jsonl").read_text()
    (tmp_path / "a.jsonl").write_text(text.replace('"p7"', '"p8"', 1))  # one character of one row
    assert open_rows(str(tmp_path / "a.jsonl")).fingerprint != fp


def test_a_malformed_line_is_a_bad_row_only_where_it_is_read(tmp_path):
    lines = [json.dumps({"prompt": f"p{i}", "response": "r"}) for i in range(6)]
    lines[4] = '{"prompt": "p4", "resp'
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    src = open_rows(str(tmp_path / "a.jsonl"))
    assert src.read(0, 4) == [json.loads(line) for line in lines[:4]]  # the bad line is never parsed
    bad = src.read(4, 5)[0]
    assert isinstance(bad, BadRow) and "not valid JSON" in bad.reason


def test_parquet_ranges_cross_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "response": f"r{i}", "extra": i} for i in range(50)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=7)
    src = open_rows(str(tmp_path / "a.parquet"), columns=["prompt", "response"])
    assert src.num_rows == 50
    assert src.read(5, 23) == [{"prompt": r["prompt"], "response": r["response"]} for r in rows[5:23]]
    assert src.location(12) == f"{tmp_path / 'a.parquet'} row 12 (0-based)"


def test_json_array_files_go_through_datasets(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(9)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    src = open_rows(str(tmp_path / "a.json"))
    assert src.num_rows == 9 and src.format == "json"
    assert src.read(3, 6) == rows[3:6]


def test_a_missing_path_offline_says_what_was_tried(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read at import time: without these the hub lookup retries the network for ~20 s
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="file not found"):
        open_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="tried as a hub dataset"):
        open_rows("no-such-user/no-such-dataset")


def test_indexing_memory_does_not_hold_the_rows(tmp_path):
    """The index keeps one offset per _STRIDE rows, not the rows."""
    with (tmp_path / "big.jsonl").open("w") as f:
        for i in range(50_000):
            f.write(json.dumps({"prompt": f"p{i}", "response": "x" * 40}) + "\n")
    src = open_rows(str(tmp_path / "big.jsonl"))
    assert src.num_rows == 50_000
    assert sum(a.size for a in src._offsets) == -(-50_000 // rows_mod._STRIDE)
    assert src.read(49_998, 50_000)[-1]["prompt"] == "p49999"
