"""How a shard stores its top-k: ``exact`` (as in format v1) or ``u8-rel`` (lossy log-probs, a format v2 feature).

``exact`` stores ``topk_ids`` int32 and ``topk_logprobs`` float16 as they are.

``u8-rel`` (docs/cache-format.md, "Format v2") stores per position an
``anchor`` (float32, about the top-1's log-prob) and per entry an 8-bit code c
on a grid of ``step`` nats below it; the decoded log-prob is
``min(anchor - c * step, 0)``. The anchor is shifted (by at most step / 2) so
that the decoded probabilities of the non-gold top-k entries sum to exactly
what the exact values sum to: the loss's residual bucket (1 - gold - sum of the
rest, docs/method.md) is then unchanged, and every decoded entry is within
``step`` of its exact (float16) value. Entries more than 254.5 steps below the
top-1 take code 255 and decode to that floor; together they hold at most
eps = (k-1) exp(-254.5 step) of probability (~1e-7 at step 0.08, k=64), before
and after. The KL from the exact top-k-implied target to the decoded one is then
at most step^2/8 (Hoeffding's lemma on the grid entries) + eps (2 + step) +
eps^2 / 1e-6 (the floor entries and the residual bucket, floored at 1e-6 by the
losses): ``kl_bound``, 8.0e-4 nats at step 0.08 and k=64.

Within a row the entries are ordered by code, ties by ascending id (equal codes
decode to equal values, so this order carries no information); the ids are
stored losslessly as the first id of each run of equal codes and, after it,
the (positive) differences to the previous id. Codes are stored as their
differences along the row (the first is 0: the top-1's code). Both make the
arrays compress well with the cache's zstd + bit-shuffle (bench/cache_bench.py).

Shard arrays of ``u8-rel``: ``topk_id_deltas`` int32 [P, k],
``topk_code_deltas`` uint8 [P, k], ``topk_anchor`` float32 [P], in place of
``topk_ids`` and ``topk_logprobs``. Decoded, ``topk_logprobs`` is float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from storage.errors import StorageError
from storage.schema import ARRAY_SPECS, SAMPLE_ARRAY_SPECS, ShardData

EXACT = "exact"
U8_REL = "u8-rel"
ENCODINGS = (EXACT, U8_REL)
DEFAULT_STEP = 0.08
MAX_CODE = 255
# Decoded entries more than this many steps below their row's top-1 are below the grid
# (code 255 decodes to 255 steps below the anchor, and the anchor is within step/2 of the top-1).
GRID_STEPS = MAX_CODE - 0.5
ENCODED_TOPK = ("topk_id_deltas", "topk_code_deltas", "topk_anchor")
_ENCODED_SPECS = {"topk_id_deltas": (np.dtype(np.int32), 2), "topk_code_deltas": (np.dtype(np.uint8), 2),
                  "topk_anchor": (np.dtype(np.float32), 1)}
# float32 anchors and outputs round by < 2^-24 relative: allowance on top of `step` in checks.
_ROUNDING = 1e-5
RESIDUAL_FLOOR = 1e-6  # = stages.buckets.TEACHER_RESIDUAL_FLOOR (storage imports no stage)


class EncodingError(StorageError, ValueError):
    """An encoding name or parameter outside what this code knows (config, manifest or shard)."""


@dataclass(frozen=True)
class LogprobEncoding:
    """One log-prob encoding with its parameters; ``describe()`` is what the manifest records."""

    name: str = EXACT
    step: float | None = None
    top_k: int | None = None  # entries per row; only the KL bound depends on it

    def __post_init__(self) -> None:
        if self.name not in ENCODINGS:
            raise EncodingError(f"unknown log-prob encoding {self.name!r}; this atkd knows {', '.join(ENCODINGS)}")
        if self.name == U8_REL and not (isinstance(self.step, (int, float)) and 0 < self.step <= 1):
            raise EncodingError(f"log-prob encoding {U8_REL} needs a step in (0, 1] nats, got {self.step!r}")
        if self.name == EXACT and (self.step is not None or self.top_k is not None):
            raise EncodingError("the exact log-prob encoding takes no parameters")

    @classmethod
    def from_config(cls, name: str, step: float = DEFAULT_STEP) -> "LogprobEncoding":
        return cls(name, float(step) if name == U8_REL else None)

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> "LogprobEncoding":
        """From a manifest's / shard's ``logprob_encoding`` (None: exact)."""
        if record is None:
            return cls()
        if not isinstance(record, dict) or "name" not in record:
            raise EncodingError(f"logprob_encoding must be an object with a name, got {record!r}")
        return cls(record["name"], record.get("step"), record.get("top_k"))

    def for_top_k(self, top_k: int | None) -> "LogprobEncoding":
        """This encoding with the cache's k (which its KL bound depends on)."""
        return replace(self, top_k=int(top_k)) if self.lossy and top_k is not None else self

    @property
    def lossy(self) -> bool:
        return self.name != EXACT

    @property
    def max_abs_error(self) -> float:
        """Largest |decoded - exact| of an entry above the grid floor (0 for exact)."""
        return float(self.step) if self.lossy else 0.0

    @property
    def kl_bound(self) -> float:
        """KL (nats) from the exact top-k-implied target to the decoded one, per position
        (module doc; k = ``top_k``, 1024 when unknown)."""
        if not self.lossy:
            return 0.0
        s = float(self.step)
        eps = ((self.top_k or 1024) - 1) * math.exp(-GRID_STEPS * s)
        return s * s / 8 + eps * (2 + s) + eps * eps / RESIDUAL_FLOOR

    @property
    def grid_floor(self) -> float | None:
        """Nats below the row's top-1 under which a decoded entry means 'this or less'."""
        return GRID_STEPS * float(self.step) if self.lossy else None

    def describe(self) -> dict[str, Any] | None:
        """The manifest's and each shard's ``logprob_encoding`` attribute (None for exact)."""
        if not self.lossy:
            return None
        return {"name": self.name, "step": float(self.step), "top_k": self.top_k,
                "max_abs_error": self.max_abs_error, "kl_bound": self.kl_bound, "grid_floor": self.grid_floor,
                "ids": "lossless"}

    def label(self) -> str:
        if not self.lossy:
            return "exact (float16 log-probs, lossless)"
        return (f"{self.name}, step {self.step:g} nats: |log-prob error| <= {self.max_abs_error:g}, "
                f"KL to the exact target <= {self.kl_bound:.1e} nats per position")

    # ---- arrays -----------------------------------------------------------
    def array_specs(self, samples: bool = False) -> dict[str, tuple[np.dtype, int]]:
        """name -> (dtype, ndim) of the arrays a shard stores, in write order; ``samples``: the
        cache also holds sampled targets (their arrays are stored as they are, schema.py)."""
        extra = SAMPLE_ARRAY_SPECS if samples else {}
        if not self.lossy:
            return {**ARRAY_SPECS, **extra}
        specs = {n: s for n, s in ARRAY_SPECS.items() if n not in ("topk_ids", "topk_logprobs")}
        return {**specs, **extra, **_ENCODED_SPECS}

    @property
    def topk_arrays(self) -> tuple[str, ...]:
        """The stored arrays holding the top-k (for sizes)."""
        return ENCODED_TOPK if self.lossy else ("topk_ids", "topk_logprobs")

    def encode(self, data: ShardData) -> dict[str, np.ndarray]:
        """The arrays to store for valid ``data`` (float16 log-probs); checks its own round trip."""
        arrays = data.arrays()
        if not self.lossy:
            return arrays
        stored = {n: a for n, a in arrays.items() if n not in ("topk_ids", "topk_logprobs")}
        stored.update(_encode_u8(data, float(self.step)))
        return stored

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stored arrays -> the ShardData arrays (log-probs float32 when lossy)."""
        if not self.lossy:
            return stored
        arrays = {n: a for n, a in stored.items() if n not in ENCODED_TOPK}
        ids, lp = decode_u8(stored["topk_id_deltas"], stored["topk_code_deltas"], stored["topk_anchor"],
                            float(self.step))
        return {**arrays, "topk_ids": ids, "topk_logprobs": lp}

    def check(self, stored: dict[str, np.ndarray]) -> list[str]:
        """The stored arrays keep this encoding's invariants ([] = they do)."""
        return _check_u8(stored, float(self.step)) if self.lossy else []

    def read_logprobs(self, group) -> np.ndarray:
        """A zarr shard group's decoded top-k log-probs (float64), reading only what that needs."""
        if not self.lossy:
            return np.asarray(group["topk_logprobs"][...], dtype=np.float64)
        codes = np.cumsum(np.asarray(group["topk_code_deltas"][...]), axis=1, dtype=np.int32)
        return np.minimum(np.asarray(group["topk_anchor"][...], np.float64)[:, None] - codes * self.step, 0.0)


