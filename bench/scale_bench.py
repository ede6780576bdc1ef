"""Stage one at scale: a worker's time to its first shard and its peak memory vs the dataset size.

    python bench/scale_bench.py                      # 20k, 200k and 1M rows
    python bench/scale_bench.py --rows 20000,200000

For each size it writes a synthetic prompt/response jsonl (~290 bytes a row),
runs the real CLI (`python -m pipeline teacher cfg.yaml`, transformers engine,
a tiny random Llama, 1,000 rows per shard) as a subprocess, waits until the
first shard is committed, reads the worker's peak resident memory (VmHWM) at
that moment, and stops it. Goal (issue "stage one at real scale"): 10x the
rows costs <= 1.5x the time to the first shard and <= 1.3x the peak memory.
Sizes run one after another on the same machine; ratios are against the
smallest size. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_WORDS = "alpha beta gamma delta one two three red green blue cat dog runs sees big small".split()


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            prompt = f"what is {i} plus {rng.randint(0, 999)} and why " + " ".join(rng.choices(_WORDS, k=8))
            f.write(json.dumps({"prompt": prompt, "response": " ".join(rng.choices(_WORDS, k=30))}) + "\n")


def build_teacher(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.demo.tokenizer import build_demo_tokenizer

    texts = [" ".join(random.Random(i).choices(_WORDS, k=20)) + f" {i}" for i in range(2000)]
    tok = build_demo_tokenizer(texts, 512, out)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def first_shard(work: Path, rows: int, teacher: Path, timeout: float, repo: Path = REPO) -> dict:
    data = work / f"rows-{rows}.jsonl"
    write_rows(data, rows)
    run_dir = work / f"run-{rows}"
    cfg = {"run_dir": str(run_dir),
           "data": {"path": str(data), "max_seq_len": 128},
           "teacher": {"model": str(teacher), "backend": "transformers", "top_k": 8, "dtype": "float32",
                       "device": "cpu"},
           "cache": {"path": str(run_dir / "cache"), "sequences_per_shard": 1000}}
    cfg_path = work / f"cfg-{rows}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(repo), "TOKENIZERS_PARALLELISM": "false"}
    shards = run_dir / "cache" / "shards"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "teacher", str(cfg_path)], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (shards.is_dir() and any(p.suffix == ".zarr" for p in shards.iterdir())):
            if proc.poll() is not None:
                raise RuntimeError(f"teacher exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"no shard after {timeout} s")
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return {"rows": rows, "mb": data.stat().st_size / 1e6, "seconds": seconds, "rss_mb": rss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="20000,200000,1000000")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--repo", type=Path, default=REPO,
                   help="the atkd checkout whose CLI runs (e.g. a worktree of an older commit, for a before/after)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scale_bench_"))
    build_teacher(work / "teacher")
    first_shard(work, 2000, work / "teacher", args.timeout, args.repo)  # warm the page cache and imports
    results = [first_shard(work, int(n), work / "teacher", args.timeout, args.repo) for n in args.rows.split(",")]
    base = results[0]
    print(f"\n{args.repo}: stage one, time to the first committed shard and the worker's peak RSS then "
          f"(transformers engine, tiny Llama, 1,000 rows/shard, {os.cpu_count()} CPUs)\n")
    print("| rows | jsonl MB | time to first shard s | peak RSS MiB | time vs smallest | RSS vs smallest |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['mb']:.0f} | {r['seconds']:.2f} | {r['rss_mb']:.0f} | "
              f"{r['seconds'] / base['seconds']:.2f}x | {r['rss_mb'] / base['rss_mb']:.2f}x |")


if __name__ == "__main__":
    main()
