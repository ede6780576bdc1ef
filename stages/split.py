"""Held-out splits of one data source: train / validation / test, shared by every stage.

With `data.holdout` set, row i of the used rows [0, n) (n = the source's rows, or
data.limit) belongs to a part by its position p = perm(i) in a seeded bijective
permutation of [0, n): p < n_validation -> validation, p < n_validation + n_test ->
test, otherwise train. So the sizes are exact, the parts are disjoint and cover
every row, and a row's part is a pure function of (seed, i, n): nothing is
materialised. The permutation is a 6-round Feistel network on the smallest
power-of-4 domain holding n, walked in cycles until it lands in [0, n)
(expected < 4 steps); its inverse lists a small part's rows in O(part) without
touching the others.

Every stage reads a part through the same two functions:
- `shard_plan(data_cfg, n, rows_per_shard)`: row ranges [row_start, row_end) of the
  source; a shard holds the members of its part in its range. The train part keeps
  fixed ranges of `rows_per_shard` source rows (computable from n alone); the small
  parts are cut every `rows_per_shard` members, so their few rows make few shards.
- `read_part(data_cfg, source, n, start, end)`: (row indices, rows) of the part's
  members in [start, end), read by range (the small parts' rows in coalesced reads).
`train_rows(data_cfg)` streams the training rows by range: what SFT from the data,
teacher fine-tuning and the overlap check read.

Without `data.holdout` every row is train and the plan is today's (no split).
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, Iterator

import numpy as np

from stages.data import num_rows as used_rows
from stages.data import open_source
from stages.data_config import DataConfig, HoldoutConfig
from stages.fingerprint import splitmix64
from stages.rows import DataError, RowSource

PERMUTATION = "feistel6-v1"  # bumped if the permutation below ever changes (it is part of the identity)
PARTS = ("train", "validation", "test")
_ROUNDS = 6
_GAP = 256  # a small part's rows closer than this are read in one range
_READ_CHUNK = 4096  # source rows per read when streaming a part


# ---------------------------------------------------------------- the permutation


def _keys(seed: int) -> np.ndarray:
    digest = hashlib.sha256(f"atkd-split/{PERMUTATION}/{int(seed)}".encode()).digest()
    return np.frombuffer(digest[: 8 * _ROUNDS], dtype="<u8").astype(np.uint64)


def _half_bits(n: int) -> int:
    return max(1, (max(n - 1, 1).bit_length() + 1) // 2)


def _feistel(x: np.ndarray, keys: np.ndarray, h: int, inverse: bool) -> np.ndarray:
    mask, shift = np.uint64((1 << h) - 1), np.uint64(h)
    left, right = x >> shift, x & mask
    if not inverse:
        for k in keys:
            left, right = right, left ^ (splitmix64(right ^ k) & mask)
    else:
        for k in keys[::-1]:
            left, right = right ^ (splitmix64(left ^ k) & mask), left
    return (left << shift) | right


def permute(indices, n: int, seed: int, *, inverse: bool = False) -> np.ndarray:
    """perm(i) (or its inverse) for each i in `indices` (all in [0, n)): a bijection of [0, n)."""
    x = np.asarray(indices, dtype=np.uint64).copy()
    if x.size and int(x.max()) >= n:
        raise ValueError(f"index {int(x.max())} outside [0, {n})")
    keys, h = _keys(seed), _half_bits(n)
    out = _feistel(x, keys, h, inverse)
    outside = out >= np.uint64(n)
    while outside.any():  # cycle walking: the cycle through x returns into [0, n)
        out[outside] = _feistel(out[outside], keys, h, inverse)
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


# ---------------------------------------------------------------- sizes and membership


def _count(value, n: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: expected a row count or a fraction in [0, 1), got {value!r}")
    if isinstance(value, float):
        if not 0.0 <= value < 1.0:
            raise DataError(f"{where}: a fraction must be in [0, 1), got {value}; give a whole number for a count")
        return int(np.floor(value * n + 0.5))
    if value < 0:
        raise DataError(f"{where}: must be >= 0, got {value}")
    return int(value)


def sizes(holdout: HoldoutConfig, n: int) -> dict[str, int]:
    """{'train', 'validation', 'test'} row counts of n rows (fractions rounded to the nearest row)."""
    n_val = _count(holdout.validation, n, "data.holdout.validation")
    n_test = _count(holdout.test, n, "data.holdout.test")
    if n_val + n_test >= n:
        raise DataError(f"data.holdout: validation {n_val} + test {n_test} rows leave no training rows out of "
                        f"{n}; lower them (data.limit and the data's size decide n)")
    return {"train": n - n_val - n_test, "validation": n_val, "test": n_test}


def _bounds(holdout: HoldoutConfig, n: int, part: str) -> tuple[int, int]:
    """The part's permuted positions [lo, hi)."""
    s = sizes(holdout, n)
    return {"validation": (0, s["validation"]), "test": (s["validation"], s["validation"] + s["test"]),
            "train": (s["validation"] + s["test"], n)}[part]


