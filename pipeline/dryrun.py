"""`--dry-run`: what `atkd run` / `teacher` / `student` would do, without doing any of it.

Nothing is written, no engine starts and nothing is downloaded: row counts
come from one indexing pass over local data, token counts from the teacher's
tokenizer on the first rows when it is a local directory (else an upper
bound from data.max_seq_len), parameter counts from model configs built on
torch's `meta` device (no weights).

It also looks for what the run would stop at, and prints each as a PROBLEM
line (the command then exits 1): a missing data file or model directory,
teacher.top_k above the vocabulary, rows that would not tokenise (a missing
field) or would all be dropped, an existing cache or teacher fine-tune of
another config (with the differing keys), a stale student
(pipeline.student_record) and evaluation rows that are training rows.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline import orchestrator as runner
from pipeline.config import PipelineConfig, StudentConfig
from pipeline.evaluation import check_overlap, eval_stale
from stages import data as data_mod
from storage.errors import AtkdError

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


class Plan:
    """The dry run's lines, and the problems the real run would stop at (printed as PROBLEM lines)."""

    def __init__(self, header: str) -> None:
        self.lines, self.problems = [header], []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.lines.append("  PROBLEM: " + text.replace("\n", "\n    "))

    def text(self) -> str:
        return "\n".join(self.lines)


def plan(cfg: PipelineConfig, command: str, only_student: str | None = None,
         retrain: list[str] | None = None) -> tuple[str, list[str]]:
    """(the plan's text, the problems found): what `atkd <command>` would do (module doc); `retrain`:
    the command's --retrain names."""
    out = Plan(f"dry run of `atkd {command}` (nothing is run, written or downloaded); run dir {cfg.run_dir}")
    if command in ("run", "teacher"):
        finetune_lines(cfg, out)
        if command == "run" and not runner.needs_training_cache(cfg):
            out.add("stage one (training data): skipped, every student trains from the rows")
        else:
            teacher_lines(cfg, out)
        if command == "run":
            validation_lines(cfg, out)
    if command in ("run", "student"):
        names = [only_student] if only_student else [s.name for s in cfg.students]
        student_lines(cfg, [cfg.student(n) for n in names], out, retrain or [])
    if command == "run":
        out.add("evaluation: " + ("up to date" if not _quietly(out, lambda: eval_stale(cfg), True) else
                                  f"would run and write {runner.results_path(cfg)}"))
    local = (cfg.data.path, cfg.eval.path, cfg.eval.validation_path, *(s.path for s in cfg.eval.sets.values()))
    if all(Path(p).exists() for p in local if p):
        overlap = _quietly(out, lambda: check_overlap(cfg, record=False))  # local data only: nothing downloads
        if overlap:
            out.problem(overlap)
    return out.text(), out.problems


def _quietly(out: Plan, fn, default=None):
    """fn(), or `default` with its error as a problem: a dry run reports what it can, it never stops."""
    try:
        return fn()
    except AtkdError as e:
        out.problem(str(e))
        return default


# ---------------------------------------------------------------- stage one


def finetune_lines(cfg: PipelineConfig, out: Plan) -> None:
    """teacher.finetune: where it writes and what it would do (stage one then caches its final/)."""
    if not cfg.teacher.finetune.enabled:
        return
    from stages.teacher.finetune import finetune_state

    where, optim = runner.finetune_dir(cfg), cfg.teacher.finetune.optim
    state = finetune_state(cfg.teacher, where)
    if state == "not started" or state.startswith("in progress"):
        steps = (f"{optim.epochs:g} epoch(s) (steps from the training rows' size)" if optim.epochs is not None
                 else f"{optim.max_steps} steps")
        state = f"{state}: would fine-tune {cfg.teacher.model} for {steps} on the training rows (plain SFT)"
    out.add(f"teacher fine-tune -> {where}: {state}; stage one caches {where / 'final'}")
    if "would be refused" in state:
        out.problem(f"the finished teacher fine-tune in {where} was made with other settings: delete it to "
                    "fine-tune again (and rebuild its cache), or set them back")


