"""Cache formats v1 and v2: the arrays of one shard, their dtypes, and their validation.

A shard holds n sequences packed end to end (docs/cache-format.md):

- ``input_ids`` int32 [T], ``seq_offsets`` int64 [n+1], ``example_ids`` int64 [n]
- ``target_positions`` int32 [P]: position t inside its sequence; the trained
  target is ``input_ids[t + 1]``; ascending within a sequence, ``0 <= t < L-1``
- ``target_offsets`` int64 [n+1]: sequence j's teacher rows are
  ``target_offsets[j]:target_offsets[j+1]`` of the arrays below
- ``topk_ids`` int32 [P, k], ``topk_logprobs`` float16 [P, k] (descending per row),
  ``target_logprobs`` float32 [P] (teacher log p of the gold next token)

Format v2 is v1 plus the optional features its manifest names (either or both).
Sampled teacher targets (identity ``targets`` sampled or topk+sampled) add,
ragged over the P positions (S = total distinct draws):

- ``sample_offsets`` int64 [P+1]: position i's draws are ``sample_offsets[i]:sample_offsets[i+1]``
- ``sample_ids`` int32 [S]: the distinct ids drawn at the position, ascending
- ``sample_counts`` uint8 [S]: how often each was drawn; a position's counts sum to n

A ``sampled`` cache has k = 0 (``topk_*`` of shape [P, 0]). A lossy log-prob
encoding (manifest ``logprob_encoding``, storage/encoding.py) stores other top-k
arrays; decoded, its ``topk_logprobs`` are float32. v1 caches read unchanged.
Changing any name, dtype or meaning here means a new format version.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator, Sequence

import numpy as np

FORMAT_VERSION = 1  # the plain top-k, stored exactly
# v1 plus the optional features the manifest names: sampled targets (identity ``targets``)
# and/or a lossy log-prob encoding (``logprob_encoding``).
FORMAT_V2 = 2
SUPPORTED_VERSIONS = (FORMAT_VERSION, FORMAT_V2)

# name -> (dtype, ndim); the order is the order arrays are written and checked.
ARRAY_SPECS: dict[str, tuple[np.dtype, int]] = {
    "input_ids": (np.dtype(np.int32), 1),
    "seq_offsets": (np.dtype(np.int64), 1),
    "example_ids": (np.dtype(np.int64), 1),
    "target_positions": (np.dtype(np.int32), 1),
    "target_offsets": (np.dtype(np.int64), 1),
    "topk_ids": (np.dtype(np.int32), 2),
    "topk_logprobs": (np.dtype(np.float16), 2),
    "target_logprobs": (np.dtype(np.float32), 1),
}
ARRAY_NAMES: tuple[str, ...] = tuple(ARRAY_SPECS)
ARRAY_DTYPES: dict[str, str] = {name: str(spec[0]) for name, spec in ARRAY_SPECS.items()}

# Format v2's sampled teacher targets (docs/cache-format.md), ragged over positions.
SAMPLE_ARRAY_SPECS: dict[str, tuple[np.dtype, int]] = {
    "sample_offsets": (np.dtype(np.int64), 1),
    "sample_ids": (np.dtype(np.int32), 1),
    "sample_counts": (np.dtype(np.uint8), 1),
}
SAMPLE_ARRAY_NAMES: tuple[str, ...] = tuple(SAMPLE_ARRAY_SPECS)
TARGET_KINDS = ("topk", "sampled", "topk+sampled")


def targets_of(identity: dict) -> str:
    """The cache's targets kind from its identity (absent: topk, every v1 cache)."""
    return str(identity.get("targets", "topk"))


def has_samples(targets: str) -> bool:
    return targets in ("sampled", "topk+sampled")


def describe_teacher(identity: dict) -> str:
    """`teacher model 'opt-6.7b (fine-tuned)': top-64 log-probs and 16 draws per position`, for inspect/status."""
    kind, top_k = targets_of(identity), identity.get("top_k", "?")
    held = [f"top-{top_k} log-probs"] if kind != "sampled" else []
    if has_samples(kind):
        held.append(f"{identity.get('samples', '?')} draws per position" + (" (no top-k)" if kind == "sampled" else ""))
    return f"teacher model {identity.get('teacher', '?')!r}: {' and '.join(held)}"


