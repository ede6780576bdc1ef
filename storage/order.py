"""The data order of one epoch: a pure function of (cache fingerprint, seed, epoch, shard counts).

Sequences are numbered by *slot* 0..N-1 within an epoch. The shards are put
in an order (seeded permutation, or index order when following a cache that is
still being written) and cut into *windows* of ``window`` consecutive shards;
the slots walk the windows in turn and, inside each window, a seeded
permutation of that window's sequences. ``window=None`` is one window holding
every shard, i.e. a full global shuffle. Smaller windows bound how many shards
a reader must hold decoded at once (the trade-off mosaicml/streaming makes with
its shuffle blocks).

Nothing here depends on world size or worker count, so a run may resume with
different ones (storage/dataset.py splits the slots across ranks and workers).
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Callable, Sequence

import numpy as np


def order_seed(*parts: object) -> np.random.SeedSequence:
    """A numpy seed derived from any parts (fingerprint, seed, epoch, ...), stable across runs."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return np.random.SeedSequence(list(np.frombuffer(digest, dtype=np.uint32)))


def sequence_location(seq_ids: np.ndarray, cum_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map sequence ids to (position in the shard list, row in that shard).

    ``cum_counts`` is [0, c0, c0+c1, ...] over the listed shards; the one place
    a global sequence id is turned into a shard row.
    """
    shard_pos = np.searchsorted(cum_counts, seq_ids, side="right") - 1
    return shard_pos, seq_ids - cum_counts[shard_pos]


class EpochOrder:
    """Slot -> (shard index, row) for one epoch; windows are resolved lazily.

    ``count_of(shard)`` returns a shard's sequence count and may block (follow
    mode waits for the shard to be committed), so only the windows a reader
    actually reaches are resolved.
    """

    def __init__(self, count_of: Callable[[int], int], num_shards: int, *, fingerprint: str, seed: int,
                 epoch: int, shuffle: bool, window: int | None, permute_shards: bool) -> None:
        self._count_of = count_of
        self._key = (fingerprint, seed, epoch)
        self._shuffle = shuffle
        shard_order = np.arange(num_shards)
        if shuffle and permute_shards:
            shard_order = np.random.default_rng(order_seed(*self._key, "shards")).permutation(num_shards)
        size = max(1, window or num_shards or 1)
        self.windows: list[np.ndarray] = [shard_order[i:i + size] for i in range(0, num_shards, size)]
        self._starts: list[int] = [0]  # first slot of each resolved window, plus the end
        self._resolved: list[tuple[np.ndarray, np.ndarray | None]] = []  # (cum counts, permutation)

    @property
    def fully_resolved(self) -> bool:
        return len(self._resolved) == len(self.windows)

    def _resolve_next(self) -> None:
        w = len(self._resolved)
        shards = self.windows[w]
        cum = np.concatenate([[0], np.cumsum([self._count_of(int(s)) for s in shards])]).astype(np.int64)
        perm = None
        if self._shuffle:
            perm = np.random.default_rng(order_seed(*self._key, "window", w)).permutation(int(cum[-1]))
        self._resolved.append((cum, perm))
        self._starts.append(self._starts[-1] + int(cum[-1]))

    def available(self, upto: int) -> int:
        """min(upto, N): resolves (and in follow mode waits for) windows up to slot ``upto``."""
        while self._starts[-1] < upto and not self.fully_resolved:
            self._resolve_next()
        return min(upto, self._starts[-1])

    def total(self) -> int:
        """N, the number of sequences in the epoch (resolves every window)."""
        while not self.fully_resolved:
            self._resolve_next()
        return self._starts[-1]

    def locate(self, slots: Sequence[int]) -> list[tuple[int, int]]:
        """(shard index, row) of each slot, in the given order; slots must be < available()."""
        out = []
        for slot in slots:
            self.available(slot + 1)
            w = bisect.bisect_right(self._starts, slot) - 1
            cum, perm = self._resolved[w]
            local = slot - self._starts[w]
            seq = int(perm[local]) if perm is not None else local
            pos, row = sequence_location(np.array([seq]), cum)
            out.append((int(self.windows[w][pos[0]]), int(row[0])))
        return out
