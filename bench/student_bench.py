"""Cost of one student step: ATKD from the cache vs plain fine-tuning vs online KD.

    python bench/student_bench.py [--steps 5] [--threads 1] [--json out.json] [--vocab 32000 ...]

Every variant trains the same randomly initialised Llama student on the same
batch (B sequences of L tokens, the last 3/4 of each trained, as in instruction
data) with AdamW:

- `ce_hf`      plain cross-entropy fine-tuning: `model(input_ids, labels=...)`
               (transformers computes [B, L, V] logits) - the baseline;
- `sft_chunk`  the trainer's cross-entropy path (chunked LM head, targets only);
- `kd_cache`   forward-KL KD on the cached top-k teacher (trainer path);
- `atkd_cache` ATKD on the cached top-k teacher (trainer path);
- `online_kd`  KD with the teacher in the same process: teacher forward plus
               full-vocabulary KL (the cost stage one removes).

Time: all variants in one process, each with its own student copy, stepped in
turn (so load from other jobs on a shared machine hits them alike); min and
median over `--steps` optimiser steps after 2 warm-up steps (the first
allocates AdamW's state). Memory (CPU): each variant alone in a subprocess
with glibc told to serve big buffers by mmap (MALLOC_MMAP_THRESHOLD_) and
trimmed, so RSS follows live memory; the kernel's peak RSS (VmHWM) is reset
through /proc/self/clear_refs after warm-up; "step peak" is VmHWM over 2 steps
minus VmRSS just before them (what a step adds on top of weights, optimiser
state and batch), "process peak" the absolute VmHWM (teacher included for
online_kd). On GPU: torch.cuda.max_memory_allocated minus memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("ce_hf", "sft_chunk", "kd_cache", "atkd_cache", "online_kd")


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _make_batch(args, torch):
    """One collated batch (storage.dataset.collate_sequences layout) with a random sparse teacher."""
    g = torch.Generator().manual_seed(0)
    B, L, V, k = args.batch, args.seq_len, args.vocab, args.top_k
    input_ids = torch.randint(0, V, (B, L), generator=g)
    start = L // 4
    row_batch = torch.arange(B).repeat_interleave(L - 1 - start)
    row_pos = torch.arange(start, L - 1).repeat(B)
    target_ids = input_ids[row_batch, row_pos + 1]
    teacher = (3.0 * torch.randn(len(row_batch), V, generator=g)).log_softmax(-1)
    topk_lp, topk_ids = teacher.topk(k)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "row_batch": row_batch,
            "row_pos": row_pos, "target_ids": target_ids, "topk_ids": topk_ids, "topk_logprobs": topk_lp,
            "target_logprobs": teacher.gather(1, target_ids[:, None])[:, 0], "group_ids": row_batch.clone()}


def _llama(torch, args, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                        num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                        num_key_value_heads=hidden // 64, head_dim=64,
                                        max_position_embeddings=args.seq_len))


def setup_variant(variant: str, args, torch, device, batch, teacher=None):
    """A fresh student + AdamW for `variant`; returns step() -> loss."""
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from pipeline.config import LossConfig
    from stages.student.objective import StudentObjective

    student = _llama(torch, args, args.hidden, args.layers, seed=0).to(device).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, foreach=False)
    P = len(batch["row_batch"])
    if variant == "ce_hf":
        labels = torch.full_like(batch["input_ids"], -100)
        labels[batch["row_batch"], batch["row_pos"] + 1] = batch["target_ids"]

        def loss_fn():
            return student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    elif variant == "online_kd":
        def loss_fn():
            with torch.no_grad():
                t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                t_lp = t_logits[batch["row_batch"], batch["row_pos"]].float().log_softmax(-1)
            s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s_lp = s_logits[batch["row_batch"], batch["row_pos"]].float().log_softmax(-1)
            return F.kl_div(s_lp, t_lp, log_target=True, reduction="sum") / P
    else:
        kind = {"sft_chunk": "sft", "kd_cache": "kd", "atkd_cache": "atkd"}[variant]
        objective = StudentObjective(student, LossConfig(kind=kind, chunk_size=args.chunk_size))
        denominator = objective.normaliser(batch)

        def loss_fn():
            total, _ = objective(batch)
            return total / denominator

    def step() -> float:
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def _common(args):
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = {k: v.to(device) for k, v in _make_batch(args, torch).items()}
    return torch, device, batch


def _teacher(args, torch, device):
    teacher = _llama(torch, args, args.teacher_hidden, args.teacher_layers, seed=1).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def time_variants(args) -> dict:
    """All variants in one process, interleaved step by step, so a machine whose load
    changes (other jobs) slows every variant alike."""
    torch, device, batch = _common(args)
    teacher = _teacher(args, torch, device)
    steps = {v: setup_variant(v, args, torch, device, batch, teacher) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(args.steps + 2):
        for v, step in steps.items():
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep >= 2:  # the first steps allocate AdamW's state
                times[v].append(time.perf_counter() - t0)
    return {v: {"min_s": min(t), "median_s": statistics.median(t), "device": str(device),
                "positions": len(batch["row_batch"])} for v, t in times.items()}


def memory_variant(args) -> dict:
    """One variant alone in this process: peak memory a step adds on top of the set-up."""
    torch, device, batch = _common(args)
    teacher = _teacher(args, torch, device) if args.variant == "online_kd" else None
    step = setup_variant(args.variant, args, torch, device, batch, teacher)
    for _ in range(2):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS = live memory
        base = _proc_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(2):
        step()
    peak = torch.cuda.max_memory_allocated() if cuda else _proc_kib("VmHWM") * 1024
    return {"step_peak_mib": (peak - base) / 2**20, "process_peak_mib": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--teacher-hidden", type=int, default=768)
    ap.add_argument("--teacher-layers", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=64)
    sys.path.insert(0, str(REPO))
    from pipeline.config import LossConfig

    ap.add_argument("--chunk-size", type=int, default=LossConfig().chunk_size, help="default: loss.chunk_size's")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--mode", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode == "time":
        print("RESULT " + json.dumps(time_variants(args)))
        return
    if args.mode == "memory":
        print("RESULT " + json.dumps(memory_variant(args)))
        return

    passthrough = [a for a in sys.argv[1:]]
    if args.json:
        i = passthrough.index("--json") if "--json" in passthrough else None
        passthrough = passthrough[:i] + passthrough[i + 2:] if i is not None else \
            [a for a in passthrough if not a.startswith("--json")]
    # Big buffers through mmap, returned to the OS when freed: RSS then follows live memory.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads),
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

    def child(*extra) -> dict:
        proc = subprocess.run([sys.executable, __file__, *extra, *passthrough], capture_output=True, text=True,
                              env=env, cwd=REPO)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(line[0][len("RESULT "):])

    results = child("--mode", "time")
    for variant in VARIANTS:
        results[variant].update(child("--mode", "memory", "--variant", variant))
        print(f"  {variant}: {results[variant]['min_s']:.3f} s, {results[variant]['step_peak_mib']:.0f} MiB",
              file=sys.stderr)

    base = results["ce_hf"]
    print(f"student: Llama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}; batch {args.batch} x "
          f"{args.seq_len} tokens ({base['positions']} trained positions); top-k {args.top_k}; chunk "
          f"{args.chunk_size}; teacher (online_kd) hidden {args.teacher_hidden} x {args.teacher_layers} layers; "
          f"{args.threads} threads on {base['device']}\n")
    print("| variant | step min (s) | step median (s) | time / ce_hf | step peak (MiB) | step peak / ce_hf "
          "| process peak (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['min_s']:.3f} | {r['median_s']:.3f} | {r['min_s'] / base['min_s']:.2f} | "
              f"{r['step_peak_mib']:.0f} | {r['step_peak_mib'] / max(base['step_peak_mib'], 1e-9):.2f} | "
              f"{r['process_peak_mib']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
