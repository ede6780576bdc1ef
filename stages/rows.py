"""The training data's rows, read by range: nothing holds the whole set.

A `RowSource` knows its row count and a content fingerprint from one cheap
pass, and hands out rows `[start, end)` as Python dicts on demand. So a
teacher worker's memory and its time to the first shard do not grow with the
dataset: it reads (and later tokenises) only the rows of the shard it claims.

- jsonl files: one streaming pass hashes the bytes (sha256, ~1.3 GB/s here) and
  counts the non-blank lines, keeping the byte offset and line number of every
  `_STRIDE`-th row; a range is then one seek and a short read. Rows are parsed
  with `json`, so mixed-type fields reach row validation (Arrow refuses them),
  and every message names the file and its 1-based line.
- parquet files: pyarrow reads the row count from the footer and a range from
  the row groups that hold it (only the columns asked for).
- `.json` array files and hub datasets: `datasets` (Arrow, memory-mapped);
  local files are hashed like jsonl, hub datasets are identified by their
  name, split and `datasets` fingerprint.

Rows are numbered over the files in sorted order (a directory is one source).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from storage.errors import AtkdError

_EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_STRIDE = 1024  # rows between two kept offsets: memory is 16 bytes per 1024 rows
_READ_BYTES = 8 << 20
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True


class DataError(AtkdError, ValueError):
    """The data (file, row or field) is unusable; the message says where and what to do."""


@dataclass
class BadRow:
    """A row that could not even be parsed; row validation reports `reason`."""

    reason: str


def resolve_format(path: str, fmt: str = "auto", key: str = "data.path") -> str:
    """'jsonl' | 'json' | 'parquet' | 'hub' for a path (file, directory or hub name); `key` is the
    setting that names it, for messages."""
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_dir():
        found = {_EXTENSIONS[f.suffix] for f in p.iterdir() if f.suffix in _EXTENSIONS}
        if len(found) != 1:
            raise DataError(
                f"{key} {path!r}: a directory needs files of exactly one kind "
                f"(.jsonl, .json or .parquet), found {sorted(found) or 'none'}; or set data.format"
            )
        return found.pop()
    if p.suffix in _EXTENSIONS:
        if not p.exists():
            raise DataError(f"{key} {path!r}: file not found; check {key} (a relative path is "
                            f"taken from the current directory, {os.getcwd()})")
        return _EXTENSIONS[p.suffix]
    if p.exists():
        raise DataError(f"{key} {path!r}: unknown extension; use .jsonl/.json/.parquet or set data.format")
    return "hub"


def data_files(path: str, fmt: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        suffixes = [s for s, f in _EXTENSIONS.items() if f == fmt]
        return sorted(str(f) for f in p.iterdir() if f.suffix in suffixes)
    return [str(p)]


# ---------------------------------------------------------------- the interface


class RowSource:
    """Rows of one data source; see the module doc."""

    format: str = ""
    num_rows: int = 0
    fingerprint: str = ""  # "sha256:..." of the source content (identical in every worker)

    def read(self, start: int, end: int) -> list[Any]:
        """Rows [start, end) as dicts (a BadRow where a row cannot be parsed)."""
        raise NotImplementedError

    def location(self, index: int) -> str:
        """Where row `index` is, for messages ('train.jsonl:88', 'train.parquet row 87')."""
        return f"row {index}"

    def describe(self) -> dict:
        """Readable facts for the cache identity (files and row count)."""
        return {"format": self.format, "rows": self.num_rows}


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BYTES):
            h.update(block)
    return h.hexdigest()


def _combine(parts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


class _MultiFile(RowSource):
    """Rows numbered over several files; subclasses index and read one file."""

    def __init__(self, files: list[str]):
        self.files = files
        self._counts = [self._index(i, f) for i, f in enumerate(files)]
        self._starts = np.concatenate([[0], np.cumsum(self._counts)]).astype(np.int64).tolist()
        self.num_rows = int(self._starts[-1])

    def _index(self, i: int, path: str) -> int:
        raise NotImplementedError

    def _read_file(self, i: int, start: int, end: int) -> list[Any]:
        raise NotImplementedError

    def _locate(self, index: int) -> tuple[int, int]:
        f = bisect.bisect_right(self._starts, index) - 1
        return f, index - self._starts[f]

    def read(self, start: int, end: int) -> list[Any]:
        rows: list[Any] = []
        for i in range(len(self.files)):
            a, b = max(start, self._starts[i]), min(end, self._starts[i + 1])
            if a < b:
                rows.extend(self._read_file(i, a - self._starts[i], b - self._starts[i]))
        return rows

    def describe(self) -> dict:
        return {"format": self.format, "files": [os.path.basename(f) for f in self.files], "rows": self.num_rows}


class JsonlSource(_MultiFile):
    format = "jsonl"

    def __init__(self, files: list[str]):
        self._offsets: list[np.ndarray] = []  # byte offset of rows 0, STRIDE, 2*STRIDE, ... per file
        self._lines: list[np.ndarray] = []  # their 1-based line numbers
        self._digests: list[str] = []
        super().__init__(files)
        self.fingerprint = _combine(["jsonl", *self._digests])

    def _index(self, i: int, path: str) -> int:
        """One pass: hash the bytes; count non-blank lines; keep every STRIDE-th row's offset."""
        h = hashlib.sha256()
        offsets: list[int] = []
        lines: list[int] = []
        rows = line = 0
        carry, carry_pos = b"", 0  # the unfinished last line and its file offset
        with open(path, "rb") as f:
            while block := f.read(_READ_BYTES):
                h.update(block)
                data = carry + block if carry else block
                buf = np.frombuffer(data, dtype=np.uint8)
                ends = np.flatnonzero(buf == 10)
                if ends.size == 0:
                    carry = data
                    continue
                starts = np.concatenate([[0], ends[:-1] + 1])
                nonempty = ends > starts
                # A line is a row unless it is whitespace only; a line starting with a
                # non-space byte is certainly a row, the rest (rare) are checked one by one.
                lead_space = _WHITESPACE[buf[np.minimum(starts, len(buf) - 1)]]
                is_row = nonempty & ~lead_space
                for j in np.flatnonzero(nonempty & lead_space):
                    is_row[j] = bool(data[starts[j]:ends[j]].strip())
                kept = np.flatnonzero(is_row)
                pick = (rows + np.arange(kept.size)) % _STRIDE == 0
                offsets.extend((starts[kept[pick]] + carry_pos).tolist())
                lines.extend((kept[pick] + line + 1).tolist())
                rows += int(kept.size)
                line += int(ends.size)
                carry, carry_pos = data[int(ends[-1]) + 1:], carry_pos + int(ends[-1]) + 1
        if carry.strip():  # a last line without a newline
            if rows % _STRIDE == 0:
                offsets.append(carry_pos)
                lines.append(line + 1)
            rows += 1
        self._offsets.append(np.asarray(offsets, dtype=np.int64))
        self._lines.append(np.asarray(lines, dtype=np.int64))
        self._digests.append(h.hexdigest())
        return rows

    def _lines_from(self, i: int, start: int):
        """(line number, bytes) of the non-blank lines from row `start` of file i on."""
        k = start // _STRIDE
        skip = start - k * _STRIDE
        line = int(self._lines[i][k])
        with open(self.files[i], "rb") as f:
            f.seek(int(self._offsets[i][k]))
            for raw in f:
                if raw.strip():
                    if skip:
                        skip -= 1
                    else:
                        yield line, raw
                line += 1

    def _read_file(self, i: int, start: int, end: int) -> list[Any]:
        rows: list[Any] = []
        name = self.files[i]
        for _line, raw in self._lines_from(i, start):
            try:
                rows.append(json.loads(raw))
            except ValueError as e:  # the line is the row: say the column, not the decoder's "line 1"
                msg, col = getattr(e, "msg", str(e)), getattr(e, "colno", None)
                at = f"{'' if msg.endswith(' at') else ' at'} column {col}" if col else ""
                rows.append(BadRow(f"not valid JSON ({msg}{at})"))
            if len(rows) == end - start:
                break
        if len(rows) != end - start:
            raise DataError(f"{name} changed while it was being read (expected {end - start} rows "
                            f"from row {start}); do not modify the data while a stage runs")
        return rows

    def location(self, index: int) -> str:
        i, row = self._locate(index)
        line = next(self._lines_from(i, row), (None, b""))[0]
        return f"{self.files[i]}:{line}" if line is not None else f"{self.files[i]} row {row}"


