"""Stage-one throughput per engine and vLLM route, for top-k, sampled and topk+sampled targets.

    python bench/teacher_bench.py                          # vocab 32k and 128k, 4-layer h512 Llama, CPU
    python bench/teacher_bench.py --vocabs 32000 --seqs 16 --repeat 1
    python bench/teacher_bench.py --engines transformers  # without vLLM (e.g. a GPU machine lacking it)

Per vocabulary (a random Llama with that head, the same body), on the same token
sequences (every position a target, like `text` data), each engine in its own
child process (vLLM in-process there, so no engine processes of its own):
- transformers: its bare forward (logits at every position, nothing kept), then
  stage one's capture loop (claim a shard, engine.score, build + write it through
  ShardWriter, as run_capture) for top-k, sampled (n draws) and topk+sampled;
- vLLM hidden route (teacher.vllm_route: hidden): bare = the pooling prefill
  (hidden states back, no head); capture for the three targets;
- vLLM logprobs route: bare = vLLM's plain prefill (one sampled token, no
  log-probs); top-k capture; sampled and topk+sampled through full-vocabulary
  prompt log-probs, a second engine, on --full-vocab-seqs sequences only (marked *).
Tokens/s counts input tokens; best of --repeat (the targets modes take turns). Each child samples its RSS every
20 ms: the table gives its peak while capturing and the growth over its RSS
before (start-up, vLLM's KV cache and the model are in the base, not the growth).
Prints one markdown table, then the goal ratios of issue 18.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGETS = ("topk", "sampled", "topk+sampled")


def build_model(out: Path, vocab: int, args) -> str:
    """A random Llama with its (tiny) tokenizer, as a hub directory; returns a label."""
    from transformers import AutoTokenizer

    from tests.support.harness import make_tiny_llama, make_tokenizer

    tok_dir = out.parent / "tokenizer"
    if not tok_dir.is_dir():
        make_tokenizer(tok_dir)
    h, layers = args.hidden, args.layers
    inter, kv = args.intermediate or 2 * h, args.kv_heads or args.heads
    make_tiny_llama(out, AutoTokenizer.from_pretrained(tok_dir), hidden=h, layers=layers, heads=args.heads,
                    head_dim=h // args.heads, vocab=vocab, init_std=0.02, max_positions=max(2048, args.seq_len + 1),
                    kv_heads=kv, intermediate=inter)
    params = (2 * vocab * h + layers * (2 * h * h + 2 * h * h * kv // args.heads + 3 * h * inter)) / 1e6
    return f"Llama {layers}L h{h} vocab {vocab:,} (~{params:,.0f}M params)"


def make_examples(n: int, length: int, vocab: int, seed: int = 0):
    import numpy as np

    from stages.data import TokenizedExample

    rng = np.random.default_rng(seed)
    return [TokenizedExample(i, rng.integers(3, vocab, size=length).tolist(), np.arange(length - 1, dtype=np.int32))
            for i in range(n)]


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def rss() -> int:
    """This process's resident memory in bytes (Linux /proc; no psutil on the GPU machine)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """This process's peak RSS while the block runs (sampled every 20 ms) and its RSS before."""

    def __enter__(self):
        self._stop = threading.Event()
        self.base = self.peak = rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def capture_fn(engine, examples, top_k: int, per_shard: int, root: str, targets: str, samples: int):
    """Stage one's loop over every shard into a fresh cache (as run_capture); returns a callable."""
    from stages.teacher.sampling import Sampler, cache_key
    from stages.teacher.shard_writer import Heartbeat, ScoredShard, ShardWriter, engine_overlaps
    from storage.cache import Cache

    identity = {"top_k": 0 if targets == "sampled" else top_k, "vocab_size": engine.vocab_size}
    if targets != "topk":
        identity.update(targets=targets, samples=samples, sampling="exact")
    sampler = Sampler(cache_key(identity), samples) if targets != "topk" else None
    plan = [{"index": i, "row_start": a, "row_end": min(a + per_shard, len(examples))}
            for i, a in enumerate(range(0, len(examples), per_shard))]

    def run():
        path = tempfile.mkdtemp(dir=root)
        cache = Cache.create_or_open(path, identity, plan)
        writer = ShardWriter(cache, identity["top_k"], on_commit=lambda s: None, on_lost=lambda s, e: None,
                             overlap=engine_overlaps(engine))
        while (lease := cache.claim_shard("bench", 600.0)) is not None:
            entry = plan[lease.shard_index]
            part = examples[entry["row_start"]:entry["row_end"]]
            rows = engine.score(part, identity["top_k"], sampler=sampler)
            writer.submit(ScoredShard(lease, Heartbeat(lease, 600.0), part, rows))
        writer.close()
        assert cache.is_complete()
        shutil.rmtree(path)
    return run


