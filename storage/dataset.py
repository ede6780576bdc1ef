"""Streaming, deterministic, resumable reader of a cache for student training.

Order: storage/order.py gives each epoch's slot -> sequence map, a pure
function of (cache fingerprint, seed, epoch). Each *global step* takes the next
``world_size * batch_size`` slots; rank r's batch holds the slots
``step_start + r + world_size * i`` (i < batch_size). Rank r's batches are
numbered 0, 1, 2, ... across epochs; DataLoader worker w of n produces batch
numbers w, w+n, ... and ``DataLoader(ds, batch_size=None)`` hands them out
round-robin, which restores the order. So the batches do not depend on the
number of workers, and the resume state is only {epoch, consumed (global
sequences consumed in the epoch), fingerprint, seed}, valid at any world size.

Every batch dict carries ``epoch`` and ``consumed``: the state right after
this global step. Checkpoint with ``ds.state_dict(batch["consumed"], batch["epoch"])``;
on resume call ``ds.load_state_dict(state)`` before building the DataLoader
(workers copy the dataset when the iterator starts). One iterator streams all
epochs, so create it once rather than once per epoch.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from storage.cache import Cache
from storage.errors import CacheNotReadyError, ReaderStateError
from storage.order import EpochOrder
from storage.schema import SequenceRecord, ShardData


@dataclass
class BatchSpec:
    """Which slots one batch holds, and the reader state after its global step."""

    epoch: int
    slots: list[int]
    order: EpochOrder
    next_epoch: int
    next_consumed: int


class ResumableReader:
    """The resume state both readers share (this one, stages.training.rows_dataset's): where
    in which epoch, checked against the data fingerprint, the seed and the order rule.

    A reader sets fingerprint, seed, start_epoch, start_consumed and defines
    _order_key() and _other_data(fingerprint) (the message for a state of other data);
    ORDER_HINT ends the order message; ORDER_OPTIONAL accepts states without an order
    (written before the order was recorded)."""

    ORDER_HINT = "resume with the same settings."
    ORDER_OPTIONAL = False

    def state_dict(self, consumed: int, epoch: int | None = None) -> dict[str, Any]:
        """Resume state after ``consumed`` global sequences of ``epoch`` (default: the start epoch)."""
        return {"epoch": int(self.start_epoch if epoch is None else epoch), "consumed": int(consumed),
                "fingerprint": self.fingerprint, "seed": self.seed, "order": self._order_key()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` stopped; refuses other data, another seed or order rule."""
        if state.get("fingerprint") != self.fingerprint:
            raise ReaderStateError(self._other_data(state.get("fingerprint")))
        if state.get("seed", self.seed) != self.seed:
            raise ReaderStateError(f"reader state has seed {state['seed']}, this reader seed {self.seed}; "
                                   "the order would differ. Use the checkpoint's seed.")
        if not (self.ORDER_OPTIONAL and "order" not in state) and state.get("order") != self._order_key():
            raise ReaderStateError(f"reader state was made with order settings {state.get('order')}, this reader "
                                   f"uses {self._order_key()}; {self.ORDER_HINT}")
        self.start_epoch, self.start_consumed = int(state["epoch"]), int(state["consumed"])


class CacheDataset(ResumableReader, IterableDataset):
    """Batches of sequences with their teacher rows, as `collate_sequences` dicts.

    epochs: stop before this (absolute) epoch index; None streams forever.
    drop_last: skip an epoch's final partial global step, so every rank gets
      the same number of full batches (needed by DDP); False keeps every sequence.
    follow: read a cache that is still being written: shards in index order,
      waiting up to ``follow_timeout`` s (polling every ``poll_interval`` s)
      for each shard to be committed.
    shuffle_window: shards whose sequences are shuffled together (None = all,
      a full global shuffle; follow mode defaults to 1).
    top_k: use only the first (largest) top_k entries of each row (None: all the cache holds).
    shard_cache_bytes: decoded shards kept per process (LRU, at least one).
      A window's shards should fit, or random order re-decodes shards constantly:
      with big caches set shuffle_window so that window * shard size fits.
    """

    def __init__(self, url: str, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, follow: bool = False, *, pad_id: int = 0, epochs: int | None = None,
                 drop_last: bool = True, shuffle_window: int | None = None,
                 shard_cache_bytes: int = 1 << 30, top_k: int | None = None,
                 poll_interval: float = 5.0, follow_timeout: float = 24 * 3600.0,
                 storage_options: dict[str, Any] | None = None) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.cache = Cache.open(url, **(storage_options or {}))
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.follow, self.pad_id, self.epochs = shuffle, follow, pad_id, epochs
        self.drop_last = drop_last
        self.shuffle_window = shuffle_window if shuffle_window is not None else (1 if follow else None)
        self.shard_cache_bytes = shard_cache_bytes
        cached_k = self.cache.manifest.identity.get("top_k")
        if top_k is not None and cached_k is not None and not min(1, int(cached_k)) <= top_k <= int(cached_k):
            raise ReaderStateError(f"top_k={top_k}: the cache at {self.cache.url} holds the teacher's top-{cached_k}; "
                                   f"use at most {cached_k} entries")
        self.top_k = top_k
        self.poll_interval, self.follow_timeout = poll_interval, follow_timeout
        self.fingerprint = self.cache.fingerprint
        self.start_epoch, self.start_consumed = 0, 0
        self._counts: dict[int, int] = {}
        self._shards: OrderedDict[int, ShardData] = OrderedDict()

    # ---- resume state -----------------------------------------------------
    def _order_key(self) -> dict[str, Any]:
        return {"shuffle": self.shuffle, "shuffle_window": self.shuffle_window,
                "shard_order": "index" if self.follow else "permuted"}

    ORDER_HINT = "use the same shuffle/shuffle_window/follow settings."
    ORDER_OPTIONAL = True  # states from before the order rule was recorded

    def _other_data(self, fingerprint) -> str:
        return (f"reader state is for cache fingerprint {fingerprint!r}, but {self.cache.url} has "
                f"{self.fingerprint!r}: the checkpoint was trained on another cache. Resume with the original "
                "cache or start a fresh run.")

    # ---- order ------------------------------------------------------------
    def _count_of(self, index: int) -> int:
        if index not in self._counts:
            if self.follow:
                self._wait_for(index)
            self._counts[index] = self.cache.shard_num_sequences(index)
        return self._counts[index]

    def _wait_for(self, index: int) -> None:
        deadline = time.monotonic() + self.follow_timeout
        while not self.cache.is_shard_complete(index):
            if time.monotonic() > deadline:
                raise TimeoutError(f"follow mode: shard {self.cache.shard_location(index)} was not committed "
                                   f"within {self.follow_timeout:.0f}s; is the teacher stage still running?")
            time.sleep(self.poll_interval)

    def _epoch_order(self, epoch: int) -> EpochOrder:
        return EpochOrder(self._count_of, self.cache.num_shards, fingerprint=self.fingerprint, seed=self.seed,
                          epoch=epoch, shuffle=self.shuffle, window=self.shuffle_window,
                          permute_shards=not self.follow)

    def batch_specs(self) -> Iterator[BatchSpec]:
        """This rank's batches from the start state on (index arithmetic only, no decoding)."""
        if not self.follow:
            done = len(self.cache.completed_shards())
            if done != self.cache.num_shards:
                raise CacheNotReadyError(f"cache {self.cache.url} has {done}/{self.cache.num_shards} shards complete; "
                                         "wait for the teacher stage to finish, or read with follow=True")
        epoch, consumed = self.start_epoch, self.start_consumed
        W, B = self.world_size, self.batch_size
        while self.epochs is None or epoch < self.epochs:
            order = self._epoch_order(epoch)
            if order.available(1) == 0 and order.fully_resolved:
                raise CacheNotReadyError(f"cache {self.cache.url} holds no sequences; nothing to train on")
            lo, produced = consumed, False
            while True:
                hi = lo + W * B
                end = order.available(hi)
                if end <= lo or (end < hi and self.drop_last):
                    break
                slots = list(range(lo + self.rank, end, W))[:B]
                # (epoch, N) is a valid state too: resuming there rolls over to
                # epoch + 1, so no look-ahead (which would block in follow mode).
                state = (epoch + 1, 0) if end < hi else (epoch, end)
                if slots:
                    produced = True
                    yield BatchSpec(epoch, slots, order, *state)
                if end < hi:
                    break
                lo = end
            if not produced and consumed == 0:  # would spin through empty epochs forever
                raise CacheNotReadyError(f"rank {self.rank} gets no batch from {self.cache.url}: "
                                         f"{order.total()} sequences for world_size {W} x batch_size {B}"
                                         f"{' with drop_last' if self.drop_last else ''}; use a smaller batch")
            epoch, consumed = epoch + 1, 0

    # ---- iteration --------------------------------------------------------
    def _shard(self, index: int) -> ShardData:
        if index in self._shards:
            self._shards.move_to_end(index)
        else:
            self._shards[index] = self.cache.read_shard(index)  # CorruptShardError names the shard
            while len(self._shards) > 1 and sum(map(_nbytes, self._shards.values())) > self.shard_cache_bytes:
                self._shards.popitem(last=False)
        return self._shards[index]

    def records(self, spec: BatchSpec) -> list[SequenceRecord]:
        return [self._shard(s).sequence(r) for s, r in spec.order.locate(spec.slots)]

    def iter_record_batches(self, worker_id: int = 0, num_workers: int = 1
                            ) -> Iterator[tuple[BatchSpec, list[SequenceRecord]]]:
        """Plain iterator: (spec, records) of this worker's share of the rank's batches."""
        for spec in itertools.islice(self.batch_specs(), worker_id, None, num_workers):
            yield spec, self.records(spec)

    def iter_batches(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[dict[str, Any]]:
        """Plain iterator of collated batch dicts (what a DataLoader worker yields)."""
        for spec, records in self.iter_record_batches(worker_id, num_workers):
            batch = collate_sequences(records, self.pad_id, top_k=self.top_k)
            batch.update(epoch=spec.next_epoch, consumed=spec.next_consumed)
            yield batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        return self.iter_batches(info.id if info else 0, info.num_workers if info else 1)


def _nbytes(data: ShardData) -> int:
    return sum(a.nbytes for a in data.arrays().values())


def collate_sequences(records: Sequence[SequenceRecord], pad_id: int,
                      top_k: int | None = None) -> dict[str, torch.Tensor]:
    """Pad sequences to [B, L] and flatten their teacher rows to [P, ...] (docs/architecture.md).

    ``row_batch``/``row_pos`` index the student's hidden states of the trained
    positions; ``target_ids`` are the gold next tokens; ``group_ids`` is the
    sequence index within the batch (the ATKD grouping); ``example_ids`` [B]
    names the source examples. ``top_k`` keeps the first top_k (largest) entries per row.
    A format v2 cache's batches add ``sample_ids`` / ``sample_counts`` [P, m] (``_pad_samples``).
    """
    B = len(records)
    lengths = np.array([len(r.input_ids) for r in records], dtype=np.int64)
    counts = np.array([r.num_positions for r in records], dtype=np.int64)
    L = int(lengths.max()) if B else 0
    input_ids = np.full((B, L), pad_id, dtype=np.int64)
    attention_mask = np.zeros((B, L), dtype=np.int64)
    for b, r in enumerate(records):
        input_ids[b, : lengths[b]] = r.input_ids
        attention_mask[b, : lengths[b]] = 1
    k = records[0].topk_ids.shape[1] if B else 0
    k = min(k, top_k) if top_k is not None else k
    row_batch = np.repeat(np.arange(B, dtype=np.int64), counts)
    row_pos = np.concatenate([r.target_positions for r in records]).astype(np.int64) if B else np.zeros(0, np.int64)

    def rows(name: str, dtype, shape=()) -> np.ndarray:
        if not B:
            return np.zeros((0, *shape), dtype=dtype)
        parts = [getattr(r, name) for r in records]
        if shape:  # the top-k arrays: keep the first k columns
            parts = [a[:, : shape[0]] for a in parts]
        return np.concatenate(parts).astype(dtype, copy=False)

    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "row_batch": torch.from_numpy(row_batch),
        "row_pos": torch.from_numpy(row_pos),
        "target_ids": torch.from_numpy(input_ids[row_batch, row_pos + 1]),
        "topk_ids": torch.from_numpy(rows("topk_ids", np.int64, (k,))),
        "topk_logprobs": torch.from_numpy(rows("topk_logprobs", np.float32, (k,))),
        "target_logprobs": torch.from_numpy(rows("target_logprobs", np.float32)),
        "group_ids": torch.from_numpy(row_batch.copy()),
        "example_ids": torch.tensor([r.example_id for r in records], dtype=torch.long),
    }
    if B and records[0].sample_ids is not None:
        batch["sample_ids"], batch["sample_counts"] = _pad_samples(records)
    return batch


def _pad_samples(records: Sequence[SequenceRecord]) -> tuple[torch.Tensor, torch.Tensor]:
    """Format v2's ragged draws -> ``sample_ids`` [P, m] long (padding -1) and ``sample_counts``
    [P, m] long (padding 0), m = the most distinct ids at one position of the batch."""
    per_pos = np.concatenate([np.diff(r.sample_offsets) for r in records]).astype(np.int64)
    ids = np.concatenate([r.sample_ids for r in records]).astype(np.int64)
    counts = np.concatenate([r.sample_counts for r in records]).astype(np.int64)
    m = int(per_pos.max()) if per_pos.size else 1
    row = np.repeat(np.arange(len(per_pos)), per_pos)
    col = np.arange(len(ids)) - np.repeat(np.cumsum(per_pos) - per_pos, per_pos)
    out_ids = np.full((len(per_pos), m), -1, dtype=np.int64)
    out_counts = np.zeros((len(per_pos), m), dtype=np.int64)
    out_ids[row, col], out_counts[row, col] = ids, counts
    return torch.from_numpy(out_ids), torch.from_numpy(out_counts)