class ParquetSource(_MultiFile):
    format = "parquet"

    def __init__(self, files: list[str], columns: list[str] | None = None):
        import pyarrow.parquet as pq

        self._pq = pq
        self.columns = columns
        self._group_starts: list[list[int]] = []
        self._digests: list[str] = []
        super().__init__(files)
        self.fingerprint = _combine(["parquet", *self._digests])

    def _index(self, i: int, path: str) -> int:
        try:
            meta = self._pq.ParquetFile(path).metadata
        except Exception as e:
            raise DataError(f"{path}: could not read parquet: {e}") from e
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._group_starts.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist())
        self._digests.append(file_sha256(path))
        return int(meta.num_rows)

    def _read_file(self, i: int, start: int, end: int) -> list[Any]:
        starts = self._group_starts[i]
        first = bisect.bisect_right(starts, start) - 1
        last = bisect.bisect_left(starts, end)
        pf = self._pq.ParquetFile(self.files[i])
        columns = [c for c in (self.columns or []) if c in pf.schema_arrow.names] or None
        table = pf.read_row_groups(list(range(first, last)), columns=columns)
        return table.slice(start - starts[first], end - start).to_pylist()

    def location(self, index: int) -> str:
        i, row = self._locate(index)
        return f"{self.files[i]} row {row} (0-based)"