# ---------------------------------------------------------------- u8-rel


def _gold(data: ShardData) -> np.ndarray:
    row_seq = np.repeat(np.arange(data.num_sequences), np.diff(data.target_offsets))
    return data.input_ids[data.seq_offsets[row_seq] + data.target_positions.astype(np.int64) + 1]


def _encode_u8(data: ShardData, step: float) -> dict[str, np.ndarray]:
    x = data.topk_logprobs.astype(np.float32)  # descending per row; on the grid, float32 differences err < 3e-6
    P, k = x.shape
    below_top = (x[:, :1] if k else np.zeros((P, 1), np.float32)) - x  # >= 0
    codes = np.minimum(np.rint(below_top / np.float32(step)), MAX_CODE).astype(np.int64)
    # Shift the anchor so the non-gold entries on the grid keep their exact total mass (both
    # sums relative to the top-1, so nothing overflows; float64 accumulation).
    keep = (data.topk_ids != _gold(data)[:, None]) & (codes < MAX_CODE)
    exact = np.where(keep, np.exp(-below_top), 0).sum(axis=1, dtype=np.float64)
    grid = np.where(keep, np.exp(-np.arange(MAX_CODE + 1) * step)[codes], 0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):  # rows with nothing kept: 0 / 0
        shift = np.log(exact / grid)
    top = x[:, 0].astype(np.float64) if k else np.zeros(P)
    anchor = (top + np.where(np.isfinite(shift), shift, 0.0)).astype(np.float32)
    # Order each row by (code, id): equal codes decode equally, so ties are free to sort.
    key = np.sort((codes << 32) | data.topk_ids.astype(np.int64), axis=1)
    sorted_codes, ids = key >> 32, (key & 0xFFFFFFFF).astype(np.int32)
    code_deltas = np.diff(sorted_codes, axis=1, prepend=0).astype(np.uint8)
    run_start = np.ones((P, k), bool)
    run_start[:, 1:] = code_deltas[:, 1:] != 0
    id_deltas = np.where(run_start, ids, np.diff(ids, axis=1, prepend=0)).astype(np.int32)
    stored = {"topk_id_deltas": id_deltas, "topk_code_deltas": code_deltas, "topk_anchor": anchor}
    _check_round_trip(stored, ids, x, codes, step)
    return stored