def measure(engine, examples, args, res: dict, targets=TARGETS) -> None:
    """Capture time for each targets mode (best of --repeat, the modes taking turns so that a
    busy spell of a shared machine does not land on one of them), with the peak RSS capturing."""
    tokens = sum(len(e.input_ids) for e in examples)
    with tempfile.TemporaryDirectory() as root:
        fns = {t: capture_fn(engine, examples, args.top_k, args.per_shard, root, t, args.samples) for t in targets}
        for _ in range(args.repeat):
            for t, fn in fns.items():
                with PeakRSS() as rss:
                    seconds = timed(fn, 1)
                old = res.get(t, {"seconds": float("inf"), "rss": [0, 0]})
                res[t] = {"seconds": min(seconds, old["seconds"]), "tokens": tokens,
                          "rss": max(old["rss"], [rss.peak, rss.peak - rss.base])}


def bench_child(spec: dict, args) -> dict:
    """One engine (spec["engine"]) on one model: bare + the captures. Runs in a child process."""
    examples = make_examples(args.seqs, args.seq_len, spec["vocab"])
    tokens = args.seqs * args.seq_len
    kind, model = spec["engine"], spec["model"]
    settings = dict(dtype="auto", max_seq_len=args.seq_len, max_num_seqs=args.max_num_seqs,
                    gpu_memory_utilization=args.gpu_memory_utilization, in_process=True)
    res: dict = {}
    t0 = time.perf_counter()
    if kind == "transformers":
        from stages.teacher.engine_hf import HFTeacherEngine

        engine = HFTeacherEngine(model, dtype="auto", device="auto", batch_tokens=args.batch_tokens,
                                 logprob_chunk=args.logprob_chunk)
        bare = lambda: engine.forward_only(examples)  # noqa: E731
    elif kind == "vllm-hidden":
        from stages.teacher.engine_vllm_hidden import VLLMHiddenEngine, token_pieces

        engine = VLLMHiddenEngine(model, batch_tokens=args.batch_tokens, logprob_chunk=args.logprob_chunk,
                                  **settings)
        pieces = token_pieces([len(e.input_ids) for e in examples], args.batch_tokens)
        bare = lambda: [engine.hidden_states([examples[i] for i in p]) for p in pieces]  # noqa: E731
        res["memory_note"] = engine.memory_note
    else:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from stages.teacher.engine_vllm import VLLMTeacherEngine

        engine = VLLMTeacherEngine(model, top_k=args.top_k, **settings)
        prompts = [TokensPrompt(prompt_token_ids=ex.input_ids) for ex in examples]
        plain = SamplingParams(max_tokens=1, detokenize=False, temperature=0.0)
        bare = lambda: engine.llm.generate(prompts, plain, use_tqdm=False)  # noqa: E731
    res["startup"] = time.perf_counter() - t0
    res["engine"] = engine.description
    try:
        engine.score(examples[:2], args.top_k)  # warm-up
        res["bare"] = {"seconds": timed(bare, args.repeat), "tokens": tokens}
        measure(engine, examples, args, res, TARGETS if kind != "vllm-logprobs" else ("topk",))
    finally:
        engine.close()
    if kind == "vllm-logprobs":  # full-vocabulary prompt log-probs: another engine, a few sequences
        engine = VLLMTeacherEngine(model, top_k=args.top_k, full_vocab=True, **settings)
        try:
            engine.score(examples[:1], args.top_k)
            measure(engine, examples[:args.full_vocab_seqs], args, res, ("sampled", "topk+sampled"))
        finally:
            engine.close()
    import resource

    res["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return res


def run_children(args, models: dict) -> dict:
    results = {}
    for vocab, (model_dir, _) in models.items():
        for kind in args.engines.split(","):
            spec_path = Path(model_dir).parent / f"{kind}-{vocab}.json"
            spec_path.write_text(json.dumps({"engine": kind, "model": model_dir, "vocab": vocab}))
            cmd = [sys.executable, __file__, "--child", str(spec_path)] + sys.argv[1:]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{kind} at vocab {vocab} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            results[(vocab, kind)] = json.loads(spec_path.read_text())
            print(f"  {kind}, vocab {vocab}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return results


def rate(r: dict, key: str) -> float | None:
    m = r.get(key)
    return m["tokens"] / m["seconds"] if m else None


def print_table(results: dict, args) -> None:
    mib = 1 << 20
    print(f"\n{args.seqs} x {args.seq_len} tokens (* = {args.full_vocab_seqs} x {args.seq_len}), top_k={args.top_k}, "
          f"n={args.samples} draws, {args.per_shard} sequences/shard, batch_tokens {args.batch_tokens}, "
          f"logprob_chunk {args.logprob_chunk}, best of {args.repeat}\n")
    print("| vocab | engine / route | bare tok/s | top-k capture tok/s | sampled capture tok/s "
          "| topk+sampled capture tok/s | sampled / top-k | peak RSS capturing, MiB (growth) | start-up s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for (vocab, kind), r in results.items():
        cells = []
        for key in ("bare", *TARGETS):
            v = rate(r, key)
            star = "*" if kind == "vllm-logprobs" and key in ("sampled", "topk+sampled") else ""
            cells.append(f"{v:,.0f}{star}" if v else "-")
        ratio = (rate(r, "sampled") or 0) / (rate(r, "topk") or 1)
        peak = max((r[t]["rss"] for t in TARGETS if t in r), key=lambda x: x[0])
        print(f"| {vocab:,} | {kind} | " + " | ".join(cells) + f" | {ratio:.2f}x | {peak[0] / mib:,.0f} "
              f"(+{peak[1] / mib:,.0f}) | {r['startup']:.0f} |")
    print()
    for vocab in sorted({v for v, _ in results}):
        h, lp, hf = (results.get((vocab, k), {}) for k in ("vllm-hidden", "vllm-logprobs", "transformers"))
        if h:
            print(f"vocab {vocab:,}: hidden sampled / hidden top-k {rate(h, 'sampled') / rate(h, 'topk'):.2f}x "
                  f"(goal >= 0.8); topk+sampled / top-k {rate(h, 'topk+sampled') / rate(h, 'topk'):.2f}x")
        if h and lp:
            print(f"vocab {vocab:,}: hidden top-k / logprobs top-k {rate(h, 'topk') / rate(lp, 'topk'):.2f}x "
                  f"(goal >= 1.0); hidden sampled / logprobs sampled "
                  f"{rate(h, 'sampled') / rate(lp, 'sampled'):.0f}x")
        if h and hf:
            print(f"vocab {vocab:,}: hidden top-k / transformers top-k {rate(h, 'topk') / rate(hf, 'topk'):.2f}x "
                  f"(goal >= 1.0); sampled {rate(h, 'sampled') / rate(hf, 'sampled'):.2f}x")
    for (vocab, kind), r in results.items():
        print(f"{kind}, vocab {vocab:,}: {r['engine']}; peak RSS {r['maxrss'] / mib:,.0f} MiB"
              + (f"; {r['memory_note']}" if r.get("memory_note") else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabs", default="32000,128256")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, help="default: --heads")
    p.add_argument("--intermediate", type=int, help="default: 2 x --hidden")
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--logprob-chunk", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.1,
                   help="vLLM's KV-cache fraction (on CPU: of one NUMA node's RAM)")
    p.add_argument("--full-vocab-seqs", type=int, default=2, help="sequences for vLLM's full-vocabulary requests")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--engines", default="transformers,vllm-hidden,vllm-logprobs")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one engine, results as JSON here
    args = p.parse_args()

    if args.child:
        spec = json.loads(Path(args.child).read_text())
        Path(args.child).write_text(json.dumps(bench_child(spec, args)))
        return
    work = Path(tempfile.mkdtemp(prefix="teacher_bench_"))
    try:
        models = {}
        for vocab in map(int, args.vocabs.split(",")):
            label = build_model(work / f"model-{vocab}", vocab, args)
            models[vocab] = (str(work / f"model-{vocab}"), label)
            print(f"model: {label}", file=sys.stderr, flush=True)
        results = run_children(args, models)
        print("\nmodels: " + "; ".join(label for _, label in models.values()))
        print_table(results, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