class ArrowSource(RowSource):
    """A `datasets.Dataset` (memory-mapped Arrow): hub datasets and JSON array files."""

    def __init__(self, ds, *, fmt: str, fingerprint: str, where: str, files: list[str] | None = None):
        self.ds, self.format, self.fingerprint, self.where = ds, fmt, fingerprint, where
        self.files = files or []
        self.num_rows = len(ds)

    def read(self, start: int, end: int) -> list[Any]:
        return self.ds.select(range(start, end)).to_list()

    def location(self, index: int) -> str:
        return f"{self.where} row {index} (0-based)"

    def describe(self) -> dict:
        out = {"format": self.format, "rows": self.num_rows}
        out["files" if self.files else "dataset"] = [os.path.basename(f) for f in self.files] or self.where
        return out


def _hub_source(path: str, split: str, key: str = "data.path") -> ArrowSource:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # network, missing split, ...: say what was tried
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{key} {path!r} is not a local file or directory, so it was tried as a hub "
                        f"dataset (split {split!r}) and that failed: {first}. Check the path; offline, "
                        f"point {key} at a local .jsonl/.json/.parquet file") from None
    fingerprint = _combine(["hub", path, split, str(getattr(ds, "_fingerprint", "")), str(len(ds))])
    return ArrowSource(ds, fmt="hub", fingerprint=fingerprint, where=f"{path}[{split}]")


def _json_array_source(files: list[str]) -> RowSource:
    """JSON files holding one array (or jsonl under a .json name)."""
    with open(files[0], "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        return JsonlSource(files)
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("json", data_files=files, split="train")
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{files[0]}: could not read the JSON array ({first}); convert it to "
                        "jsonl (one object per line) to get per-line errors") from None
    fingerprint = _combine(["json", *(file_sha256(f) for f in files)])
    _say_where_arrow_went(ds, files)
    return ArrowSource(ds, fmt="json", fingerprint=fingerprint, where=files[0], files=files)


def _say_where_arrow_went(ds, files: list[str]) -> None:
    """`datasets` converts a JSON array file into Arrow files in its cache: say where, and how big."""
    paths = sorted({c["filename"] for c in ds.cache_files if "filename" in c})
    if paths:
        size = sum(os.path.getsize(p) for p in paths if os.path.exists(p))
        print(f"[data] {files[0]}: read through `datasets`, which keeps an Arrow copy ({size / 1e6:.1f} MB) in "
              f"{os.path.dirname(paths[0])} (HF_DATASETS_CACHE moves it); jsonl and parquet are read in place",
              file=sys.stderr, flush=True)


def open_rows(path: str, *, fmt: str = "auto", split: str = "train", columns: list[str] | None = None,
              key: str = "data.path") -> RowSource:
    """The row source for a data path (file, directory or hub name); `key` names the setting in messages."""
    if not path:
        raise DataError(f"{key} is empty: set it to a .jsonl/.json/.parquet file, a directory, or a hub name")
    fmt = resolve_format(path, fmt, key)
    if fmt == "hub":
        return _hub_source(path, split, key)
    files = data_files(path, fmt)
    if not files:
        raise DataError(f"{key} {path!r}: no {fmt} files found")
    if fmt == "jsonl":
        return JsonlSource(files)
    if fmt == "parquet":
        return ParquetSource(files, columns)
    return _json_array_source(files)
