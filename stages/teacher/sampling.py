"""Seeded draws from the teacher's distribution for sampled targets (cache format v2).

Every draw is a pure function of (cache key, the sequence's global row index,
the target position t inside the sequence, the draw index j) and of the
teacher's log-probs at that position: never of the worker, the batch or the
chunk it was computed in. So a rerun of a shard reproduces it bit for bit
whenever the engine reproduces the log-probs (docs/cache-format.md).

- Uniforms: splitmix64 chained over (key, row, t, j) -> the top 53 bits as a
  float64 in [0, 1) (``uniforms``).
- Draws: inverse CDF over the full vocabulary in float64: the first id whose
  cumulative probability exceeds u * total (``draw``). Zero-probability ids
  are never drawn.
- Storage: each position's n draws become its distinct ids in ascending order
  with their counts, padded to n columns with id -1 and count 0 (``encode``).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from stages.fingerprint import splitmix64

PAD_ID = -1
MAX_SAMPLES = 255  # counts are stored as uint8


def cache_key(identity: dict) -> int:
    """The 64-bit key of a cache: the first 8 bytes of sha256 of its identity's canonical JSON."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def uniforms(key: int, rows: np.ndarray, positions: np.ndarray, n: int) -> np.ndarray:
    """float64 [P, n] in [0, 1): draw j of (row, position) i, from splitmix64 of (key, row, t, j)."""
    with np.errstate(over="ignore"):
        h = splitmix64(np.full(len(rows), key, dtype=np.uint64) ^ np.asarray(rows, dtype=np.int64).astype(np.uint64))
        h = splitmix64(h ^ np.asarray(positions, dtype=np.int64).astype(np.uint64))
        h = splitmix64(h[:, None] ^ np.arange(n, dtype=np.uint64)[None, :])
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def draw(logprobs, u, sub_rows: int = 256):
    """Inverse-CDF draws: logprobs [P, V] (torch, any float dtype), u [P, n] float64 -> ids [P, n] int64.

    The cumulative sum runs in float64 over the whole vocabulary, ``sub_rows``
    rows at a time, on the log-probs' device, in one reused float64 buffer
    (converted, exponentiated and summed in place: the same numbers as fresh
    tensors, ~3x faster on a CPU, where allocating and filling new pages cost
    more than the arithmetic).
    """
    import torch

    u = torch.as_tensor(u, dtype=torch.float64, device=logprobs.device)
    out = []
    buf = torch.empty((min(sub_rows, logprobs.shape[0]), logprobs.shape[1]), dtype=torch.float64,
                      device=logprobs.device)
    for a in range(0, logprobs.shape[0], sub_rows):
        part = logprobs[a:a + sub_rows]
        cdf = buf[:part.shape[0]]
        cdf.copy_(part)
        cdf.exp_()
        cdf.cumsum_(dim=-1)
        target = u[a:a + sub_rows] * cdf[:, -1:]
        ids = torch.searchsorted(cdf, target, right=True)
        out.append(ids.clamp_(max=logprobs.shape[1] - 1))
    if not out:
        return torch.zeros((0, u.shape[1]), dtype=torch.int64, device=logprobs.device)
    return torch.cat(out)


def encode(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Draws [P, n] -> (ids int32 [P, n], counts uint8 [P, n]): each row's distinct ids
    ascending with their counts, then PAD_ID / 0 padding."""
    draws = np.sort(np.asarray(draws, dtype=np.int64), axis=1)
    p, n = draws.shape
    first = np.ones((p, n), dtype=bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = np.cumsum(first, axis=1) - 1
    rows = np.repeat(np.arange(p), n).reshape(p, n)
    ids = np.full((p, n), PAD_ID, dtype=np.int32)
    counts = np.zeros((p, n), dtype=np.uint8)
    ids[rows[first], slot[first]] = draws[first]
    np.add.at(counts, (rows, slot), 1)
    return ids, counts


def decode(ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(ids, counts) -> the sorted draws [P, n] (inverse of ``encode``)."""
    return np.stack([np.repeat(i, c) for i, c in zip(ids.astype(np.int64), counts.astype(np.int64))]) \
        if len(ids) else np.zeros((0, ids.shape[1]), dtype=np.int64)


class Sampler:
    """n draws per target position for one cache (key from its identity)."""

    def __init__(self, key: int, n: int) -> None:
        if not 1 <= n <= MAX_SAMPLES:
            raise ValueError(f"teacher.samples must be in [1, {MAX_SAMPLES}], got {n}")
        self.key, self.n = int(key), int(n)

    def __call__(self, logprobs, rows: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """logprobs [P, V] of positions (rows[i], positions[i]) -> encoded (ids, counts)."""
        ids = draw(logprobs, uniforms(self.key, rows, positions, self.n))
        return encode(ids.cpu().numpy())
