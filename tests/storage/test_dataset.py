"""The streaming reader: deterministic order, stop/resume at any world size and worker count,
follow mode, corrupt shards, collate."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from storage.cache import Cache, CorruptShardError
from storage.dataset import CacheDataset, collate_sequences
from tests.support.synthetic import build_cache, make_identity, make_plan, shard_for_plan

SIZES = [7, 0, 5, 11, 4]  # 27 sequences, one empty shard
N = sum(SIZES)
B = 2
EPOCHS = 2


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ds") / "cache")
    build_cache(path, SIZES)
    return path


def _rank_batches(url, world, rank, seed, workers, state=None, limit=None, **kw):
    ds = CacheDataset(url, B, seed=seed, rank=rank, world_size=world, epochs=EPOCHS, **kw)
    if state is not None:
        ds.load_state_dict(state)
    loader = DataLoader(ds, batch_size=None, num_workers=workers) if workers else ds
    out = []
    for batch in loader:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return ds, out


def _run(url, world, seed, workers, state=None, steps=None, **kw):
    """Global order of example ids consumed by `world` ranks, and the state after the last step."""
    per_rank = [_rank_batches(url, world, r, seed, workers, state, steps, **kw) for r in range(world)]
    order, last = [], None
    for step, rank0 in enumerate(per_rank[0][1]):
        items = {}
        for r, (_, batches) in enumerate(per_rank):
            if step < len(batches):
                assert (batches[step]["epoch"], batches[step]["consumed"]) == (rank0["epoch"], rank0["consumed"])
                for i, ex in enumerate(batches[step]["example_ids"].tolist()):
                    items[world * i + r] = ex  # slot offset within the global step
        order += [items[k] for k in sorted(items)]
        last = per_rank[0][0].state_dict(rank0["consumed"], rank0["epoch"])
    return order, last


_REFERENCE: dict[int, list[int]] = {}


def _reference(url, seed):
    if seed not in _REFERENCE:
        _REFERENCE[seed] = _run(url, 1, seed, 0, drop_last=False)[0]
    return _REFERENCE[seed]


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_stop_resume_matches_uninterrupted(url, world, workers, seed):
    reference = _reference(url, seed)
    assert sorted(reference) == sorted(list(range(N)) * EPOCHS)
    # Stops: mid-epoch 0, and one later (for world 3 after 5 steps: exactly the
    # end of epoch 0). Each DataLoader with workers costs ~0.5 s, so fewer there.
    for steps in ((2, 6) if workers == 0 else (5,)):
        head, state = _run(url, world, seed, workers, steps=steps, drop_last=False)
        tail, _ = _run(url, world, seed, workers, state=state, drop_last=False)
        # Same order whatever the world size, worker count or stop point.
        assert head + tail == reference, (steps, state)


@pytest.mark.parametrize("before, after", [(2, 3), (3, 1)])
def test_resume_with_another_world_size(url, before, after):
    full = _reference(url, 3)
    head, state = _run(url, before, 3, 0, steps=3, drop_last=False)
    tail, _ = _run(url, after, 3, 0, state=state, drop_last=False)
    assert head + tail == full


def test_drop_last_gives_every_rank_equal_full_batches(url):
    per_rank = [_rank_batches(url, 3, r, 0, 0)[1] for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1
    assert all(len(b["example_ids"]) == B for batches in per_rank for b in batches)
    assert len(per_rank[0]) == EPOCHS * (N // (3 * B))


def test_orders_differ_by_seed_and_epoch_and_follow_shuffle_off(url):
    order0, _ = _run(url, 1, 0, 0, drop_last=False)
    order1, _ = _run(url, 1, 1, 0, drop_last=False)
    assert order0 != order1 and order0[:N] != order0[N:]
    plain, _ = _run(url, 1, 0, 0, drop_last=False, shuffle=False)
    assert plain == list(range(N)) * EPOCHS


def test_fingerprint_and_seed_mismatch_on_resume_raise(url, tmp_path):
    other = str(tmp_path / "other")
    Cache.create_or_open(other, make_identity(teacher="another"), make_plan(SIZES))
    _, state = _run(url, 1, 0, 0, steps=2)
    ds = CacheDataset(other, B)
    with pytest.raises(ValueError, match="fingerprint"):
        ds.load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        CacheDataset(url, B, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="order settings"):
        CacheDataset(url, B, seed=0, shuffle_window=2).load_state_dict(state)


def test_too_few_sequences_for_one_global_batch_raises(url):
    with pytest.raises(RuntimeError, match="27 sequences for world_size 3 x batch_size 10 with drop_last"):
        next(iter(CacheDataset(url, 10, world_size=3)))


def test_incomplete_cache_needs_follow(tmp_path):
    path = str(tmp_path / "c")
    build_cache(path, [3, 4], write=[0])
    with pytest.raises(RuntimeError, match="1/2 shards complete"):
        next(iter(CacheDataset(path, 2)))


def test_follow_picks_up_shards_written_after_iteration_started(tmp_path):
    path = str(tmp_path / "c")
    cache = build_cache(path, [3, 4, 5], write=[0])
    seen, done = [], threading.Event()

    def consume():
        ds = CacheDataset(path, 2, seed=1, follow=True, epochs=1, drop_last=False, poll_interval=0.02,
                          follow_timeout=60)
        for batch in ds:
            seen.append(batch["example_ids"].tolist())
        done.set()

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.3)
    assert not done.is_set() and sorted(sum(seen, []))[:2] == [0, 1]  # shard 0 read, waiting for 1
    for i in (1, 2):
        cache.write_shard(i, shard_for_plan(cache.manifest.shard_plan[i]))
    thread.join(timeout=60)
    assert done.is_set()
    flat = sum(seen, [])
    assert sorted(flat) == list(range(12))
    assert sorted(flat[:3]) == [0, 1, 2]  # index order of shards, shuffled within
    again = [b["example_ids"].tolist() for b in CacheDataset(path, 2, seed=1, follow=True, epochs=1,
                                                             drop_last=False)]
    assert again == seen  # deterministic whatever the timing


def test_window_shuffle_keeps_every_sequence_and_cache_size_changes_nothing(url):
    order, _ = _run(url, 1, 0, 0, drop_last=False, shuffle_window=2)
    assert sorted(order) == sorted(list(range(N)) * EPOCHS)
    assert _run(url, 1, 0, 0, drop_last=False, shard_cache_bytes=0)[0] == _reference(url, 0)


def test_reader_refuses_a_corrupt_shard_naming_it(tmp_path):
    path = str(tmp_path / "c")
    cache = build_cache(path, [4, 4])
    rel = f"{cache.shard_rel(1)}/topk_ids/c/0/0"
    raw = bytearray(cache.fs.read_bytes(rel))
    raw[len(raw) // 2] ^= 0x55
    cache.fs.write_bytes_atomic(rel, bytes(raw))
    with pytest.raises(CorruptShardError, match=r"shard-00001\.zarr.*topk_ids"):
        list(CacheDataset(path, 2, epochs=1))


def test_collate_layout_matches_architecture():
    data = shard_for_plan({"index": 0, "example_start": 10, "num_sequences": 3})
    records = list(data.sequences())
    batch = collate_sequences(records, pad_id=-1)
    L = max(len(r.input_ids) for r in records)
    assert batch["input_ids"].shape == (3, L) and batch["input_ids"].dtype == torch.long
    P = data.num_positions
    for name, shape, dtype in [("row_batch", (P,), torch.long), ("row_pos", (P,), torch.long),
                               ("target_ids", (P,), torch.long), ("topk_ids", (P, 8), torch.long),
                               ("topk_logprobs", (P, 8), torch.float32),
                               ("target_logprobs", (P,), torch.float32), ("group_ids", (P,), torch.long)]:
        assert batch[name].shape == shape and batch[name].dtype == dtype, name
    for b, r in enumerate(records):
        n = len(r.input_ids)
        assert batch["attention_mask"][b].sum() == n and (batch["input_ids"][b, n:] == -1).all()
    gathered = batch["input_ids"][batch["row_batch"], batch["row_pos"] + 1]
    assert torch.equal(gathered, batch["target_ids"])
    np.testing.assert_array_equal(batch["topk_logprobs"].numpy(), data.topk_logprobs.astype(np.float32))
    assert batch["example_ids"].tolist() == [10, 11, 12]


def test_top_k_keeps_the_first_entries_of_each_row(url):
    full = next(iter(CacheDataset(url, B, seed=0, epochs=1)))
    fewer = next(iter(CacheDataset(url, B, seed=0, epochs=1, top_k=2)))
    assert fewer["topk_ids"].shape == (full["topk_ids"].shape[0], 2)
    assert torch.equal(fewer["topk_ids"], full["topk_ids"][:, :2])
    assert torch.equal(fewer["topk_logprobs"], full["topk_logprobs"][:, :2])
    assert torch.equal(fewer["target_logprobs"], full["target_logprobs"])
    cached_k = full["topk_ids"].shape[1]
    with pytest.raises(ValueError, match=f"holds the teacher's top-{cached_k}; use at most {cached_k}"):
        CacheDataset(url, B, top_k=cached_k + 1)