def describe_logprobs(identity: dict, encoding_label: str) -> str:
    """How the top-k log-probs are stored; a cache of draws only has none (just the gold log-prob)."""
    if targets_of(identity) == "sampled":
        return "no top-k log-probs (sampled targets: the draws and the gold token's float32 log-prob)"
    return encoding_label


def format_version_for(samples: bool, lossy: bool) -> int:
    """v1 for the plain exact top-k (unchanged since v1), v2 with either optional feature."""
    return FORMAT_V2 if samples or lossy else FORMAT_VERSION

# A gold token inside the top-k must carry (about) the same log-prob in both
# places; float16 rounding of a log-prob near -20 is ~0.016, engines may compute
# the two in slightly different precision, so the tolerance is deliberately loose.
_TARGET_MATCH_ATOL = 0.05
_TARGET_MATCH_RTOL = 0.01


@dataclass(frozen=True)
class SequenceRecord:
    """One sequence and its teacher rows (views into a ShardData when read)."""

    example_id: int
    input_ids: np.ndarray  # int32 [L]
    target_positions: np.ndarray  # int32 [p]
    topk_ids: np.ndarray  # int32 [p, k]
    topk_logprobs: np.ndarray  # float16 [p, k]
    target_logprobs: np.ndarray  # float32 [p]
    # format v2 only: position i's draws are sample_ids/counts[sample_offsets[i]:sample_offsets[i+1]]
    sample_offsets: np.ndarray | None = None  # int64 [p+1], starts at 0
    sample_ids: np.ndarray | None = None  # int32 [s]
    sample_counts: np.ndarray | None = None  # uint8 [s]

    @property
    def num_positions(self) -> int:
        return int(self.target_positions.shape[0])


