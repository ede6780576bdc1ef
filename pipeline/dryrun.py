"""`--dry-run`: what `atkd run` / `teacher` / `student` would do, without doing any of it.

Nothing is written, no engine starts and nothing is downloaded: row counts
come from the files (jsonl: a line count), token counts from the teacher's
tokenizer on a sample of rows when it is a local directory (else an upper
bound from data.max_seq_len), parameter counts from model configs built on
torch's `meta` device (no weights).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline import orchestrator as runner
from pipeline.config import PipelineConfig, StudentConfig

SAMPLE_ROWS = 256
# Stored bytes: per top-k entry (ids + log-probs, measured 2.43 by bench/cache_bench.py),
# per position (float32 gold log-prob), per token (int32 input id).
BYTES_PER_TOPK_ENTRY, BYTES_PER_POSITION, BYTES_PER_TOKEN = 2.5, 4, 4
# cache.logprob_encoding u8-rel: 1.45 B per entry measured, plus a float32 anchor per position.
ENCODED_BYTES = {"exact": (BYTES_PER_TOPK_ENTRY, BYTES_PER_POSITION), "u8-rel": (1.5, 8)}


# Sampled targets (cache format v2): ids + counts + offsets per position with n draws,
# ~8.7 B at n=16 and ~11.7 at n=32 (bench/cache_bench.py --targets, V=32k).
def bytes_per_sampled_position(n: int) -> float:
    return 5.0 + 0.23 * n


@dataclass
class DataEstimate:
    rows: int | None
    rows_note: str
    tokens: float
    positions: float
    tokens_note: str


def plan_text(cfg: PipelineConfig, command: str, only_student: str | None = None) -> str:
    lines = [f"dry run of `atkd {command}` (nothing is run, written or downloaded); run dir {cfg.run_dir}"]
    if command in ("run", "teacher"):
        lines += finetune_lines(cfg)
        if command == "run" and not runner.needs_training_cache(cfg):
            lines.append("stage one (training data): skipped, every student trains from the rows")
        else:
            lines += teacher_lines(cfg)
    if command in ("run", "student"):
        names = [only_student] if only_student else [s.name for s in cfg.students]
        lines += student_lines(cfg, [cfg.student(n) for n in names])
    if command == "run":
        lines.append("evaluation: " + ("up to date" if not runner._eval_stale(cfg) else
                                       f"would run and write {runner.results_path(cfg)}"))
    return "\n".join(lines)


# ---------------------------------------------------------------- stage one


def finetune_lines(cfg: PipelineConfig) -> list[str]:
    """teacher.finetune: where it writes and what it would do (stage one then caches its final/)."""
    if not cfg.teacher.finetune.enabled:
        return []
    from stages.teacher.finetune import finetune_state

    out, optim = runner.finetune_dir(cfg), cfg.teacher.finetune.optim
    state = finetune_state(cfg.teacher, out)
    if state == "not started" or state.startswith("in progress"):
        steps = (f"{optim.epochs:g} epoch(s) (steps from the training rows' size)" if optim.epochs is not None
                 else f"{optim.max_steps} steps")
        state = f"{state}: would fine-tune {cfg.teacher.model} for {steps} on the training rows (plain SFT)"
    return [f"teacher fine-tune -> {out}: {state}; stage one caches {out / 'final'}"]


def teacher_lines(cfg: PipelineConfig) -> list[str]:
    cache = runner.open_cache(cfg.cache.path)
    if cache is not None:
        done = len(cache.completed_shards())
        state = "complete: stage one would only check it against the config" if done == cache.num_shards \
            else f"{done}/{cache.num_shards} shards done: stage one would write the other {cache.num_shards - done}"
        return [f"teacher cache {cfg.cache.path}: {state}"]
    est = estimate_data(cfg)
    from stages.teacher.engines import planned_engine

    cached = runner.cached_teacher(cfg)
    lines = [f"stage one: teacher {cached.model} (backend {cfg.teacher.backend}, top_k {cfg.teacher.top_k}, "
             f"targets {cfg.teacher.targets}, log-probs {cfg.cache.logprob_encoding}) "
             f"-> cache {cfg.cache.path} (not started)",
             f"  engine: {planned_engine(cached)}",
             f"  data {cfg.data.path}: {est.rows_note}"]
    if est.rows is not None and cfg.data.holdout is not None:
        from stages.split import sizes

        parts = sizes(cfg.data.holdout, est.rows)
        lines.append(f"  data.holdout: train {parts['train']:,}, validation {parts['validation']:,}, test "
                     f"{parts['test']:,} rows (the cache holds the train part)")
        est = DataEstimate(parts["train"], est.rows_note, est.tokens * parts["train"] / est.rows,
                           est.positions * parts["train"] / est.rows, est.tokens_note)
        shards = math.ceil(sum(parts.values()) / cfg.cache.sequences_per_shard)
    elif est.rows is not None:
        shards = math.ceil(est.rows / cfg.cache.sequences_per_shard)
    if est.rows is not None:
        t, encoding = cfg.teacher, cfg.cache.logprob_encoding
        top_k, samples = (0 if t.targets == "sampled" else t.top_k), (t.samples if t.targets != "topk" else 0)
        size = cache_bytes(est.tokens, est.positions, top_k, encoding, samples)
        per_entry, per_position = ENCODED_BYTES[encoding]
        lines += [f"  shards: {shards} of up to {cfg.cache.sequences_per_shard} sequences",
                  f"  tokens ~{est.tokens:,.0f}, target positions ~{est.positions:,.0f} ({est.tokens_note})",
                  f"  estimated cache size ~{_human(size)} (an estimate: "
                  + (f"{per_entry} B per top-k entry ({encoding}) + " if top_k else "")
                  + f"{per_position} B per position + {BYTES_PER_TOKEN} B per token"
                  + (f" + {bytes_per_sampled_position(samples):.1f} B per position for {samples} draws"
                     if samples else "") + ")"]
    return lines


def cache_bytes(tokens: float, positions: float, top_k: int, encoding: str = "exact", samples: int = 0) -> float:
    """Estimated stored bytes: the top-k by its log-prob encoding, the gold log-prob (and
    u8-rel's anchor) per position, the input ids, and ``samples`` draws per position if any."""
    per_entry, per_position = ENCODED_BYTES[encoding]
    sampled = positions * bytes_per_sampled_position(samples) if samples else 0.0
    return positions * top_k * per_entry + positions * per_position + tokens * BYTES_PER_TOKEN + sampled


def estimate_data(cfg: PipelineConfig) -> DataEstimate:
    rows, note = count_rows(cfg)
    if rows is None:
        return DataEstimate(None, note, 0, 0, "")
    if cfg.data.limit is not None:
        rows = min(rows, cfg.data.limit)
        note += f", data.limit {cfg.data.limit} -> {rows} used"
    per_row = _sampled_lengths(cfg)
    if per_row is None:
        bound = rows * cfg.data.max_seq_len
        return DataEstimate(rows, note, bound, bound, "upper bound: data.max_seq_len per row; the teacher's "
                                                      "tokenizer is not a local directory")
    tok, pos, n = per_row
    return DataEstimate(rows, note, tok * rows, pos * rows, f"scaled from {n} rows tokenised")


def count_rows(cfg: PipelineConfig) -> tuple[int | None, str]:
    path = cfg.data.path
    if cfg.demo.enabled and not Path(path).exists():
        return cfg.demo.train_examples, f"{cfg.demo.train_examples} rows (the demo builds them)"
    if not Path(path).exists():
        return None, "row count unknown (not a local file: a hub dataset is not downloaded by a dry run)"
    files = sorted(Path(path).iterdir()) if Path(path).is_dir() else [Path(path)]
    total = 0
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                total += sum(1 for line in fh if line.strip())
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(f).metadata.num_rows
        elif f.suffix == ".json":
            data = json.loads(f.read_text())
            total += len(data) if isinstance(data, list) else 1
    return total, f"{total:,} rows"


def _sample_rows(path: str) -> list[dict]:
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix == ".jsonl") if p.is_dir() else [p]
    rows: list[dict] = []
    for f in files:
        if f.suffix != ".jsonl":
            return []
        with open(f) as fh:
            for line in fh:
                if line.strip():
                    rows.append(json.loads(line))
                if len(rows) >= SAMPLE_ROWS:
                    return rows
    return rows


