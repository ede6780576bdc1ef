"""Cache size and reader speed on realistic-looking teacher rows (issue 2's "bench/" check).

    python bench/cache_bench.py [--positions 1000000] [--k 64] [--vocab 32000] [--steps 0.08]
    python bench/cache_bench.py --targets [--positions 16384] [--capture-rows 96]

Generates a cache of >= --positions trained positions, then prints bytes per
position and per top-k entry (raw vs stored), write time, a codec comparison
on one shard, and reader throughput (positions/s, one process, shuffled,
through CacheDataset + collate_sequences). Then the same shards once more per
lossy log-prob encoding (cache.logprob_encoding u8-rel, one per --steps),
side by side with exact: bytes, write throughput, the per-position KL from the
exact top-k-implied target to the decoded one (tests/support/target_kl.py), reader
throughput; plus fp16 with zeroed mantissa bits, considered and not adopted.

How the rows are made (no real teacher on CPU, so a statistical stand-in):
- top-k ids: Zipf(0.8) over the vocabulary, distinct within a row, ordered by
  a noisy frequency rank (the top-1 is often but not always a frequent token);
  ids follow frequency order loosely, as in BPE vocabularies.
- log-probs: the top-k of V Gumbel logits (exact order statistics via
  exponential spacings) at a per-row temperature drawn log-uniformly from
  [0.05, 2], normalised including the mass of the V-k tokens outside the top-k.
  This gives top-1 probabilities from ~0.01 to ~1 (median ~0.75).
- the gold token is drawn from the row's distribution (inside the top-k with
  its probability, else an outside token with a lower log-prob).

`--targets` compares the teacher-target kinds (issue 13) on the same positions:
top-64 (format v1), sampled n=16 and n=32, topk+sampled (n=16) (format v2), and
topk+sampled once more with the top-k stored as u8-rel (bytes only). It
needs every position's full distribution, so it makes dense rows of the same
family: logits = (log Zipf(0.8) frequency prior of the id + Gumbel noise x 2) / T,
T log-uniform in [0.05, 2], gold drawn from the row. Printed: stored bytes per
position (all arrays, and the teacher's arrays alone), and per position the
error of each kind's implied target against the exact p: KL(p || top-k with the
tail mass spread uniformly), and the total variation TV(p, target) of one cache
and of the mean target of 16 independently seeded caches (sampling is
unbiased, so averaging caches drives its error towards 0; top-k's error is a
bias and stays). Then capture
throughput of each kind through run_capture (transformers engine, a tiny Llama
with a 32000-logit head, --capture-rows rows, this machine's CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.cache import Cache  # noqa: E402
from storage.dataset import CacheDataset  # noqa: E402
from storage.encoding import LogprobEncoding  # noqa: E402
from storage.schema import SequenceRecord, ShardData  # noqa: E402


def teacher_rows(rng: np.random.Generator, P: int, k: int, V: int, rank_to_id: np.ndarray):
    """P rows of (topk_ids int32, topk_logprobs float16, gold id, gold log-prob float32)."""
    temps = np.geomspace(0.05, 2.0, 64)
    tail = np.log(np.arange(k + 1, V + 1, dtype=np.float64))
    log_resid = np.array([np.log(np.exp((np.log(V) - tail) / T).sum()) for T in temps])
    cdf = np.cumsum(1.0 / np.arange(1, V + 1) ** 0.8)
    cdf /= cdf[-1]
    ranks = np.empty((P, k), np.int64)
    todo = np.arange(P)
    while len(todo):  # rows short of k distinct candidates are redrawn
        cand = np.searchsorted(cdf, rng.random((len(todo), 3 * k))).clip(0, V - 1)
        cand.sort(axis=1)
        dup = np.zeros(cand.shape, bool)
        dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
        ok = (~dup).sum(1) >= k
        key = np.log1p(cand) + rng.gumbel(size=cand.shape) + dup * 1e9  # duplicates sort last
        pick = np.take_along_axis(cand, np.argsort(key, axis=1)[:, :k], axis=1)
        ranks[todo[ok]] = pick[ok]
        todo = todo[~ok]
    ids = rank_to_id[ranks]
    T = np.exp(rng.uniform(np.log(0.05), np.log(2.0), P))
    g = (np.log(V) - np.log(np.cumsum(rng.exponential(size=(P, k)), axis=1))) / T[:, None]
    res = np.interp(np.log(T), np.log(temps), log_resid)
    top = np.maximum(g[:, 0], res)
    lse = top + np.log(np.exp(g - top[:, None]).sum(1) + np.exp(res - top))
    lp = (g - lse[:, None]).astype(np.float16)
    gi = (np.cumsum(np.exp(lp.astype(np.float64)), axis=1) < rng.random(P)[:, None]).sum(1)
    inside = gi < k
    rows = np.arange(P)
    gold_lp = np.where(inside, lp[rows, np.minimum(gi, k - 1)].astype(np.float32),
                       lp[:, -1].astype(np.float32) - 0.1 - rng.exponential(2.0, P).astype(np.float32))
    gold = ids[rows, np.minimum(gi, k - 1)].copy()
    outside = np.flatnonzero(~inside)
    for i in outside:  # an id not in the row
        while (gold[i] == ids[i]).any():
            gold[i] = rng.integers(0, V)
    return ids.astype(np.int32), lp, gold.astype(np.int32), gold_lp


def make_shard(rng, positions: int, k: int, V: int, rank_to_id: np.ndarray, example_start: int) -> ShardData:
    """Sequences of 128..1024 tokens with a 10-50% prompt until ``positions`` targets."""
    lengths, prompts, total = [], [], 0
    while total < positions:
        L = int(rng.integers(128, 1025))
        prompt = int(L * rng.uniform(0.1, 0.5))
        lengths.append(L)
        prompts.append(prompt)
        total += L - prompt
    ids, lp, gold, gold_lp = teacher_rows(rng, total, k, V, rank_to_id)
    records, row = [], 0
    for j, (L, prompt) in enumerate(zip(lengths, prompts)):
        tokens = rank_to_id[np.searchsorted(np.linspace(0, 1, V), rng.random(L) ** 3)].astype(np.int32)
        t = np.arange(prompt - 1, L - 1, dtype=np.int32)
        sl = slice(row, row + len(t))
        tokens[t + 1] = gold[sl]
        records.append(SequenceRecord(example_start + j, tokens, t, ids[sl], lp[sl], gold_lp[sl]))
        row += len(t)
    return ShardData.from_sequences(records)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def read_throughput(url: str, **kw) -> tuple[float, float, float]:
    """(positions per wall second, per CPU second of this process, wall seconds).

    CPU seconds (all threads, incl. zarr's decoders) are reported too because
    wall time on a shared machine measures the neighbours as much as the reader.
    """
    ds = CacheDataset(url, batch_size=32, seed=0, epochs=1, drop_last=False, **kw)
    t0, c0, positions = time.perf_counter(), time.process_time(), 0
    for batch in ds:
        positions += batch["target_ids"].shape[0]
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return positions / dt, positions / dc, dt


def print_reader(url: str) -> None:
    print("\nreader (one process, shuffled, batch 32 sequences, CacheDataset + collate):")
    print(f"  {'':44s} {'pos/s wall':>12s} {'pos/CPU-s':>12s}")
    # Global shuffle with fewer cached shards than the cache has re-decodes a
    # shard for almost every sequence (each batch touches ~every shard): use
    # shuffle_window <= cached shards for caches bigger than shard_cache_bytes.
    for label, kw in (("global shuffle, all shards cached (1 GiB)", {}),
                      ("shuffle_window=1, 1 shard cached", {"shuffle_window": 1, "shard_cache_bytes": 0})):
        rate, cpu_rate, dt = read_throughput(url, **kw)
        print(f"  {label:44s} {rate:12,.0f} {cpu_rate:12,.0f}   ({dt:.1f}s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--shard-positions", type=int, default=131_072)
    ap.add_argument("--out", default=None, help="cache directory (default: a temp dir)")
    ap.add_argument("--read-only", action="store_true", help="only the reader figures, on an existing --out")
    ap.add_argument("--steps", default="0.08", help="u8-rel steps to compare with exact, comma-separated ('' = none)")
    ap.add_argument("--no-codecs", action="store_true", help="skip the codec comparison")
    args = ap.parse_args()
    if args.read_only:
        print_reader(os.path.join(args.out, "cache"))
        return
    rng = np.random.default_rng(0)
    V, k = args.vocab, args.k
    rank_to_id = np.argsort(np.arange(V) * np.exp(rng.normal(0, 0.5, V)), kind="stable").astype(np.int32)
    n_shards = -(-args.positions // args.shard_positions)
    root = args.out or tempfile.mkdtemp(prefix="atkd-bench-")
    url = os.path.join(root, "cache")

    t0 = time.perf_counter()
    shards = [make_shard(rng, args.shard_positions, k, V, rank_to_id, i * 10_000) for i in range(n_shards)]
    gen_s = time.perf_counter() - t0
    plan = [{"index": i, "num_sequences": s.num_sequences} for i, s in enumerate(shards)]
    identity = {"teacher": "bench-synthetic", "top_k": k, "vocab_size": V}
    cache = Cache.create_or_open(url, identity, plan)
    t0 = time.perf_counter()
    for i, s in enumerate(shards):
        cache.write_shard(i, s)
    write_s = time.perf_counter() - t0

    P = sum(s.num_positions for s in shards)
    raw = sum(a.nbytes for s in shards for a in s.arrays().values())
    raw_topk = sum(s.topk_ids.nbytes + s.topk_logprobs.nbytes for s in shards)
    stored = dir_bytes(os.path.join(url, "shards"))
    per_array = {name: sum(dir_bytes(os.path.join(url, cache.shard_rel(i), name)) for i in range(n_shards))
                 for name in ("topk_ids", "topk_logprobs")}
    stored_topk = sum(per_array.values())
    top1 = np.exp(np.concatenate([s.topk_logprobs[:, 0] for s in shards]).astype(np.float32))

    print(f"cache: {P:,} positions, {sum(s.num_sequences for s in shards):,} sequences, {n_shards} shards, "
          f"k={k}, vocab={V} (generated in {gen_s:.0f}s); top-1 prob p10/p50/p90 = "
          f"{np.percentile(top1, 10):.2f}/{np.percentile(top1, 50):.2f}/{np.percentile(top1, 90):.2f}")
    print(f"{'measure':44s} {'raw':>10s} {'stored':>10s} {'ratio':>7s}")
    print(f"{'bytes per position (all arrays)':44s} {raw / P:10.1f} {stored / P:10.1f} {raw / stored:7.2f}")
    print(f"{'bytes per top-k entry (ids + logprobs)':44s} {raw_topk / (P * k):10.3f} "
          f"{stored_topk / (P * k):10.3f} {raw_topk / stored_topk:7.2f}")
    print(f"{'  of which topk_ids':44s} {4.0:10.3f} {per_array['topk_ids'] / (P * k):10.3f}")
    print(f"{'  of which topk_logprobs':44s} {2.0:10.3f} {per_array['topk_logprobs'] / (P * k):10.3f}")
    print(f"write (validate + compress + checksum + commit): {write_s:.1f}s, {P / write_s:,.0f} positions/s")

    steps = [float(x) for x in args.steps.split(",") if x.strip()]
    if steps:
        print_encodings(root, url, shards, identity, plan, steps, write_s)
    if args.no_codecs:
        print_reader(url)
        return
    print("\ncodec comparison on shard 0 (bytes per top-k entry; write s):")
    for codec in ("default", "shuffle", "bitshuffle", "lz4", "zstd9"):
        sub = Cache.create_or_open(os.path.join(root, f"codec-{codec}"), identity, plan[:1])
        t0 = time.perf_counter()
        sub.write_shard(0, shards[0], codec=codec)
        dt = time.perf_counter() - t0
        b = sum(dir_bytes(os.path.join(sub.fs.path(sub.shard_rel(0)), n)) for n in ("topk_ids", "topk_logprobs"))
        print(f"  {codec:12s} {b / (shards[0].num_positions * k):6.3f} B/entry   {dt:6.1f}s")
    print(f"  (outside format v1, for reference) {_delta_bound(shards[0]):.3f} B/entry: ids as-is + "
          "log-prob bit patterns delta-coded along the row, blosc zstd 9")

    print_reader(url)


def _gold(s: ShardData) -> np.ndarray:
    return s.input_ids[s.seq_offsets[np.repeat(np.arange(s.num_sequences), np.diff(s.target_offsets))]
                       + s.target_positions.astype(np.int64) + 1]


def _kl_stats(shards: list[ShardData], decoded: list[ShardData], vocab: int) -> str:
    from tests.support.target_kl import target_kl

    kl = np.concatenate([target_kl(a.topk_ids, a.topk_logprobs, b.topk_ids, b.topk_logprobs, _gold(a),
                                   a.target_logprobs, vocab) for a, b in zip(shards, decoded)])
    return (f"{kl.mean():9.1e} {np.quantile(kl, 0.99):9.1e} {np.quantile(kl, 0.999):9.1e} {kl.max():9.1e}")


def print_encodings(root: str, exact_url: str, shards: list[ShardData], identity: dict, plan: list, steps: list[float],
                    exact_write_s: float) -> None:
    """Exact vs u8-rel on the same shards: bytes, write throughput, KL error, reader throughput."""
    vocab, k = identity["vocab_size"], identity["top_k"]
    P = sum(s.num_positions for s in shards)
    print(f"\nlog-prob encodings, same {P:,} positions (B = stored bytes; KL = per-position KL from the exact "
          "top-k-implied target to the decoded one, nats):")
    print(f"  {'encoding':22s} {'B/token':>8s} {'B/pos':>7s} {'B/entry':>8s} {'ids':>6s} {'lp':>6s} "
          f"{'write pos/s':>11s} {'KL mean':>9s} {'p99':>9s} {'p99.9':>9s} {'max':>9s} {'bound':>8s} "
          f"{'read pos/s':>10s} {'pos/CPU-s':>10s}")
    T = sum(s.num_tokens for s in shards)
    for enc in [LogprobEncoding()] + [LogprobEncoding.from_config("u8-rel", st) for st in steps]:
        if enc.lossy:
            url = os.path.join(root, f"cache-{enc.name}-{enc.step:g}")
            cache = Cache.create_or_open(url, identity, plan, logprob_encoding=enc)
            t0 = time.perf_counter()
            for i, s in enumerate(shards):
                cache.write_shard(i, s)
            write_s = time.perf_counter() - t0
            kl = _kl_stats(shards, [cache.read_shard(i) for i in range(len(shards))], vocab)
        else:
            url, cache, write_s = exact_url, Cache.open(exact_url), exact_write_s
            kl = f"{0.0:9.1e} {0.0:9.1e} {0.0:9.1e} {0.0:9.1e}"
        size = {name: sum(dir_bytes(os.path.join(url, cache.shard_rel(i), name)) for i in range(len(shards)))
                for name in enc.topk_arrays}
        ids_b = size["topk_id_deltas" if enc.lossy else "topk_ids"] / (P * k)
        stored = dir_bytes(os.path.join(url, "shards"))
        rate, cpu_rate, _ = read_throughput(url)
        label = enc.name if not enc.lossy else f"{enc.name} step {enc.step:g}"
        print(f"  {label:22s} {stored / T:8.1f} {stored / P:7.1f} {sum(size.values()) / (P * k):8.3f} {ids_b:6.3f} "
              f"{sum(size.values()) / (P * k) - ids_b:6.3f} {P / write_s:11,.0f} {kl} {enc.kl_bound:8.1e} "
              f"{rate:10,.0f} {cpu_rate:10,.0f}")
    print("  (reader: global shuffle, all shards cached, batch 32 sequences; B/token counts every array)")
    _print_fp16_considered(shards[0], vocab)


def _print_fp16_considered(shard: ShardData, vocab: int) -> None:
    """fp16 with the low mantissa bits rounded away (zstd drops the zero bits): its error grows with
    |log-prob|, and nothing keeps the residual bucket's mass, so its KL is far above u8-rel's."""
    import numcodecs

    from tests.support.target_kl import target_kl

    print("  considered, not adopted (shard 0): float16 log-probs with mantissa bits rounded to zero")
    z = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    for m in (4, 6):
        bits = shard.topk_logprobs.view(np.uint16).astype(np.uint32)
        keep = (0xFFFF << (10 - m)) & 0xFFFF
        lp = (((bits + (1 << (9 - m))) & keep).astype(np.uint16)).view(np.float16)
        kl = target_kl(shard.topk_ids, shard.topk_logprobs, shard.topk_ids, lp, _gold(shard), shard.target_logprobs,
                       vocab)
        print(f"    fp16, {m} mantissa bits: log-probs {len(z.encode(lp)) / lp.size:.3f} B/entry, KL mean "
              f"{kl.mean():.1e}, p99.9 {np.quantile(kl, 0.999):.1e}, max {kl.max():.1e}")


def _delta_bound(shard: ShardData) -> float:
    """A lossless transform format v1 does not use: how much a v2 could gain."""
    import numcodecs

    bits = shard.topk_logprobs.view(np.uint16).astype(np.int32)  # negative f16: bits grow as value falls
    delta = np.diff(bits, axis=1, prepend=0).astype(np.int16)
    z = numcodecs.Blosc(cname="zstd", clevel=9, shuffle=numcodecs.Blosc.BITSHUFFLE)
    ids = numcodecs.Blosc(cname="zstd", clevel=9, shuffle=numcodecs.Blosc.BITSHUFFLE).encode(shard.topk_ids)
    return (len(z.encode(delta)) + len(ids)) / shard.topk_ids.size


# ---------------------------------------------------------------- --targets (issue 13)
TARGET_KINDS = (("top-64 (v1)", 64, None), ("sampled n=16", 0, 16), ("sampled n=32", 0, 32),
                ("topk+sampled (64, n=16)", 64, 16))
# Format v2's two features together: the topk+sampled rows once more with the top-k as u8-rel.
COMBINED = ("topk+sampled (64, n=16)", "topk+sampled u8-rel")
REPEATS = 16  # independently seeded caches for the bias column


def dense_rows(rng, P: int, V: int, rank_to_id: np.ndarray):
    """[P, V] float64 log-probs (see the module doc) and gold ids drawn from them."""
    prior = np.empty(V)
    prior[rank_to_id] = -0.8 * np.log(np.arange(1, V + 1))
    T = np.exp(rng.uniform(np.log(0.05), np.log(2.0), (P, 1)))
    z = (prior[None, :] + 2.0 * rng.gumbel(size=(P, V))) / T
    lp = z - z.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    gold = (np.cumsum(np.exp(lp), axis=1) < rng.random((P, 1))).sum(1).clip(0, V - 1)
    return lp, gold


def target_errors(lp: np.ndarray, k: int, samples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per position: KL(p || top-k + uniform tail) and TV of each implied target against p."""
    import torch

    p = np.exp(lp)
    P, V = p.shape
    out = {}
    if k:
        top = torch.topk(torch.from_numpy(lp), k, dim=1)
        ids = top.indices.numpy()
        q = np.empty_like(p)
        kept = np.exp(top.values.numpy().astype(np.float16).astype(np.float64))  # as stored (float16)
        tail = np.clip(1.0 - kept.sum(1), 1e-12, None) / (V - k)
        q[:] = tail[:, None]
        np.put_along_axis(q, ids, kept, axis=1)
        out["kl"] = (p * (lp - np.log(q))).sum(1)
        out["tv"] = 0.5 * np.abs(p - q).sum(1)
        out["tv_mean"] = out["tv"]
    else:
        mean = np.zeros_like(p)
        for r, (ids, counts) in enumerate(samples):
            q = np.zeros_like(p)
            rows = np.repeat(np.arange(P), ids.shape[1]).reshape(ids.shape)
            used = counts > 0
            weight = counts / counts.sum(1, keepdims=True)  # c / n
            np.add.at(q, (rows[used], ids[used]), weight[used])
            if r == 0:
                out["tv"] = 0.5 * np.abs(p - q).sum(1)
            mean += q / len(samples)
        out["tv_mean"] = 0.5 * np.abs(p - mean).sum(1)
    return out


def targets_main(args) -> None:
    import torch

    from stages.teacher import sampling

    rng = np.random.default_rng(0)
    V, L = args.vocab, 257  # sequences of one prompt token + 256 targets
    rank_to_id = np.argsort(np.arange(V) * np.exp(rng.normal(0, 0.5, V)), kind="stable").astype(np.int32)
    P = -(-args.positions // (L - 1)) * (L - 1)
    seqs = P // (L - 1)
    root = args.out or tempfile.mkdtemp(prefix="atkd-bench-targets-")
    errors = {name: {"kl": [], "tv": [], "tv_mean": []} for name, _, _ in TARGET_KINDS}
    records = {name: [] for name, _, _ in TARGET_KINDS}
    chunk_seqs = 2
    for s0 in range(0, seqs, chunk_seqs):
        n_seq = min(chunk_seqs, seqs - s0)
        lp, gold = dense_rows(rng, n_seq * (L - 1), V, rank_to_id)
        lp_t = torch.from_numpy(lp)
        seq_of = s0 + np.repeat(np.arange(n_seq), L - 1)
        t_of = np.tile(np.arange(L - 1), n_seq)
        top = torch.topk(lp_t, 64, dim=1)
        enc = {}
        for n in (16, 32):
            enc[n] = [sampling.encode(sampling.draw(lp_t, sampling.uniforms(1000 + r, seq_of, t_of, n)).numpy())
                      for r in range(REPEATS)]
        for name, k, n in TARGET_KINDS:
            for key, v in target_errors(lp, k, enc[n] if n and not k else []).items():
                errors[name][key].append(v)
            for j in range(n_seq):
                rows = slice(j * (L - 1), (j + 1) * (L - 1))
                tokens = np.concatenate([[rank_to_id[0]], gold[rows]]).astype(np.int32)
                samples = {}
                if n:
                    ids, counts = enc[n][0][0][rows], enc[n][0][1][rows]
                    used = counts > 0
                    samples = dict(sample_offsets=np.concatenate([[0], np.cumsum(used.sum(1))]).astype(np.int64),
                                   sample_ids=ids[used].astype(np.int32), sample_counts=counts[used])
                records[name].append(SequenceRecord(
                    s0 + j, tokens, np.arange(L - 1, dtype=np.int32),
                    top.indices[rows, :k].numpy().astype(np.int32),
                    top.values[rows, :k].numpy().astype(np.float16),
                    lp[rows][np.arange(L - 1), gold[rows]].astype(np.float32), **samples))
    top1 = np.exp(np.concatenate([r.topk_logprobs[:, 0] for r in records["top-64 (v1)"]]).astype(np.float64))
    print(f"{P:,} positions, vocab {V}, top-1 prob p10/p50/p90 = {np.percentile(top1, 10):.2f}/"
          f"{np.percentile(top1, 50):.2f}/{np.percentile(top1, 90):.2f}")
    print(f"{'targets':26s} {'B/pos all':>10s} {'B/pos teacher':>14s} {'KL(p||top-k)':>13s} "
          f"{'TV one cache':>13s} {'TV mean of 16':>14s}")
    teacher_arrays = ("topk_ids", "topk_logprobs", "target_logprobs", "sample_offsets", "sample_ids", "sample_counts")
    for name, k, n in TARGET_KINDS:
        identity = {"teacher": "bench-dense", "top_k": k, "vocab_size": V}
        if n:
            identity.update(targets="topk+sampled" if k else "sampled", samples=n)
        shards = [ShardData.from_sequences(records[name][i:i + 32]) for i in range(0, seqs, 32)]
        url = os.path.join(root, name.split()[0].replace("+", "-") + f"-{n or k}")
        cache = Cache.create_or_open(url, identity, [{"index": i} for i in range(len(shards))])
        for i, s in enumerate(shards):
            cache.write_shard(i, s)
        total = dir_bytes(os.path.join(url, "shards"))
        teacher = sum(dir_bytes(os.path.join(url, cache.shard_rel(i), a)) for i in range(len(shards))
                      for a in teacher_arrays if os.path.isdir(os.path.join(url, cache.shard_rel(i), a)))
        e = {key: np.concatenate(v) if v else None for key, v in errors[name].items()}
        kl = f"{e['kl'].mean():13.4f}" if e["kl"] is not None else f"{'(inf)':>13s}"
        print(f"{name:26s} {total / P:10.1f} {teacher / P:14.1f} {kl} {e['tv'].mean():13.4f} "
              f"{e['tv_mean'].mean():14.4f}")
        if name == COMBINED[0]:
            url = os.path.join(root, "topk-sampled-u8")
            lossy = Cache.create_or_open(url, identity, [{"index": i} for i in range(len(shards))],
                                         logprob_encoding=LogprobEncoding.from_config("u8-rel"))
            for i, s in enumerate(shards):
                lossy.write_shard(i, s)
            arrays = teacher_arrays + lossy.encoding.topk_arrays
            total = dir_bytes(os.path.join(url, "shards"))
            teacher = sum(dir_bytes(os.path.join(url, lossy.shard_rel(i), a)) for i in range(len(shards))
                          for a in arrays if os.path.isdir(os.path.join(url, lossy.shard_rel(i), a)))
            print(f"{COMBINED[1]:26s} {total / P:10.1f} {teacher / P:14.1f} {'(as above, step 0.08)':>42s}")
    print("  (topk+sampled trains on one of its parts: its errors are those of the part used)")
    if args.capture_rows:
        capture_throughput(args.capture_rows, root)


def capture_throughput(rows: int, root: str) -> None:
    """Tokens per second of run_capture for each targets kind (tiny Llama, 32000 logits, CPU)."""
    import dataclasses

    import torch

    from tests.support import harness as fh
    from stages.data_config import DataConfig
    from stages.teacher.capture import run_capture
    from stages.teacher.config import CacheConfig, TeacherConfig

    tok = fh.make_tokenizer(os.path.join(root, "tok"))
    model = fh.make_tiny_llama(os.path.join(root, "llama32k"), tok, vocab=32000)
    data = fh.write_jsonl(os.path.join(root, "rows.jsonl"), fh.prompt_response_rows(rows))
    base = TeacherConfig(model=str(model), backend="transformers", dtype="float32", device="cpu", top_k=64,
                         batch_tokens=4096, logprob_chunk=512, overlap_writes=False)
    print(f"\ncapture throughput (run_capture, transformers, tiny Llama with 32000 logits, {rows} rows, "
          f"{torch.get_num_threads()} threads):")
    for name, k, n in TARGET_KINDS:
        cfg = dataclasses.replace(base, targets="topk" if not n else ("topk+sampled" if k else "sampled"),
                                  samples=n or 16)
        summary = run_capture(DataConfig(path=str(data), max_seq_len=256), cfg,
                              CacheConfig(path=os.path.join(root, f"capture-{cfg.targets}-{n}"),
                                          sequences_per_shard=rows), progress=False)
        print(f"  {name:26s} {summary.tokens_per_second:10,.0f} tokens/s ({summary.targets:,} targets, "
              f"{summary.busy_seconds:.1f} s)")


if __name__ == "__main__":
    if "--targets" in sys.argv:
        ap = argparse.ArgumentParser(description="teacher-target kinds compared (issue 13)")
        ap.add_argument("--targets", action="store_true")
        ap.add_argument("--positions", type=int, default=16384)
        ap.add_argument("--vocab", type=int, default=32_000)
        ap.add_argument("--capture-rows", type=int, default=96)
        ap.add_argument("--out", default=None)
        targets_main(ap.parse_args())
    else:
        main()
