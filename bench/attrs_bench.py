"""How long reading many shards' group attributes takes (no array decoding).

    python bench/attrs_bench.py [--shards 200]

Builds a cache of small shards on a local directory and on ``memory://`` and
times what reads only attributes: ``Cache.shard_attrs`` over every shard,
``Cache.completed_shards`` (object stores read every shard's attributes) and
``verify_cache(deep=False)``; plus a deep verify, which decodes everything.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from storage.cache import Cache  # noqa: E402
from storage.verify import verify_cache  # noqa: E402
from tests.support.synthetic import build_cache  # noqa: E402


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _register_slow_memory(seconds: float) -> None:
    """``slowmem://``: memory:// whose file reads take ``seconds`` each, like an object store's GET."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class SlowMemory(MemoryFileSystem):
        protocol = ("slowmem",)

        def cat_file(self, path, start=None, end=None, **kwargs):
            time.sleep(seconds)
            return super().cat_file(path, start=start, end=end, **kwargs)

    fsspec.register_implementation("slowmem", SlowMemory, clobber=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--sequences", type=int, default=3, help="sequences per shard (synthetic, <= 24 tokens)")
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="also time a memory:// store whose every file read sleeps this long (an object store)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        urls = {"local": os.path.join(tmp, "cache"), "memory": f"memory://attrs-bench-{uuid.uuid4().hex}"}
        if args.latency_ms > 0:
            _register_slow_memory(args.latency_ms / 1e3)
            urls[f"memory +{args.latency_ms:g} ms/read"] = f"slowmem://attrs-bench-{uuid.uuid4().hex}"
        print("| backend | shards | shard_attrs x N | completed_shards | verify (attrs only) | verify (deep) |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, url in urls.items():
            build_cache(url, [args.sequences] * args.shards)
            cache = Cache.open(url)
            n = cache.num_shards
            t_attrs = best(lambda cache=cache, n=n: [cache.shard_attrs(i) for i in range(n)])
            t_done = best(cache.completed_shards)
            t_verify = best(lambda url=url: verify_cache(url, deep=False))
            t_deep = best(lambda url=url: verify_cache(url, deep=True), repeat=1)
            print(f"| {name} | {n} | {t_attrs * 1e3:.0f} ms | {t_done * 1e3:.0f} ms | "
                  f"{t_verify * 1e3:.0f} ms | {t_deep * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