def _sampled_lengths(cfg: PipelineConfig) -> tuple[float, float, int] | None:
    """Mean tokens and targets per row of a jsonl sample, with the local teacher tokenizer."""
    model = os.path.expanduser(cfg.teacher.model)
    if not (os.path.isdir(model) and Path(cfg.data.path).exists()):
        return None
    try:
        rows = _sample_rows(cfg.data.path)
        if not rows:
            return None
        from transformers import AutoTokenizer

        from stages.data import tokenize_examples

        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=cfg.teacher.trust_remote_code)
        examples, _ = tokenize_examples(rows, tokenizer, cfg.data)
    except Exception:  # bad rows, odd tokenizer: the real run reports those; estimate from the bound
        return None
    n = len(rows)
    return (sum(len(e.input_ids) for e in examples) / n, sum(int(e.target_positions.size) for e in examples) / n, n)


# ---------------------------------------------------------------- stage two


def student_lines(cfg: PipelineConfig, students: list[StudentConfig]) -> list[str]:
    if not students:
        return ["stage two: no students in the config"]
    lines = ["stage two:"]
    for s in students:
        if runner.student_done(cfg, s.name):
            state = "done"
        else:
            source = "the training rows'" if runner.reads_rows(cfg, s) else "the cache's"
            state = (f"would train {s.optim.epochs:g} epoch(s) (steps from {source} size)"
                     if s.optim.epochs is not None else f"would train {s.optim.max_steps} steps")
        data = ", from the rows" if runner.reads_rows(cfg, s) else ""
        lines.append(f"  student {s.name} ({s.loss.kind}{data}, {describe_params(cfg, s)}): {state}")
    return lines