def _what(cfg: PipelineConfig) -> str:
    what = runner.describe_targets(cfg.teacher)
    return what + (" (no top-k: teacher.top_k is not used)" if cfg.teacher.targets == "sampled" else "")


def _model_problem(model: str, key: str) -> str | None:
    """A local-looking model path that is not a model directory (a hub name is not checked: nothing
    is downloaded or probed)."""
    from stages.teacher.identity import looks_local

    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"{key} {model!r}: no config.json in that directory"
    return f"{key} {model!r}: no such directory" if looks_local(model) else None


def _teacher_checks(cfg: PipelineConfig, out: Plan) -> bool:
    """teacher.model and teacher.top_k against what is on disk; False when the teacher is missing."""
    if cfg.demo.enabled and not Path(cfg.teacher.model).exists():
        return True  # the demo builds it
    problem = _model_problem(cfg.teacher.model, "teacher.model")
    if problem:
        out.problem(problem)
        return False
    vocab = _config_vocab(cfg.teacher.model)
    if vocab and cfg.teacher.targets != "sampled" and cfg.teacher.top_k > vocab:
        out.problem(f"teacher.top_k={cfg.teacher.top_k} exceeds the vocabulary of teacher.model "
                    f"{cfg.teacher.model!r} ({vocab} tokens); set teacher.top_k to at most {vocab}")
    return True


