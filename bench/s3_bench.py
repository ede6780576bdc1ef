"""The cache on S3 against a local S3 server (moto on 127.0.0.1): reader throughput beside the local
disk, and a race of lease claimers.

    python bench/s3_bench.py [--shards 8] [--positions 20000] [--claimers 8] [--rounds 50]

1. Reader: the same synthetic cache (k=64, Zipf-like ids) written to a local directory and to
   s3://bench/...; one epoch of CacheDataset per backend (bench/cache_bench.py's reader), positions
   per wall second and per CPU second of this process.
   The local S3 server is one Python process on this machine: the figure is a floor for the
   protocol path (s3fs, zarr's FsspecStore), not a measure of a real bucket.
2. Race: `--claimers` processes claim the same shard at the same moment (a barrier), for
   `--rounds` rounds on each backend; half of the rounds race for a free shard (generation 0),
   half for the takeover of an expired lease (generation 1). Exactly one winner per round is
   required (exit status 1 otherwise); the table gives the rounds, the winners and the time a
   claim took.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.s3 import LocalS3  # noqa: E402


def _claimer(url: str, name: str, rounds: int, barrier, results) -> None:
    from storage import lease
    from storage.fs import CacheFS

    fs = CacheFS(url)
    for r in range(rounds):
        barrier.wait()
        t = time.perf_counter()
        won = lease.try_acquire(fs, r, name, lease_seconds=600) is not None
        results.put((r, name, won, time.perf_counter() - t))


def race_claims(url: str, claimers: int, rounds: int, env: dict | None = None) -> tuple[list[int], list[float]]:
    """Winners per round and the claim times (s) of `claimers` processes racing for shard r in
    round r; odd rounds race to take over an expired generation-0 lease."""
    import os

    from storage import lease
    from storage.fs import CacheFS

    fs = CacheFS(url)
    for r in range(1, rounds, 2):  # expired leases to take over
        record = lease.LeaseRecord(r, 0, "dead-worker", uuid.uuid4().hex, expires_at=0.0)
        fs.create_exclusive(lease.lease_rel(r, 0), record.to_bytes())
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        ctx = mp.get_context("spawn")  # no inherited event loops or client sessions
        barrier, results = ctx.Barrier(claimers), ctx.Queue()
        procs = [ctx.Process(target=_claimer, args=(url, f"claimer-{i}", rounds, barrier, results))
                 for i in range(claimers)]
        for p in procs:
            p.start()
        got = [results.get(timeout=600) for _ in range(claimers * rounds)]
        for p in procs:
            p.join(60)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    winners = [0] * rounds
    for r, _, won, _ in got:
        winners[r] += won
    return winners, [t for *_, t in got]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--positions", type=int, default=20000, help="target positions per shard")
    p.add_argument("--claimers", type=int, default=8)
    p.add_argument("--rounds", type=int, default=50)
    args = p.parse_args()

    import numpy as np

    from bench.cache_bench import make_shard, read_throughput
    from storage.cache import Cache

    root = Path(tempfile.mkdtemp(prefix="s3_bench-"))
    failed = False
    with LocalS3() as s3:
        s3.apply_env()
        s3.make_bucket("bench")
        urls = {"local disk": str(root / "cache"), "S3 (moto, 127.0.0.1)": f"s3://bench/{uuid.uuid4().hex}/cache"}
        rng = np.random.default_rng(0)
        V, k = 32_000, 64
        rank_to_id = np.argsort(np.arange(V) * np.exp(rng.normal(0, 0.5, V)), kind="stable").astype(np.int32)
        shards = [make_shard(rng, args.positions, k, V, rank_to_id, i * 10_000) for i in range(args.shards)]
        plan = [{"index": i, "num_sequences": s.num_sequences} for i, s in enumerate(shards)]
        print(f"{args.shards} shards x {args.positions:,} positions, k={k}; one epoch of CacheDataset "
              "(global shuffle, batch 32), one process")
        print(f"{'backend':22s} {'write s':>8s} {'read s':>7s} {'positions/s':>12s} {'pos/CPU-s':>10s} {'MB':>6s}")
        for name, url in urls.items():
            cache = Cache.create_or_open(url, {"teacher": "bench-synthetic", "top_k": k, "vocab_size": V}, plan)
            t = time.perf_counter()
            for i, shard in enumerate(shards):
                cache.write_shard(i, shard)
            write_s = time.perf_counter() - t
            mb = sum(cache.fs.fs.du(cache.fs.path(cache.shard_rel(i))) for i in range(args.shards)) / 1e6
            rate, cpu_rate, seconds = read_throughput(url)
            print(f"{name:22s} {write_s:8.2f} {seconds:7.2f} {rate:12,.0f} {cpu_rate:10,.0f} {mb:6.1f}", flush=True)

        print(f"\nlease race: {args.claimers} processes claim one shard at once, {args.rounds} rounds "
              "(half free shards, half takeovers of an expired lease)")
        print(f"{'backend':22s} {'rounds':>6s} {'1 winner':>9s} {'0':>3s} {'>1':>3s} {'claim ms p50':>13s} "
              f"{'p95':>6s}")
        for name, url in urls.items():
            race_url = url.replace("/cache", "/race")
            winners, times = race_claims(race_url, args.claimers, args.rounds, s3.env())
            ms = sorted(t * 1000 for t in times)
            ones, zeros, many = winners.count(1), winners.count(0), sum(w > 1 for w in winners)
            failed |= ones != len(winners)
            print(f"{name:22s} {len(winners):6d} {ones:9d} {zeros:3d} {many:3d} {statistics.median(ms):13.1f} "
                  f"{ms[int(0.95 * (len(ms) - 1))]:6.1f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