def decode_u8(id_deltas: np.ndarray, code_deltas: np.ndarray, anchor: np.ndarray, step: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """(topk_ids int32, topk_logprobs float32) of ``u8-rel`` arrays, vectorised over the whole shard."""
    codes = np.cumsum(code_deltas, axis=1, dtype=np.int16)
    logprobs = np.minimum(anchor[:, None] - codes * np.float32(step), np.float32(0.0))
    # Each run of equal codes starts with an absolute id, the others add to the previous id. All
    # are >= 0 (_check_u8), so along a row the running sum before each run start never
    # decreases and a running maximum carries it over the run.
    k = id_deltas.shape[1]
    small = id_deltas.size == 0 or k * int(id_deltas.max()) < 2**31
    summed = np.cumsum(id_deltas, axis=1, dtype=np.int32 if small else np.int64)
    before_run = summed - id_deltas
    before_run[:, 1:][code_deltas[:, 1:] == 0] = 0
    np.maximum.accumulate(before_run, axis=1, out=before_run)
    summed -= before_run
    return summed.astype(np.int32, copy=False), logprobs


def _check_round_trip(stored: dict[str, np.ndarray], ids: np.ndarray, x: np.ndarray, codes: np.ndarray,
                      step: float) -> None:
    """The encoder's own guarantee, checked on every write: the ids come back, and each entry on
    the grid decodes within ``step`` of its input (``codes`` in the input's order)."""
    got_ids, _ = decode_u8(stored["topk_id_deltas"], stored["topk_code_deltas"], stored["topk_anchor"], step)
    if not np.array_equal(got_ids, ids):
        raise AssertionError("u8-rel encoder bug: the decoded top-k ids differ from the input's")
    anchor = stored["topk_anchor"][:, None]
    err = np.abs(np.minimum(anchor - (codes * np.float32(step)).astype(np.float32), 0) - x)[codes < MAX_CODE]
    if err.size and err.max() > step + _ROUNDING:
        raise AssertionError(f"u8-rel encoder bug: a decoded log-prob is {err.max():.4g} from its input "
                             f"(bound {step})")


def _check_u8(stored: dict[str, np.ndarray], step: float) -> list[str]:
    problems = []
    dc, ids, anchor = stored["topk_code_deltas"], stored["topk_id_deltas"], stored["topk_anchor"]
    if dc.shape != ids.shape or anchor.shape != dc.shape[:1]:
        return [f"topk_code_deltas {dc.shape}, topk_id_deltas {ids.shape} and topk_anchor {anchor.shape} "
                "do not have matching shapes"]
    if not dc.size:
        return []
    if np.any(dc[:, 0] != 0):
        problems.append(f"topk_code_deltas: {int((dc[:, 0] != 0).sum())} rows do not start at code 0 "
                        f"(the top-1), first: row {int(np.argmax(dc[:, 0] != 0))}")
    total = dc.sum(axis=1, dtype=np.int32)
    if np.any(total > MAX_CODE):
        problems.append(f"topk_code_deltas: {int((total > MAX_CODE).sum())} rows leave the 8-bit grid "
                        f"(codes above {MAX_CODE}), first: row {int(np.argmax(total > MAX_CODE))}")
    if not np.all(np.isfinite(anchor)):
        problems.append(f"topk_anchor: {int((~np.isfinite(anchor)).sum())} non-finite values")
    elif np.any(anchor > step / 2 + _ROUNDING):
        i = int(np.argmax(anchor))
        problems.append(f"topk_anchor: {int((anchor > step / 2 + _ROUNDING).sum())} anchors above step/2 = "
                        f"{step / 2:g}, where the top-1 (a log-prob <= 0) shifted by at most step/2 must lie "
                        f"(first: row {i}, {float(anchor[i])})")
    within_run = np.zeros(dc.shape, bool)
    within_run[:, 1:] = dc[:, 1:] == 0
    if np.any(ids < 0):
        problems.append(f"topk_id_deltas: {int((ids < 0).any(axis=1).sum())} rows with a negative id or "
                        f"difference (first: row {int(np.argmax((ids < 0).any(axis=1)))})")
    if np.any(within_run & (ids <= 0)):
        problems.append(f"topk_id_deltas: {int((within_run & (ids <= 0)).any(axis=1).sum())} rows whose ids "
                        "are not ascending within a run of equal codes "
                        f"(first: row {int(np.argmax((within_run & (ids <= 0)).any(axis=1)))})")
    return problems


def describe_record(record: dict[str, Any] | None) -> str:
    """A shard's or manifest's ``logprob_encoding`` in words, for messages."""
    try:
        return LogprobEncoding.from_record(record).label()
    except EncodingError:
        return repr(record)


__all__ = ["DEFAULT_STEP", "ENCODINGS", "EXACT", "U8_REL", "EncodingError", "LogprobEncoding", "decode_u8",
           "describe_record"]