@dataclass
class ShardData:
    """The eight arrays of one shard (v1 dtypes), plus the three sample arrays of format v2."""

    input_ids: np.ndarray
    seq_offsets: np.ndarray
    example_ids: np.ndarray
    target_positions: np.ndarray
    target_offsets: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprobs: np.ndarray
    sample_offsets: np.ndarray | None = None
    sample_ids: np.ndarray | None = None
    sample_counts: np.ndarray | None = None

    # ---- construction ---------------------------------------------------
    @classmethod
    def from_sequences(cls, records: Sequence[SequenceRecord], top_k: int | None = None) -> "ShardData":
        """Pack records end to end; ``top_k`` is only needed for an empty list."""
        if not records and top_k is None:
            raise ValueError("ShardData.from_sequences([]) needs top_k to shape the empty arrays")
        k = int(top_k if top_k is not None else np.shape(records[0].topk_ids)[-1])
        lengths = np.array([len(r.input_ids) for r in records], dtype=np.int64)
        counts = np.array([len(r.target_positions) for r in records], dtype=np.int64)

        def cat(get, dtype, shape_tail=()):
            parts = [np.asarray(get(r), dtype=dtype).reshape((len(np.asarray(get(r))), *shape_tail))
                     for r in records]
            return np.concatenate(parts) if parts else np.zeros((0, *shape_tail), dtype=dtype)

        samples = {}
        if records and records[0].sample_offsets is not None:
            per_pos = np.concatenate([np.diff(r.sample_offsets) for r in records]).astype(np.int64)
            samples = dict(sample_offsets=np.concatenate([[0], np.cumsum(per_pos)]).astype(np.int64),
                           sample_ids=cat(lambda r: r.sample_ids, np.int32),
                           sample_counts=cat(lambda r: r.sample_counts, np.uint8))
        return cls(
            **samples,
            input_ids=cat(lambda r: r.input_ids, np.int32),
            seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            example_ids=np.array([r.example_id for r in records], dtype=np.int64),
            target_positions=cat(lambda r: r.target_positions, np.int32),
            target_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            topk_ids=cat(lambda r: r.topk_ids, np.int32, (k,)),
            topk_logprobs=cat(lambda r: r.topk_logprobs, np.float16, (k,)),
            target_logprobs=cat(lambda r: r.target_logprobs, np.float32),
        )

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "ShardData":
        return cls(**{name: arrays[name] for name in ARRAY_NAMES + SAMPLE_ARRAY_NAMES if name in arrays})

    def arrays(self) -> dict[str, np.ndarray]:
        """name -> array, in ARRAY_NAMES order, then the sample arrays when present."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def has_samples(self) -> bool:
        return self.sample_ids is not None

    # ---- sizes ----------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        return int(self.example_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_positions(self) -> int:
        return int(self.target_positions.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[1]) if self.topk_ids.ndim == 2 else 0

    def counts(self) -> dict[str, int]:
        return {
            "num_sequences": self.num_sequences,
            "num_tokens": self.num_tokens,
            "num_positions": self.num_positions,
            "top_k": self.top_k,
        }

    # ---- access ---------------------------------------------------------
    def sequence(self, j: int) -> SequenceRecord:
        """Sequence j as views (no copy) into this shard's arrays."""
        a, b = int(self.seq_offsets[j]), int(self.seq_offsets[j + 1])
        c, d = int(self.target_offsets[j]), int(self.target_offsets[j + 1])
        samples = {}
        if self.has_samples:
            off = self.sample_offsets[c:d + 1]
            samples = dict(sample_offsets=off - off[0], sample_ids=self.sample_ids[off[0]:off[-1]],
                           sample_counts=self.sample_counts[off[0]:off[-1]])
        return SequenceRecord(
            **samples,
            example_id=int(self.example_ids[j]),
            input_ids=self.input_ids[a:b],
            target_positions=self.target_positions[c:d],
            topk_ids=self.topk_ids[c:d],
            topk_logprobs=self.topk_logprobs[c:d],
            target_logprobs=self.target_logprobs[c:d],
        )

    def sequences(self) -> Iterator[SequenceRecord]:
        for j in range(self.num_sequences):
            yield self.sequence(j)

    def equals(self, other: "ShardData") -> bool:
        """Bit-exact equality of every array (dtype, shape and bytes)."""
        mine, theirs = self.arrays(), other.arrays()
        return mine.keys() == theirs.keys() and all(
            a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            for a, b in zip(mine.values(), theirs.values())
        )

    # ---- validation -----------------------------------------------------
    def validate(self, vocab_size: int | None = None, *, logprob_atol: float = 0.0,
                 grid_floor: float | None = None) -> list[str]:
        """Every way this shard breaks format v1, as readable sentences ([] = valid).

        Structural problems stop the check early (the value checks would only
        produce noise on misshapen arrays). For log-probs decoded from a lossy
        encoding: ``logprob_atol`` is its error bound (added to the gold-token
        tolerances), entries more than ``grid_floor`` nats below their row's
        top-1 mean "this or less", and the log-probs are float32 (storage/encoding.py).
        """
        problems = _check_structure(self, decoded=grid_floor is not None)
        if problems:
            return problems
        problems = _check_offsets(self)
        # Gold-token checks index input_ids through the offsets: only when sound.
        problems += _check_values(self, vocab_size, check_targets=not problems, atol=logprob_atol,
                                  grid_floor=grid_floor)
        return problems + (_check_samples(self, vocab_size) if self.has_samples else [])


