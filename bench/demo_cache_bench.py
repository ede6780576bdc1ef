"""u8-rel against exact on a real teacher's cache: the demo teacher's top-k over the demo's training rows.

    python bench/demo_cache_bench.py [--run-dir runs/demo] [--shards 20,50,100,200,500,1000,4000]
                                     [--rows N] [--backend transformers] [--out DIR]

bench/cache_bench.py measures the encodings on synthetic rows (32k vocabulary,
Zipf-like ids). Here the rows are real: pipeline.yaml's demo (its data,
tokenizer and 3.3M-parameter teacher, built under --run-dir unless already
there: about 2 minutes; after `atkd run pipeline.yaml` they are reused) is
cached by stage one's own `run_capture` on the students' training rows with
pipeline.yaml's teacher.top_k, once per (sequences_per_shard, encoding), and
the caches are compared. Printed per shard size: the number of shards, stored
bytes per top-k entry of the top-k arrays (with their zarr metadata), bytes
per trained position of the whole cache (every array, shard and manifest
metadata), and u8-rel / exact for both. Small shards pay each array's fixed
costs (metadata, chunk headers, the compressor's warm-up) per shard, and
u8-rel stores three top-k arrays instead of two, so below some shard size it
stops paying; the table shows where. `--rows N` caches only the first N
training rows (data.limit): tiny shards are many files, and their per-shard
overhead does not depend on how many shards there are.

The transformers engine is the default (no ~25 s engine start per cache);
`--backend vllm` is the demo's own engine. Both give the teacher's top-k in
float32; their last bits differ, not the sizes that matter here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cache_bench import dir_bytes  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from stages.demo.teacher import prepare_demo  # noqa: E402
from stages.teacher.capture import run_capture  # noqa: E402
from stages.teacher.config import CacheConfig, TeacherConfig  # noqa: E402
from storage.cache import Cache  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENCODINGS = ("exact", "u8-rel")


def cache_sizes(url: str) -> dict:
    """Positions, shards, top-k entries and stored bytes (top-k arrays; everything) of a finished cache."""
    cache = Cache.open(url)
    shards = cache.completed_shards()
    arrays = cache.encoding.topk_arrays
    positions = sum(cache.read_shard(i).num_positions for i in shards)
    topk = sum(dir_bytes(os.path.join(url, cache.shard_rel(i), name)) for i in shards for name in arrays)
    return {"shards": len(shards), "positions": positions, "entries": positions * cache.manifest.identity["top_k"],
            "topk_bytes": topk, "all_bytes": dir_bytes(url)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="runs/demo", help="where the demo is (or is built)")
    ap.add_argument("--shards", default="20,50,100,200,500,1000,4000", help="sequences_per_shard values")
    ap.add_argument("--rows", type=int, default=None, help="only the first N training rows (default: all)")
    ap.add_argument("--backend", default="transformers", choices=("transformers", "vllm"))
    ap.add_argument("--out", default=None, help="where the caches go (default: a temporary directory)")
    args = ap.parse_args()

    cfg = load_config(REPO / "pipeline.yaml", [f"run_dir={args.run_dir}"])
    t0 = time.perf_counter()
    prepare_demo(cfg.demo, cfg.demo.dir, cfg.data, progress=False)
    print(f"demo under {cfg.demo.dir} ready ({time.perf_counter() - t0:.0f} s); teacher {cfg.teacher.model}, "
          f"top_k {cfg.teacher.top_k}, rows {cfg.data.path}, engine {args.backend}")
    data = dataclasses.replace(cfg.data, limit=args.rows)
    teacher = TeacherConfig(model=cfg.teacher.model, backend=args.backend, top_k=cfg.teacher.top_k,
                            dtype=cfg.teacher.dtype, gpu_memory_utilization=cfg.teacher.gpu_memory_utilization,
                            enforce_eager=cfg.teacher.enforce_eager)
    root = args.out or tempfile.mkdtemp(prefix="atkd-demo-cache-bench-")
    print(f"{'seq/shard':>9s} {'shards':>6s} | {'B/entry exact':>13s} {'u8-rel':>7s} {'ratio':>6s} | "
          f"{'B/pos exact':>11s} {'u8-rel':>7s} {'ratio':>6s} | {'smaller by':>10s}")
    for per_shard in [int(x) for x in args.shards.split(",") if x.strip()]:
        sizes = {}
        for encoding in ENCODINGS:
            url = os.path.join(root, f"cache-{per_shard}-{encoding}")
            run_capture(data, teacher, CacheConfig(path=url, sequences_per_shard=per_shard,
                                                       logprob_encoding=encoding), progress=False)
            sizes[encoding] = cache_sizes(url)
        e, u = sizes["exact"], sizes["u8-rel"]
        assert e["positions"] == u["positions"] and e["shards"] == u["shards"]
        be, bu = e["topk_bytes"] / e["entries"], u["topk_bytes"] / u["entries"]
        pe, pu = e["all_bytes"] / e["positions"], u["all_bytes"] / u["positions"]
        print(f"{per_shard:9d} {e['shards']:6d} | {be:13.3f} {bu:7.3f} {bu / be:6.2f} | {pe:11.1f} {pu:7.1f} "
              f"{pu / pe:6.2f} | {1 - pu / pe:10.0%}")
    print(f"({e['positions']:,} trained positions, k={cfg.teacher.top_k}; B/entry: the top-k arrays and their "
          "metadata per top-k entry; B/pos: the whole cache directory per trained position; 'smaller by': the "
          "whole cache, 1 - u8-rel / exact; negative = u8-rel larger)")


if __name__ == "__main__":
    main()