def part_of(data_cfg: DataConfig, n: int, indices) -> np.ndarray:
    """The part name of each row index (an array of 'train' / 'validation' / 'test')."""
    idx = np.asarray(indices, dtype=np.int64)
    if data_cfg.holdout is None:
        return np.full(idx.shape, "train", dtype=object)
    s = sizes(data_cfg.holdout, n)
    pos = permute(idx, n, data_cfg.holdout.seed)
    out = np.full(idx.shape, "train", dtype=object)
    out[pos < s["validation"] + s["test"]] = "test"
    out[pos < s["validation"]] = "validation"
    return out


def part_name(data_cfg: DataConfig) -> str:
    """The part a data config reads: data.holdout.part, or train without a split."""
    return "train" if data_cfg.holdout is None else data_cfg.holdout.part


@functools.lru_cache(maxsize=8)
def _members_cached(validation, test, seed: int, n: int, part: str) -> np.ndarray:
    lo, hi = _bounds(HoldoutConfig(validation=validation, test=test, seed=seed), n, part)
    out = np.sort(permute(np.arange(lo, hi), n, seed, inverse=True))
    out.flags.writeable = False
    return out


def members(data_cfg: DataConfig, n: int, part: str | None = None) -> np.ndarray:
    """Sorted row indices of a validation or test part: O(part size), not O(n)."""
    part = part or part_name(data_cfg)
    if part == "train" or data_cfg.holdout is None:
        raise ValueError("members() lists a small part; stream the train part with train_rows/read_part")
    h = data_cfg.holdout
    return _members_cached(h.validation, h.test, int(h.seed), int(n), part)


def members_in(data_cfg: DataConfig, n: int, start: int, end: int, part: str | None = None) -> np.ndarray:
    """Sorted row indices of the part in [start, end)."""
    part = part or part_name(data_cfg)
    if data_cfg.holdout is None:
        return np.arange(start, end, dtype=np.int64)
    if part == "train":
        idx = np.arange(start, end, dtype=np.int64)
        lo, _ = _bounds(data_cfg.holdout, n, "train")
        return idx[permute(idx, n, data_cfg.holdout.seed) >= lo]
    m = members(data_cfg, n, part)
    return m[np.searchsorted(m, start):np.searchsorted(m, end)]


# ---------------------------------------------------------------- plans and reads


def shard_plan(data_cfg: DataConfig, n: int, rows_per_shard: int) -> list[dict]:
    """Row ranges [row_start, row_end) of the source; a shard holds its part's members in its range."""
    if part_name(data_cfg) == "train":
        return [{"index": i, "row_start": start, "row_end": min(start + rows_per_shard, n)}
                for i, start in enumerate(range(0, n, rows_per_shard))]
    m = members(data_cfg, n)
    firsts = m[::rows_per_shard].tolist()
    ends = firsts[1:] + [int(m[-1]) + 1] if len(m) else []
    return [{"index": i, "row_start": int(a), "row_end": int(b)} for i, (a, b) in enumerate(zip(firsts, ends))]