def _check_structure(d: ShardData, decoded: bool = False) -> list[str]:
    problems = []
    for name, (dtype, ndim) in ARRAY_SPECS.items():
        a = getattr(d, name)
        if not isinstance(a, np.ndarray):
            problems.append(f"{name}: expected a numpy array, got {type(a).__name__}")
        elif a.dtype != dtype and not (decoded and name == "topk_logprobs" and a.dtype == np.float32):
            problems.append(f"{name}: dtype {a.dtype}, format v1 requires {dtype}")
        elif a.ndim != ndim:
            problems.append(f"{name}: {a.ndim}-d array of shape {a.shape}, format v1 requires {ndim}-d")
    if problems:
        return problems
    n, p = d.example_ids.shape[0], d.target_positions.shape[0]
    expect = {
        "seq_offsets": (n + 1,),
        "target_offsets": (n + 1,),
        "target_logprobs": (p,),
        "topk_ids": (p, d.topk_ids.shape[1]),
        "topk_logprobs": (p, d.topk_ids.shape[1]),
    }
    for name, shape in expect.items():
        if getattr(d, name).shape != shape:
            problems.append(f"{name}: shape {getattr(d, name).shape}, expected {shape} "
                            f"(n_seq={n}, positions={p}, k={d.topk_ids.shape[1]})")
    if d.topk_ids.shape[1] < 1 and not d.has_samples:
        problems.append("topk_ids: k must be >= 1 (k = 0 only with sampled targets)")
    return problems


def _check_offsets(d: ShardData) -> list[str]:
    problems = []
    for name, total in (("seq_offsets", d.num_tokens), ("target_offsets", d.num_positions)):
        off = getattr(d, name)
        if off[0] != 0 or off[-1] != total:
            problems.append(f"{name}: must start at 0 and end at {total}, got {off[0]}..{off[-1]}")
        if np.any(np.diff(off) < 0):
            problems.append(f"{name}: not monotone non-decreasing at index {int(np.argmax(np.diff(off) < 0))}")
    if problems:
        return problems
    # Each target position must lie inside its sequence, leaving room for t+1,
    # and be strictly ascending within the sequence.
    lengths = np.diff(d.seq_offsets)
    counts = np.diff(d.target_offsets)
    row_seq = np.repeat(np.arange(d.num_sequences), counts)
    t = d.target_positions.astype(np.int64)
    bad = (t < 0) | (t >= lengths[row_seq] - 1)
    if bad.any():
        i = int(np.argmax(bad))
        problems.append(f"target_positions: row {i} (sequence {row_seq[i]}) has t={t[i]}, "
                        f"needs 0 <= t < len-1 = {lengths[row_seq[i]] - 1}")
    same_seq = row_seq[1:] == row_seq[:-1]
    if np.any(same_seq & (np.diff(t) <= 0)):
        i = int(np.argmax(same_seq & (np.diff(t) <= 0)))
        problems.append(f"target_positions: not strictly ascending within sequence {row_seq[i]} at row {i + 1}")
    return problems


def _check_values(d: ShardData, vocab_size: int | None, check_targets: bool, atol: float = 0.0,
                  grid_floor: float | None = None) -> list[str]:
    problems = []
    hi = vocab_size if vocab_size is not None else np.iinfo(np.int32).max
    for name in ("input_ids", "topk_ids"):
        a = getattr(d, name)
        if a.size and (a.min() < 0 or a.max() >= hi):
            problems.append(f"{name}: ids must be in [0, {hi}), found {a.min()}..{a.max()}")
    lp = d.topk_logprobs.astype(np.float32)
    for name, a in (("topk_logprobs", lp), ("target_logprobs", d.target_logprobs)):
        if not np.all(np.isfinite(a)):
            problems.append(f"{name}: {int((~np.isfinite(a)).sum())} non-finite values (NaN or inf)")
        elif a.size and a.max() > 0:
            problems.append(f"{name}: log-probs must be <= 0, max is {float(a.max())}")
    if lp.shape[1] == 0:  # a sampled cache: no top-k to check
        return problems
    if lp.shape[1] > 1:
        rising = lp[:, 1:] > lp[:, :-1]
        if rising.any():
            problems.append(f"topk_logprobs: {int(rising.any(axis=1).sum())} rows not in descending order "
                            f"(first: row {int(np.argmax(rising.any(axis=1)))})")
    if d.topk_ids.size:
        s = np.sort(d.topk_ids, axis=1)
        dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if dup.any():
            problems.append(f"topk_ids: {int(dup.sum())} rows repeat a token id (first: row {int(np.argmax(dup))})")
    if check_targets:
        problems += _check_target_rows(d, lp, atol, grid_floor)
    return problems


