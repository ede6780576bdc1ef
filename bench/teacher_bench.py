"""Stage-one throughput: the transformers and vLLM engines side by side, and the
capture overhead (top-k + writing the shard) over a bare forward pass.

    python bench/teacher_bench.py                       # small random Llama, CPU
    python bench/teacher_bench.py --model PATH --seqs 256 --seq-len 512 --top-k 64

Per engine, on the same token sequences (every position a target, like `text` data):
- bare:    the model's forward pass alone (transformers: full logits at every
           position; vLLM: prefill with no log-probs, one sampled token);
- score:   engine.score -> top-k ids/log-probs + gold log-prob per position, called
           shard by shard like stage one (so capture/score is what writing costs);
- capture: stage one's loop: score, then build the shard (float16, checksums) and
           Cache.write_shard (zarr, atomic) on the background writer thread
           while the next shard is scored (stages/teacher/shard_writer.py);
- capture in line: the same with build + write in the scoring thread (before);
- capture overlapped anyway: the writer thread overlapping scoring even on CPU.
Tokens/s counts input tokens. vLLM runs in a child process (in-process engine
mode, which pins that process's threads). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_model(out: Path, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int | None = None,
                intermediate: int | None = None) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads or heads, head_dim=hidden // heads,
                         max_position_embeddings=2048, initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    return f"Llama {layers}L h{hidden} vocab {vocab} ({n / 1e6:.1f}M params)"


def make_examples(n: int, length: int, vocab: int, seed: int = 0):
    import numpy as np

    from stages.data import TokenizedExample

    rng = np.random.default_rng(seed)
    return [TokenizedExample(i, rng.integers(3, vocab, size=length).tolist(), np.arange(length - 1, dtype=np.int32))
            for i in range(n)]


def timed(fn, repeat: int):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def score_fn(engine, examples, top_k, per_shard):
    """engine.score shard by shard, as capture calls it (the same batches), nothing written."""
    def run():
        for a in range(0, len(examples), per_shard):
            engine.score(examples[a:a + per_shard], top_k)
    return run


def capture_fn(engine, examples, top_k, per_shard, cache_root, *, overlap: bool = True,
               force_overlap: bool = False):
    """Stage one's loop over every shard into a fresh cache; returns a callable.

    overlap=True is what run_capture does: claim a lease, score in this thread, and
    hand the shard to the background ShardWriter (build + checksum + zarr write),
    which writes while the next shard is scored when the engine is on a GPU
    (engine_overlaps; force_overlap: on CPU too). overlap=False builds and writes in line.
    """
    from stages.teacher.shard_writer import Heartbeat, ScoredShard, ShardWriter, build_shard, engine_overlaps
    from storage.cache import Cache

    def run():
        path = tempfile.mkdtemp(dir=cache_root)
        plan = [{"index": i, "row_start": a, "row_end": min(a + per_shard, len(examples))}
                for i, a in enumerate(range(0, len(examples), per_shard))]
        cache = Cache.create_or_open(path, {"top_k": top_k, "vocab_size": engine.vocab_size}, plan)
        writer = ShardWriter(cache, top_k, on_commit=lambda s: None, on_lost=lambda s, e: None,
                             overlap=engine_overlaps(engine) or force_overlap)
        while (lease := cache.claim_shard("bench", 600.0)) is not None:
            entry = plan[lease.shard_index]
            part = examples[entry["row_start"]:entry["row_end"]]
            rows = engine.score(part, top_k)
            if overlap:
                writer.submit(ScoredShard(lease, Heartbeat(lease, 600.0), part, rows))
            else:
                cache.write_shard(lease.shard_index, build_shard(part, rows, top_k), lease=lease)
        writer.close()
        assert cache.is_complete()
    return run


def bench_hf(args, model_dir, examples):
    import torch

    from stages.teacher.engine_hf import HFTeacherEngine

    engine = HFTeacherEngine(model_dir, dtype="auto", device="auto", batch_tokens=args.batch_tokens,
                             logprob_chunk=args.logprob_chunk)
    try:
        engine.score(examples[:2], args.top_k)  # warm-up
        res = {"engine": engine.description + f", {torch.get_num_threads()} threads"}
        res["bare"] = timed(lambda: engine.forward_only(examples), args.repeat)
        res["score"] = timed(score_fn(engine, examples, args.top_k, args.per_shard), args.repeat)
        with tempfile.TemporaryDirectory() as root:
            res["capture"] = timed(capture_fn(engine, examples, args.top_k, args.per_shard, root), args.repeat)
            res["capture_inline"] = timed(capture_fn(engine, examples, args.top_k, args.per_shard, root,
                                                     overlap=False), args.repeat)
            res["capture_forced"] = timed(capture_fn(engine, examples, args.top_k, args.per_shard, root,
                                                     force_overlap=True), args.repeat)
    finally:
        engine.close()
    return res


def bench_vllm_child(args, model_dir, examples):
    """Runs inside the child process."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from stages.teacher.engine_vllm import VLLMTeacherEngine

    t0 = time.perf_counter()
    engine = VLLMTeacherEngine(model_dir, top_k=args.top_k, dtype="auto", max_seq_len=args.seq_len,
                               max_num_seqs=args.max_num_seqs, gpu_memory_utilization=0.85, in_process=True)
    res = {"engine": engine.description, "startup": time.perf_counter() - t0}
    try:
        engine.score(examples[:2], args.top_k)  # warm-up
        prompts = [TokensPrompt(prompt_token_ids=ex.input_ids) for ex in examples]
        bare = SamplingParams(max_tokens=1, detokenize=False, temperature=0.0)
        res["bare"] = timed(lambda: engine.llm.generate(prompts, bare, use_tqdm=False), args.repeat)
        res["score"] = timed(score_fn(engine, examples, args.top_k, args.per_shard), args.repeat)
        engine._flat = False
        engine._sampling = engine._sampling_params(args.top_k)
        res["score_dicts"] = timed(lambda: engine.score(examples, args.top_k), args.repeat)
        engine._flat = True
        engine._sampling = engine._sampling_params(args.top_k)
        with tempfile.TemporaryDirectory() as root:
            res["capture"] = timed(capture_fn(engine, examples, args.top_k, args.per_shard, root), args.repeat)
            res["capture_inline"] = timed(capture_fn(engine, examples, args.top_k, args.per_shard, root,
                                                     overlap=False), args.repeat)
            res["capture_forced"] = timed(capture_fn(engine, examples, args.top_k, args.per_shard, root,
                                                     force_overlap=True), args.repeat)
    finally:
        engine.close()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: build a small random Llama)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, help="default: --heads")
    p.add_argument("--intermediate", type=int, help="default: 3 x --hidden")
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--logprob-chunk", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--engines", default="transformers,vllm")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run the vLLM part, write JSON here
    args = p.parse_args()

    if args.child:
        spec = json.loads(Path(args.child).read_text())
        res = bench_vllm_child(args, spec["model"], make_examples(args.seqs, args.seq_len, spec["vocab"]))
        Path(args.child).write_text(json.dumps(res))
        return

    work = Path(tempfile.mkdtemp(prefix="teacher_bench_"))
    if args.model:
        model_dir, label = args.model, args.model
        vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    else:
        model_dir, vocab = str(work / "model"), args.vocab
        label = build_model(work / "model", args.vocab, args.hidden, args.layers, args.heads, args.kv_heads,
                            args.intermediate)
    examples = make_examples(args.seqs, args.seq_len, vocab)
    n_tokens = args.seqs * args.seq_len
    results = {}
    if "transformers" in args.engines:
        results["transformers"] = bench_hf(args, model_dir, examples)
    if "vllm" in args.engines:
        spec = work / "vllm.json"
        spec.write_text(json.dumps({"model": model_dir, "vocab": vocab}))
        cmd = [sys.executable, __file__, "--child", str(spec)] + [a for a in sys.argv[1:]]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
        else:
            results["vllm"] = json.loads(spec.read_text())
    print(f"\nmodel: {label}; {args.seqs} x {args.seq_len} tokens, top_k={args.top_k}, "
          f"{args.per_shard} sequences/shard, best of {args.repeat}\n")
    print("| engine | bare fwd tok/s | score tok/s | capture tok/s | capture in line tok/s "
          "| capture overlapped anyway tok/s | capture/score throughput | capture/bare throughput |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        bare, score, cap, inline, forced = (n_tokens / r[key] for key in
                                            ("bare", "score", "capture", "capture_inline", "capture_forced"))
        print(f"| {name} | {bare:,.0f} | {score:,.0f} | {cap:,.0f} | {inline:,.0f} | {forced:,.0f} "
              f"| {cap / score:.2f}x | {cap / bare:.2f}x |")
    if "transformers" in results and "vllm" in results:
        h, v = results["transformers"], results["vllm"]
        print(f"\nvLLM / transformers capture throughput: {h['capture'] / v['capture']:.2f}x")
        print(f"vLLM score, flat results vs list-of-dicts: {v['score_dicts'] / v['score']:.2f}x faster")
        print(f"vLLM start-up: {v['startup']:.1f} s (in-process)")
    for name, r in results.items():
        print(f"{name}: {r['engine']}")


if __name__ == "__main__":
    main()