def read_indices(source: RowSource, indices: np.ndarray) -> list[Any]:
    """Rows at sorted `indices`, read in ranges (rows closer than _GAP apart share one read)."""
    rows: list[Any] = []
    if len(indices) == 0:
        return rows
    idx = np.asarray(indices, dtype=np.int64)
    cuts = np.flatnonzero(np.diff(idx) > _GAP) + 1
    for group in np.split(idx, cuts):
        a, b = int(group[0]), int(group[-1]) + 1
        block = source.read(a, b)
        rows.extend(block[i - a] for i in group.tolist())
    return rows


def read_part(data_cfg: DataConfig, source: RowSource, n: int, start: int, end: int,
              part: str | None = None) -> tuple[np.ndarray, list[Any]]:
    """(row indices, rows) of the part's members in source rows [start, end)."""
    idx = members_in(data_cfg, n, start, end, part)
    if data_cfg.holdout is None or (part or part_name(data_cfg)) == "train":
        block = source.read(start, end)
        return idx, [block[i - start] for i in idx.tolist()] if len(idx) != end - start else block
    return idx, read_indices(source, idx)


def iter_part(data_cfg: DataConfig, part: str, source: RowSource | None = None,
              chunk_rows: int = _READ_CHUNK) -> Iterator[tuple[np.ndarray, list[Any]]]:
    """(row indices, rows) of one part, in row order, `chunk_rows` source rows at a time."""
    source = source if source is not None else open_source(data_cfg)
    n = used_rows(data_cfg, source)
    if data_cfg.holdout is not None and part != "train":
        m = members(data_cfg, n, part)
        for a in range(0, len(m), chunk_rows):
            yield m[a:a + chunk_rows], read_indices(source, m[a:a + chunk_rows])
        return
    for start in range(0, n, chunk_rows):
        idx, rows = read_part(data_cfg, source, n, start, min(start + chunk_rows, n), part="train")
        if len(idx):
            yield idx, rows


def train_rows(data_cfg: DataConfig, source: RowSource | None = None,
               chunk_rows: int = _READ_CHUNK) -> Iterator[tuple[np.ndarray, list[Any]]]:
    """THE training rows (the train part, or every used row without data.holdout), streamed by
    range as (row indices, rows): memory is one chunk, never the whole set."""
    return iter_part(data_cfg, "train", source, chunk_rows)


def part_size(data_cfg: DataConfig, n: int, part: str | None = None) -> int:
    part = part or part_name(data_cfg)
    return n if data_cfg.holdout is None else sizes(data_cfg.holdout, n)[part]


# ---------------------------------------------------------------- identity and record


def identity_key(data_cfg: DataConfig, n: int) -> dict | None:
    """The cache identity's readable 'holdout' key (None without a split: the key is absent)."""
    h = data_cfg.holdout
    if h is None:
        return None
    s = sizes(h, n)
    return {"part": h.part, "rows": s[h.part], "validation": s["validation"], "test": s["test"],
            "seed": int(h.seed), "permutation": PERMUTATION}


def split_record(data_cfg: DataConfig, source: RowSource) -> dict:
    """What <run_dir>/split.json says: the spec, the resolved sizes and a fingerprint of the split."""
    h = data_cfg.holdout
    if h is None:
        raise ValueError("split_record needs data.holdout")
    n = used_rows(data_cfg, source)
    s = sizes(h, n)
    spec = {"validation": h.validation, "test": h.test, "seed": int(h.seed)}
    key = {"source": source.fingerprint, "rows": n, "sizes": s, "seed": int(h.seed), "permutation": PERMUTATION}
    fingerprint = "sha256:" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return {"data": data_cfg.path, "split": data_cfg.split, "source_fingerprint": source.fingerprint,
            "rows": n, "spec": spec, "sizes": s, "permutation": PERMUTATION, "fingerprint": fingerprint}