def describe_params(cfg: PipelineConfig, s: StudentConfig) -> str:
    source = s
    while source.init_from:
        source = cfg.student(source.init_from)
    try:
        n = count_params(cfg, source)
    except Exception as e:  # an unknown model type, a broken config: say so, do not fail the dry run
        return f"parameters unknown ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if n is None:
        return f"parameters unknown ({source.model} is not a local directory; nothing is downloaded)"
    origin = f"from student {s.init_from}, " if s.init_from else ""
    return f"{origin}{n / 1e6:,.2f}M parameters"


def count_params(cfg: PipelineConfig, s: StudentConfig) -> int | None:
    """Parameter count of the student's architecture, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    trust = bool(s.trust_remote_code)
    if s.model:
        if not os.path.isdir(os.path.expanduser(s.model)):
            return None
        config = AutoConfig.from_pretrained(s.model, trust_remote_code=trust)
    else:
        init = dict(s.init or {})
        init.setdefault("vocab_size", _teacher_vocab(cfg))
        model_type = init.pop("model_type", None)
        config = AutoConfig.for_model(model_type, **init) if model_type else LlamaConfig(**init)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    seen, total = set(), 0
    for p in model.parameters():  # tied weights once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _teacher_vocab(cfg: PipelineConfig) -> int:
    config = Path(os.path.expanduser(cfg.teacher.model)) / "config.json"
    if config.is_file():
        raw = json.loads(config.read_text())
        vocab = raw.get("vocab_size") or raw.get("text_config", {}).get("vocab_size")
        if vocab:
            return int(vocab)
    return cfg.demo.vocab_size if cfg.demo.enabled else 32000


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} B"  # pragma: no cover
