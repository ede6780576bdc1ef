"""Stage two without a cache: batches straight from the training rows (plain SFT, the teacher fine-tune).

    ds = RowsDataset(data_cfg, tokenizer, batch_size, seed=0, rank=0, world_size=1, pad_id=...)
    ds.counts(); ds.num_sequences()          the counted pass (once; recorded in `counts_path`)
    ds.state_dict(consumed, epoch); ds.load_state_dict(state)

The training rows are read by range, in *chunks* of `chunk_rows` source rows:
stages.data.training_rows opens them and stages.split.read_part keeps a chunk's
train part of data.holdout (every row without a split), as stage one does. A
chunk is tokenised (stages.data: the tokens stage one caches) when the reader
reaches it, and only one tokenised chunk is held at a time, so memory does not
grow with the dataset.

Order: each epoch is a seeded permutation of the chunks and, inside each chunk,
of its sequences: storage.order.EpochOrder with one chunk per window, keyed by
this data's fingerprint (source content, row count, data settings, tokenizer,
chunk_rows), the seed and the epoch. Global steps take the next
``world_size * batch_size`` slots and rank r's batch holds slots
``step_start + r + world_size * i``, exactly as storage.dataset.CacheDataset;
batches are the same dicts as the cache reader's minus the teacher arrays
(input_ids, attention_mask, row_batch, row_pos, target_ids, group_ids,
example_ids, epoch, consumed), so the trainer treats both alike and resumes from
{epoch, consumed} bit for bit.

Where a chunk's sequences begin in an epoch depends on how many sequences the
chunks before it hold after tokenisation (rows can be dropped), so the reader
first counts every chunk's sequences: one tokenising pass, done once and
recorded in `counts_path` (keyed by the fingerprint) so a resumed run skips it.
Its total is also what `optim.epochs` is resolved from.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from stages import data as data_mod
from stages import split
from stages.data_config import DataConfig
from stages.fingerprint import fingerprint_json, tokenizer_fingerprint
from stages.lm import collate_for_lm
from storage.dataset import BatchSpec, ResumableReader
from storage.files import atomic_write, read_json
from storage.order import EpochOrder

CHUNK_ROWS = 1024  # rows tokenised together; one chunk's sequences are shuffled together


class RowsDataset(ResumableReader, IterableDataset):
    """Batches of tokenised training rows, in a deterministic, resumable order (module doc).

    epochs: stop before this (absolute) epoch index; None streams forever.
    drop_last: skip an epoch's final partial global step (every rank gets full batches).
    counts_path: a JSON file recording the counted pass; written when `write_counts`.
    """

    def __init__(self, data_cfg: DataConfig, tokenizer, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, *, pad_id: int = 0, chunk_rows: int = CHUNK_ROWS, epochs: int | None = None,
                 drop_last: bool = True, counts_path: str | Path | None = None, write_counts: bool = True) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or chunk_rows < 1:
            raise ValueError(f"need batch_size >= 1, chunk_rows >= 1 and 0 <= rank < world_size, got batch_size="
                             f"{batch_size}, chunk_rows={chunk_rows}, rank={rank}, world_size={world_size}")
        self.data_cfg, self.tokenizer = data_cfg, tokenizer
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.pad_id, self.chunk_rows, self.epochs, self.drop_last = pad_id, chunk_rows, epochs, drop_last
        self.source, self.num_rows = data_mod.training_rows(data_cfg)
        if self.num_rows == 0:
            raise data_mod.DataError(f"the training data {data_cfg.path!r} has no rows; check data.path, "
                                     "data.split and data.limit")
        self.num_chunks = math.ceil(self.num_rows / chunk_rows)
        self.fingerprint = fingerprint_json({
            "rows": data_mod.rows_identity(data_cfg, self.source, self.num_rows),
            "tokenizer": tokenizer_fingerprint(tokenizer), "chunk_rows": chunk_rows})
        self.counts_path = Path(counts_path) if counts_path else None
        self.write_counts = write_counts
        self.stats: data_mod.DataStats | None = None  # of the counted pass (None when read from counts_path)
        self.start_epoch, self.start_consumed = 0, 0
        self._counts: list[int] | None = None
        self._held: tuple[int, list] | None = None  # (chunk, its examples): the one tokenised chunk

    # ---- resume state -----------------------------------------------------
    def _order_key(self) -> dict[str, Any]:
        return {"source": "rows", "chunk_rows": self.chunk_rows, "drop_last": self.drop_last}

    def _other_data(self, fingerprint) -> str:
        return (f"reader state is for data fingerprint {fingerprint!r}, but the training rows of "
                f"{self.data_cfg.path} (with this tokenizer and data settings) have {self.fingerprint!r}: the "
                "checkpoint was trained on other data. Resume with the original data or start a fresh run.")

    # ---- chunks -----------------------------------------------------------
    def _tokenize(self, chunk: int) -> tuple[list, data_mod.DataStats]:
        """The chunk's training rows (with data.holdout: its train part) tokenised; example_id = row index."""
        start = chunk * self.chunk_rows
        end = min(start + self.chunk_rows, self.num_rows)
        indices, rows = split.read_part(self.data_cfg, self.source, self.num_rows, start, end, part="train")
        return data_mod.tokenize_rows(rows, self.tokenizer, self.data_cfg, start=start, locate=self.source.location,
                                      indices=indices)

    def _chunk(self, chunk: int) -> list:
        """The chunk's examples; the previously held chunk is released first."""
        if self._held is None or self._held[0] != chunk:
            self._held = None
            self._held = (chunk, self._tokenize(chunk)[0])
        return self._held[1]

    def counts(self) -> list[int]:
        """Sequences per chunk after tokenisation: from counts_path, or one counted pass (then recorded)."""
        if self._counts is None:
            self._counts = self._read_counts()
        if self._counts is None:
            counts, stats = [], data_mod.DataStats()
            for chunk in range(self.num_chunks):  # one chunk at a time; nothing is kept but the count
                examples, chunk_stats = self._tokenize(chunk)
                counts.append(len(examples))
                stats.add(chunk_stats)
            data_mod.check_dropped(stats, self.data_cfg, f"the training rows of {self.data_cfg.path}")
            self._counts, self.stats = counts, stats
            if self.counts_path is not None and self.write_counts:
                atomic_write(self.counts_path, json.dumps({"fingerprint": self.fingerprint, "counts": counts,
                                                           "data": stats.as_dict()}))
        return self._counts

    def _read_counts(self) -> list[int] | None:
        if self.counts_path is None:
            return None
        record = read_json(self.counts_path)
        if record is None or record.get("fingerprint") != self.fingerprint:
            return None
        counts = record.get("counts")
        if not isinstance(counts, list) or len(counts) != self.num_chunks:
            return None
        self.stats = data_mod.DataStats(**record["data"]) if isinstance(record.get("data"), dict) else None
        return [int(c) for c in counts]

    def num_sequences(self) -> int:
        """Sequences in one epoch (the rows left after tokenisation drops)."""
        return sum(self.counts())

    # ---- order ------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> EpochOrder:
        counts = self.counts()
        return EpochOrder(lambda chunk: counts[chunk], self.num_chunks, fingerprint=self.fingerprint,
                          seed=self.seed, epoch=epoch, shuffle=True, window=1, permute_shards=True)

    def batch_specs(self) -> Iterator[BatchSpec]:
        """This rank's batches from the start state on (index arithmetic; nothing is tokenised)."""
        total, W, B = self.num_sequences(), self.world_size, self.batch_size
        if total < (W * B if self.drop_last else W):
            raise data_mod.DataError(
                f"the training rows of {self.data_cfg.path} give {total} sequences after tokenisation, fewer than "
                f"one global batch (world_size {W} x batch_size {B}); lower optim.batch_size or add rows")
        epoch, consumed = self.start_epoch, self.start_consumed
        while self.epochs is None or epoch < self.epochs:
            order = self._epoch_order(epoch)
            lo = consumed
            while True:
                hi = lo + W * B
                end = min(hi, total)
                if end <= lo or (end < hi and self.drop_last):
                    break
                slots = list(range(lo + self.rank, end, W))[:B]
                state = (epoch + 1, 0) if end < hi else (epoch, end)  # (epoch, N) rolls over on resume
                if slots:
                    yield BatchSpec(epoch, slots, order, *state)
                if end < hi:
                    break
                lo = end
            epoch, consumed = epoch + 1, 0

    # ---- iteration --------------------------------------------------------
    def examples(self, spec: BatchSpec) -> list:
        """The batch's TokenizedExamples; slots ascend, so chunks are reached in order."""
        return [self._chunk(chunk)[row] for chunk, row in spec.order.locate(spec.slots)]

    def iter_batches(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[dict[str, Any]]:
        """Collated batch dicts of this worker's share of the rank's batches."""
        for spec in itertools.islice(self.batch_specs(), worker_id, None, num_workers):
            batch = collate_examples(self.examples(spec), self.pad_id)
            batch.update(epoch=spec.next_epoch, consumed=spec.next_consumed)
            yield batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        return self.iter_batches(info.id if info else 0, info.num_workers if info else 1)


def collate_examples(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """TokenizedExamples -> the cache reader's batch dict without teacher arrays
    (storage.dataset.collate_sequences; docs/architecture.md)."""
    input_ids, attention_mask, row_batch, row_pos = collate_for_lm(examples, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "row_batch": row_batch, "row_pos": row_pos,
            "target_ids": input_ids[row_batch, row_pos + 1], "group_ids": row_batch.clone(),
            "example_ids": torch.tensor([e.example_id for e in examples], dtype=torch.long)}


ROWS_COUNTS = "rows-counts.json"  # in a run directory trained from the rows: its counted pass


def open_rows_dataset(data_cfg: DataConfig, tokenizer, batch_size: int, *, seed: int, name: str, out: Path, d):
    """(RowsDataset over the training rows for the run in `out` on the ranks of `d`
    (stages.training.distributed.Dist), the chat template `messages` data was rendered with).
    Its counted pass runs here (recorded in <out>/rows-counts.json for a resumed run)."""
    from stages.lm import pad_id
    from stages.training.resume import say

    dataset = RowsDataset(data_cfg, tokenizer, batch_size, seed=seed, rank=d.rank, world_size=d.world_size,
                          pad_id=pad_id(tokenizer), counts_path=out / ROWS_COUNTS, write_counts=d.is_main)
    total = dataset.num_sequences()
    if d.is_main:
        said = f"{dataset.stats.summary()}" if dataset.stats is not None else f"{total:,} sequences (counted before)"
        say(f"{name}: training from the rows of {data_cfg.path} (no teacher cache): {said}")
    return dataset, data_mod.chat_template_for(data_cfg, tokenizer)