def _check_target_rows(d: ShardData, lp: np.ndarray, atol: float = 0.0, grid_floor: float | None = None) -> list[str]:
    """Teacher rows agree with the gold tokens they were computed for."""
    if d.num_positions == 0:
        return []
    row_seq = np.repeat(np.arange(d.num_sequences), np.diff(d.target_offsets))
    gold = d.input_ids[d.seq_offsets[row_seq] + d.target_positions.astype(np.int64) + 1]
    hit = d.topk_ids == gold[:, None]
    in_topk = hit.any(axis=1)
    gold_lp = d.target_logprobs
    topk_gold_lp = np.where(in_topk, lp[np.arange(len(lp)), hit.argmax(axis=1)], 0.0)
    tol = _TARGET_MATCH_ATOL + _TARGET_MATCH_RTOL * np.abs(gold_lp) + atol
    mismatch = in_topk & (np.abs(topk_gold_lp - gold_lp) > tol)
    if grid_floor is not None:  # a gold entry below a lossy grid's floor only says "this or less"
        below = topk_gold_lp <= lp[:, 0] - grid_floor + 1e-4
        mismatch &= ~(below & (gold_lp <= topk_gold_lp + tol))
    problems = []
    if mismatch.any():
        i = int(np.argmax(mismatch))
        problems.append(f"target_logprobs: {int(mismatch.sum())} rows where the gold token is in the top-k "
                        f"with another log-prob (first: row {i}, {gold_lp[i]} vs {topk_gold_lp[i]})")
    # A gold token more probable than the k-th entry would have made the top-k.
    missing = ~in_topk & (gold_lp > lp[:, -1] + tol)
    if missing.any():
        i = int(np.argmax(missing))
        problems.append(f"target_logprobs: {int(missing.sum())} rows where the gold token is missing from "
                        f"the top-k yet more probable than its last entry (first: row {i})")
    return problems


def _check_samples(d: ShardData, vocab_size: int | None) -> list[str]:
    """Format v2's sample arrays: dtypes, ragged offsets, ids in range and ascending per
    position, counts >= 1 summing to the same n at every position."""
    arrays = {name: getattr(d, name) for name in SAMPLE_ARRAY_NAMES}
    problems = [f"{name}: expected a numpy array of dtype {dtype}, 1-d"
                for name, (dtype, _) in SAMPLE_ARRAY_SPECS.items()
                if not isinstance(arrays[name], np.ndarray) or arrays[name].dtype != dtype or arrays[name].ndim != 1]
    if problems:
        return problems
    off, ids, counts = arrays["sample_offsets"], arrays["sample_ids"], arrays["sample_counts"]
    if off.shape != (d.num_positions + 1,):
        return [f"sample_offsets: shape {off.shape}, expected ({d.num_positions + 1},) (positions + 1)"]
    if ids.shape != counts.shape:
        return [f"sample_counts: shape {counts.shape} != sample_ids shape {ids.shape}"]
    if off[0] != 0 or off[-1] != len(ids) or np.any(np.diff(off) < 1):
        return [f"sample_offsets: must start at 0, end at {len(ids)} and give every position >= 1 draw"]
    hi = vocab_size if vocab_size is not None else np.iinfo(np.int32).max
    if ids.size and (ids.min() < 0 or ids.max() >= hi):
        problems.append(f"sample_ids: ids must be in [0, {hi}), found {ids.min()}..{ids.max()}")
    if counts.size and counts.min() < 1:
        problems.append(f"sample_counts: {int((counts < 1).sum())} zero counts")
    first = np.zeros(len(ids), dtype=bool)
    first[off[:-1]] = True
    if np.any(~first[1:] & (np.diff(ids.astype(np.int64)) <= 0)):
        problems.append("sample_ids: not strictly ascending within a position")
    n = np.add.reduceat(counts.astype(np.int64), off[:-1]) if len(ids) else np.zeros(0, np.int64)
    if n.size and np.any(n != n[0]):
        problems.append(f"sample_counts: draws per position differ ({int(n.min())}..{int(n.max())}); "
                        "every position holds the same n")
    return problems