def teacher_lines(cfg: PipelineConfig, out: Plan) -> None:
    cache = runner.open_cache(cfg.cache.path)
    if cache is not None:
        _teacher_checks(cfg, out)
        _existing_cache(cfg, "teacher", cfg.data, runner.cached_teacher(cfg), cfg.cache, cache, out)
        return
    out.add(f"stage one: teacher {runner.cached_teacher(cfg).model} (backend {cfg.teacher.backend}, {_what(cfg)}, "
            f"log-probs {cfg.cache.logprob_encoding}) -> cache {cfg.cache.path} (not started)")
    teacher_ok = _teacher_checks(cfg, out)
    if teacher_ok:
        from stages.teacher.engines import planned_engine

        out.add(f"  engine: {planned_engine(runner.cached_teacher(cfg))}")
    est = estimate_data(cfg, out, teacher_ok)
    out.add(f"  data {cfg.data.path}: {est.rows_note}")
    if est.rows is not None and cfg.data.holdout is not None:
        from stages.split import sizes

        parts = sizes(cfg.data.holdout, est.rows)
        out.add(f"  data.holdout: train {parts['train']:,}, validation {parts['validation']:,}, test "
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
        out.add(f"  shards: {shards} of up to {cfg.cache.sequences_per_shard} sequences",
                f"  tokens ~{est.tokens:,.0f}, target positions ~{est.positions:,.0f} ({est.tokens_note})",
                f"  estimated cache size ~{_human(size)} (an estimate: "
                + (f"{per_entry} B per top-k entry ({encoding}) + " if top_k else "")
                + f"{per_position} B per position + {BYTES_PER_TOKEN} B per token"
                + (f" + {bytes_per_sampled_position(samples):.1f} B per position for {samples} draws"
                   if samples else "") + ")")


def _existing_cache(cfg: PipelineConfig, label: str, data_cfg, teacher_cfg, cache_cfg, cache, out: Plan) -> None:
    """An existing cache: how far it is, and whether stage one would accept it (the key diff if not)."""
    from stages.teacher.capture import check_cache
    from storage.errors import CacheMismatchError

    done = len(cache.completed_shards())
    state = ("complete" if done == cache.num_shards
             else f"{done}/{cache.num_shards} shards done: stage one would write the other {cache.num_shards - done}")
    out.add(f"{label} cache {cache_cfg.path}: {state}")
    try:
        check_cache(data_cfg, teacher_cfg, cache_cfg)
    except CacheMismatchError as e:
        out.problem(f"stage one would refuse the {label} cache: {e}")
    except AtkdError as e:  # e.g. the fine-tuned teacher it must match is not trained yet
        out.add(f"  not checked against the config: {e}")
    else:
        out.add("  it matches the config")


def validation_lines(cfg: PipelineConfig, out: Plan) -> None:
    job = runner.validation_job(cfg)
    if job is None:
        return
    _, data_cfg, cache_cfg = job
    cache = runner.open_cache(cache_cfg.path)
    if cache is None:
        what = cfg.eval.validation_path or f"the validation part of {cfg.data.path}"
        out.add(f"stage one (validation data): {what} -> {cache_cfg.path} (not started)")
    else:
        _existing_cache(cfg, "validation", data_cfg, runner.validation_teacher(cfg), cache_cfg, cache, out)


def cache_bytes(tokens: float, positions: float, top_k: int, encoding: str = "exact", samples: int = 0) -> float:
    """Estimated stored bytes: the top-k by its log-prob encoding, the gold log-prob (and
    u8-rel's anchor) per position, the input ids, and ``samples`` draws per position if any."""
    per_entry, per_position = ENCODED_BYTES[encoding]
    sampled = positions * bytes_per_sampled_position(samples) if samples else 0.0
    return positions * top_k * per_entry + positions * per_position + tokens * BYTES_PER_TOKEN + sampled


def estimate_data(cfg: PipelineConfig, out: Plan, teacher_ok: bool = True) -> DataEstimate:
    rows, note = count_rows(cfg, out)
    if rows is None:
        return DataEstimate(None, note, 0, 0, "")
    if cfg.data.limit is not None:
        rows = min(rows, cfg.data.limit)
        note += f", data.limit {cfg.data.limit} -> {rows} used"
    per_row, why = _sampled_lengths(cfg, out) if teacher_ok else (None, "teacher.model is missing")
    if per_row is None:
        bound = rows * cfg.data.max_seq_len
        return DataEstimate(rows, note, bound, bound, f"upper bound: data.max_seq_len per row; {why}")
    tok, pos, n = per_row
    return DataEstimate(rows, note, tok * rows, pos * rows, f"scaled from {n} rows tokenised")


def count_rows(cfg: PipelineConfig, out: Plan) -> tuple[int | None, str]:
    """The data's row count (one indexing pass of a local source); a missing file is a problem."""
    from stages.rows import resolve_format
    from stages.teacher.identity import looks_local

    path = cfg.data.path
    if cfg.demo.enabled and not Path(path).exists():
        return cfg.demo.train_examples, f"{cfg.demo.train_examples} rows (the demo builds them)"
    try:
        fmt = resolve_format(path, cfg.data.format)
    except AtkdError as e:
        out.problem(str(e))
        return None, "row count unknown (see the problem above)"
    if fmt == "hub":
        if looks_local(path):
            out.problem(f"data.path {path!r}: no such file or directory; check data.path")
            return None, "row count unknown (see the problem above)"
        return None, "row count unknown (a hub dataset: a dry run downloads nothing)"
    source = _quietly(out, lambda: data_mod.open_source(cfg.data))
    if source is None:
        return None, "row count unknown (see the problem above)"
    return source.num_rows, f"{source.num_rows:,} rows"


def _sampled_lengths(cfg: PipelineConfig, out: Plan) -> tuple[tuple[float, float, int] | None, str]:
    """(mean tokens and targets per row of the first SAMPLE_ROWS rows, tokenised with the teacher's
    tokenizer, or None; why not). Rows the run would stop at (a missing field, every row over-long)
    are a problem."""
    from stages.errors import ModelError
    from stages.rows import DataError

    model = os.path.expanduser(cfg.teacher.model)
    if not os.path.isdir(model):
        return None, "the teacher's tokenizer is not a local directory"
    if not Path(cfg.data.path).exists():
        return None, "the data is not a local file"
    try:
        source = data_mod.open_source(cfg.data)
        rows = source.read(0, min(source.num_rows, SAMPLE_ROWS))
        if not rows:
            return None, "no rows"
        from stages.teacher.identity import load_tokenizer

        tokenizer = load_tokenizer(model, cfg.teacher.trust_remote_code)
        examples, stats = data_mod.tokenize_rows(rows, tokenizer, cfg.data, locate=source.location)
        data_mod.check_dropped(stats, cfg.data, f"the first {len(rows)} rows")
    except (DataError, ModelError) as e:
        out.problem(str(e))
        return None, "the rows could not be tokenised (see the problem)"
    n = len(rows)
    return (sum(len(e.input_ids) for e in examples) / n, sum(int(e.target_positions.size) for e in examples) / n,
            n), ""


# ---------------------------------------------------------------- stage two


def student_lines(cfg: PipelineConfig, students: list[StudentConfig], out: Plan, retrain: list[str]) -> None:
    if not students:
        out.add("stage two: no students in the config")
        return
    from pipeline.student_record import retrain_set, student_states

    states = _quietly(out, lambda: student_states(cfg), {})
    again = _quietly(out, lambda: retrain_set(cfg, retrain), set())
    out.add("stage two:")
    for s in students:
        state = states.get(s.name)
        if s.name in again:
            text = "would be trained anew (--retrain" + (f"; it is stale: {'; '.join(state.why)})"
                                                       if state is not None and state.kind == "stale" else ")")
        elif state is not None and state.kind in ("done", "unchecked", "stale", "continues"):
            text = state.text()
        else:
            source = "the training rows'" if runner.reads_rows(cfg, s) else "the cache's"
            text = (f"would train {s.optim.epochs:g} epoch(s) (steps from {source} size)"
                    if s.optim.epochs is not None else f"would train {s.optim.max_steps} steps")
            if state is not None and state.kind == "in progress":
                text += f", continuing from {state.checkpoint}"
            if s.rounds:
                text = f"would train {len(s.rounds)} round(s), {sum(r.steps for r in s.rounds)} steps in all"
        data = ", from the rows" if runner.reads_rows(cfg, s) else ""
        out.add(f"  student {s.name} ({s.loss.kind}{data}, {describe_params(cfg, s)}): {text}")
        if s.rounds:
            from pipeline.rounds import rounds_lines

            for line in _quietly(out, lambda s=s: rounds_lines(cfg, s), []):
                out.add("  " + line)
        if state is not None and state.kind == "stale" and s.name not in again:
            out.problem(f"student {s.name!r} is stale: the run would refuse it until retrained "
                        f"(--retrain {s.name})")
        key = runner.student_key(cfg, s.name)
        for attr in ("model", "tokenizer"):
            problem = _model_problem(getattr(s, attr), f"{key}.{attr}") if getattr(s, attr) else None
            if problem:
                out.problem(problem)


def describe_params(cfg: PipelineConfig, s: StudentConfig) -> str:
    source = s
    while source.init_from:
        source = cfg.student(source.init_from)
    if source.init is not None and not (source.init or {}).get("vocab_size") and _teacher_vocab(cfg) is None:
        return "parameters unknown (its vocabulary is the teacher's, and teacher.model is not a local model)"
    try:
        n = count_params(cfg, source)
    except Exception as e:  # an unknown model type, a broken config: say so, do not fail the dry run
        return f"parameters unknown ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if n is None:
        from stages.teacher.identity import looks_local

        return ("parameters unknown (its model directory is missing)" if looks_local(source.model)
                else f"parameters unknown ({source.model} is a hub name: a dry run downloads nothing)")
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


def _config_vocab(model: str) -> int | None:
    """vocab_size from a local model directory's config.json (None when there is none)."""
    config = Path(os.path.expanduser(model)) / "config.json"
    if config.is_file():
        raw = json.loads(config.read_text())
        vocab = raw.get("vocab_size") or raw.get("text_config", {}).get("vocab_size")
        if vocab:
            return int(vocab)
    return None


def _teacher_vocab(cfg: PipelineConfig) -> int | None:
    """The vocabulary an `init` student gets: the teacher's (the demo's before it is built)."""
    vocab = _config_vocab(cfg.teacher.model)
    if vocab is None and cfg.demo.enabled:
        return cfg.demo.vocab_size
    return vocab


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} B"  # pragma: no cover
