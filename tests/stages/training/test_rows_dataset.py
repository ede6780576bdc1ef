"""RowsDataset (stages/training/rows_dataset.py): plain SFT batches straight from the training rows.

Order and resume rules are the cache reader's: deterministic, a seeded permutation of chunks and of
sequences within a chunk per epoch, resumable bit for bit from {epoch, consumed}, one tokenised
chunk held at a time; the batches are the cache reader's dicts minus the teacher arrays.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stages import data as data_mod
from stages.data_config import DataConfig
from stages.training.rows_dataset import RowsDataset, collate_examples
from storage.errors import ReaderStateError
from tests.support import fixtures

ROWS = 37


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return str(fixtures.write_jsonl(tmp_path_factory.mktemp("rows") / "train.jsonl",
                                    fixtures.prompt_response_rows(ROWS, seed=4)))


def dataset(data_path, tokenizer, *, batch_size=3, seed=0, rank=0, world_size=1, chunk_rows=8, **kw):
    data_cfg = DataConfig(path=data_path, max_seq_len=kw.pop("max_seq_len", 128),
                          overlong=kw.pop("overlong", "truncate"), max_dropped_fraction=1.0)
    return RowsDataset(data_cfg, tokenizer, batch_size, seed=seed, rank=rank, world_size=world_size,
                       chunk_rows=chunk_rows, pad_id=0, **kw)


def take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_an_epoch_is_a_permutation_of_chunks_and_of_sequences_within_each(data_path, tiny_tokenizer):
    ds = dataset(data_path, tiny_tokenizer, batch_size=1, drop_last=False, epochs=2)
    assert ds.num_chunks == 5 and ds.num_sequences() == ROWS  # truncate: nothing dropped
    ids = [int(b["example_ids"][0]) for b in ds]
    first, second = ids[:ROWS], ids[ROWS:]
    assert sorted(first) == sorted(second) == list(range(ROWS))
    assert first != second and first != sorted(first)  # reshuffled every epoch
    chunks = [i // 8 for i in first]
    runs = [c for j, c in enumerate(chunks) if j == 0 or chunks[j - 1] != c]
    assert sorted(runs) == list(range(5))  # each chunk's sequences come together, chunks in a permuted order
    assert runs != sorted(runs)


def test_deterministic_and_seeded(data_path, tiny_tokenizer):
    a = take(dataset(data_path, tiny_tokenizer), 20)
    b = take(dataset(data_path, tiny_tokenizer), 20)
    c = take(dataset(data_path, tiny_tokenizer, seed=1), 20)
    assert all(same(x, y) for x, y in zip(a, b))
    assert not all(same(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("stop", [4, 12, 13])  # mid-epoch, the epoch's last full step, just after rollover
def test_resume_mid_epoch_is_bit_identical(data_path, tiny_tokenizer, stop):
    ref = take(dataset(data_path, tiny_tokenizer), 30)  # 12 full steps of 3 per epoch (37 sequences)
    state = dataset(data_path, tiny_tokenizer).state_dict(ref[stop - 1]["consumed"], ref[stop - 1]["epoch"])
    resumed = dataset(data_path, tiny_tokenizer)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    again = take(resumed, 30 - stop)
    assert all(same(x, y) for x, y in zip(ref[stop:], again))


def test_ranks_split_each_global_batch(data_path, tiny_tokenizer):
    whole = take(dataset(data_path, tiny_tokenizer, batch_size=4), 6)
    parts = [take(dataset(data_path, tiny_tokenizer, batch_size=2, rank=r, world_size=2), 6) for r in (0, 1)]
    for g, (a, b) in enumerate(zip(*parts)):
        got = sorted(a["example_ids"].tolist() + b["example_ids"].tolist())
        assert got == sorted(whole[g]["example_ids"].tolist())
        assert a["consumed"] == b["consumed"] == whole[g]["consumed"]


def test_drops_after_tokenisation_decide_the_epoch_and_are_counted_once(data_path, tiny_tokenizer, tmp_path):
    counts_path = tmp_path / "counts.json"
    ds = dataset(data_path, tiny_tokenizer, max_seq_len=50, overlong="skip", counts_path=counts_path)
    source, n = data_mod.training_rows(ds.data_cfg)
    kept, _ = data_mod.tokenize_rows(source.read(0, n), tiny_tokenizer, ds.data_cfg)
    assert 0 < len(kept) < ROWS and ds.num_sequences() == len(kept)
    assert ds.stats.skipped_overlong == ROWS - len(kept)
    assert json.loads(counts_path.read_text())["counts"] == ds.counts()
    # A second reader (a resumed run) takes the counts from the record: no tokenising pass.
    again = dataset(data_path, tiny_tokenizer, max_seq_len=50, overlong="skip", counts_path=counts_path)
    again._tokenize = lambda chunk: pytest.fail("counted again")
    assert again.num_sequences() == len(kept)
    # Another data setting is another fingerprint: the record is not used.
    other = dataset(data_path, tiny_tokenizer, max_seq_len=56, overlong="skip", counts_path=counts_path)
    assert other.fingerprint != ds.fingerprint and other.num_sequences() != len(kept)


def test_only_one_chunk_is_tokenised_at_a_time(data_path, tiny_tokenizer, monkeypatch):
    calls = []
    real = data_mod.tokenize_rows

    def spy(rows, *args, **kw):
        calls.append(len(rows))
        return real(rows, *args, **kw)

    monkeypatch.setattr(data_mod, "tokenize_rows", spy)
    ds = dataset(data_path, tiny_tokenizer, batch_size=2, drop_last=False, epochs=1)
    held = []
    for _ in ds:
        held.append(len(ds._held[1]))
    assert max(calls) <= 8 and max(held) <= 8  # never more than chunk_rows rows tokenised or held
    # The counted pass tokenises each chunk once, the epoch once more: batches straddling two
    # chunks do not bring an earlier chunk back.
    assert len(calls) == 2 * ds.num_chunks


def test_batches_are_the_cache_readers_minus_the_teacher_arrays(data_path, tiny_tokenizer):
    from storage.dataset import collate_sequences
    from storage.schema import SequenceRecord

    ds = dataset(data_path, tiny_tokenizer)
    source, n = data_mod.training_rows(ds.data_cfg)
    examples, _ = data_mod.tokenize_rows(source.read(0, 5), tiny_tokenizer, ds.data_cfg)
    records = [SequenceRecord(e.example_id, np.asarray(e.input_ids, np.int32), e.target_positions,
                              np.zeros((e.num_targets, 2), np.int32), np.zeros((e.num_targets, 2), np.float16),
                              np.zeros(e.num_targets, np.float32)) for e in examples]
    from_cache = collate_sequences(records, pad_id=0)
    from_rows = collate_examples(examples, pad_id=0)
    assert set(from_cache) - set(from_rows) == {"topk_ids", "topk_logprobs", "target_logprobs"}
    for key, value in from_rows.items():
        assert value.dtype == from_cache[key].dtype and torch.equal(value, from_cache[key]), key


def test_a_state_of_other_data_or_seed_is_refused(data_path, tiny_tokenizer, tmp_path):
    ds = dataset(data_path, tiny_tokenizer)
    state = ds.state_dict(6, 0)
    other = fixtures.write_jsonl(tmp_path / "other.jsonl", fixtures.prompt_response_rows(ROWS, seed=5))
    with pytest.raises(ReaderStateError, match="other data"):
        dataset(str(other), tiny_tokenizer).load_state_dict(state)
    with pytest.raises(ReaderStateError, match="seed"):
        dataset(data_path, tiny_tokenizer, seed=3).load_state_dict(state)
    with pytest.raises(ReaderStateError, match="order settings"):
        dataset(data_path, tiny_tokenizer, chunk_rows=4).load_state_dict({**state, "fingerprint": dataset(
            data_path, tiny_tokenizer, chunk_rows=4).fingerprint})


def test_fewer_sequences_than_a_global_batch_is_a_clear_error(data_path, tiny_tokenizer):
    with pytest.raises(data_mod.DataError, match="fewer than one global batch"):
        take(dataset(data_path, tiny_tokenizer, batch_size=20, world_size=2), 1)


def test_with_a_holdout_only_the_train_part_is_read(data_path, tiny_tokenizer):
    from stages import split
    from stages.data_config import HoldoutConfig

    data_cfg = DataConfig(path=data_path, max_seq_len=128, holdout=HoldoutConfig(validation=5, test=6, seed=2))
    ds = RowsDataset(data_cfg, tiny_tokenizer, 1, chunk_rows=8, drop_last=False, epochs=1)
    train = [int(i) for i in split.members_in(data_cfg, ROWS, 0, ROWS, part="train")]
    assert len(train) == ROWS - 11 and ds.num_sequences() == len(train)
    assert sorted(int(b["example_ids"][0]) for b in ds) == train  # example ids are source row numbers
    assert ds.fingerprint != dataset(data_path, tiny_tokenizer).fingerprint  # the split is part of the data
