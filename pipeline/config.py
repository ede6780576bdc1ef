"""Typed configuration for the whole pipeline, loaded from `pipeline.yaml`.

Every section is a dataclass; `load_config` walks the YAML tree against the
dataclass fields so an unknown key or a wrong type fails at load time with the
key's full path (`students[1].optim.lr: expected a number, got 'fast'`).
Command-line overrides use `a.b=c` (the value is parsed as YAML) and address
students by name or index: `students.atkd.optim.lr=3e-4`, `students.0.loss=kd`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from storage.files import atomic_write


class ConfigError(ValueError):
    """A problem with pipeline.yaml or an override; the message names the key path."""


@dataclass
class DataConfig:
    """Where the training data is and how rows become token sequences."""

    path: str = ""  # a .jsonl/.json/.parquet file, a directory of them, or a hub name
    format: Literal["auto", "jsonl", "json", "parquet", "hub"] = "auto"
    split: str = "train"
    kind: Literal["prompt_response", "messages", "text"] = "prompt_response"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    text_field: str = "text"
    # The prompt template; `{prompt}` is replaced by the row's prompt. The
    # response follows it directly and is closed by the tokenizer's EOS.
    template: str = "### Instruction:\n{prompt}\n\n### Response:\n"
    max_seq_len: int = 512
    overlong: Literal["truncate", "skip"] = "truncate"
    bad_rows: Literal["error", "skip"] = "error"
    # Stage one fails when a shard drops (skips as over-long or bad) a larger share of its rows.
    max_dropped_fraction: float = 0.1
    limit: Optional[int] = None  # use only the first N rows (quick runs)


@dataclass
class TeacherConfig:
    model: str = ""  # path or hub name of the teacher
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    top_k: int = 64
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # transformers engine: auto | cpu | cuda | cuda:N
    batch_tokens: int = 16384  # transformers engine: tokens per forward pass
    logprob_chunk: int = 2048  # transformers engine: positions per log-softmax chunk
    tensor_parallel_size: int = 1  # vLLM
    pipeline_parallel_size: int = 1  # vLLM
    gpu_memory_utilization: float = 0.85  # vLLM; on CPU: fraction of RAM for KV cache
    max_num_seqs: int = 256  # vLLM scheduler batch size
    enforce_eager: bool = False  # vLLM: skip CUDA graph capture
    trust_remote_code: bool = False
    # Worker processes `atkd teacher` starts on this node, each on its own GPUs; "auto": one
    # per group of tensor_parallel_size x pipeline_parallel_size visible GPUs.
    num_workers: Union[int, Literal["auto"]] = 1
    worker_id: str = ""  # default: host-pid
    lease_seconds: float = 120.0  # a dead worker's shard is taken over after this (renewed every 1/4)


@dataclass
class CacheConfig:
    path: str = ""  # local/NFS path or fsspec URL (s3://, memory://); default <run_dir>/cache
    sequences_per_shard: int = 1024


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 10
    max_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1
    clip_grad_norm: float = 1.0


@dataclass
class LossConfig:
    kind: Literal["sft", "kd", "atkd"] = "atkd"
    divergence: Literal["forward_kl", "reverse_kl", "tvd", "js", "skew_kl", "skew_rkl"] = "forward_kl"
    base: Literal["forward_kl", "reverse_kl"] = "forward_kl"  # atkd only
    easy_weight: float = 0.2
    hard_ratio: float = 0.5
    group: Literal["sequence", "batch"] = "sequence"  # atkd split group
    ce_weight: float = 0.0  # mix of cross-entropy on the gold tokens
    renormalize_topk: bool = False
    beta: float = 0.5  # js
    alpha: float = 0.1  # skew_kl / skew_rkl
    # Positions per LM-head chunk: peak memory ~ chunk_size x vocab x a few float32
    # temporaries. 256 kept an ATKD step within 0.73x the memory of plain
    # fine-tuning at vocab 32k (bench/student_bench.py); use ~128 for 150k vocabularies.
    chunk_size: int = 256


@dataclass
class StudentConfig:
    name: str = ""
    model: str = ""  # path/hub name of a pretrained student ...
    init: Optional[dict[str, Any]] = None  # ... or a transformers config dict to initialise from
    # Start from another student's final model (trained first, same run): the
    # usual "SFT, then distil" recipe; MiniLLM/DistiLLM-style students start SFT'd.
    init_from: str = ""
    tokenizer: str = ""  # default: the student's own (model) or the teacher's (init)
    trust_remote_code: bool = False
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on GPU
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    num_workers: int = 0  # DataLoader workers
    fsdp: bool = False


@dataclass
class EvalConfig:
    path: str = ""  # held-out data (same fields as `data`); empty: skip generation metrics
    split: str = "test"
    validation_path: str = ""  # data to cache for KL / top-1 agreement; empty: use a slice of `path`
    max_examples: int = 200
    max_new_tokens: int = 64
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    batch_size: int = 32


@dataclass
class DemoConfig:
    """The embedded demo task (issue: `atkd run` works with no download)."""

    enabled: bool = False
    seed: int = 0
    train_examples: int = 4000
    validation_examples: int = 300
    test_examples: int = 300
    vocab_size: int = 512
    teacher: dict[str, Any] = field(default_factory=dict)  # LlamaConfig overrides
    teacher_steps: int = 600
    teacher_batch_size: int = 32
    teacher_lr: float = 1e-3  # 3e-3 stalled at loss ~1.0 on the demo task


@dataclass
class PipelineConfig:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    students: list[StudentConfig] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def student(self, name: str) -> StudentConfig:
        for s in self.students:
            if s.name == name:
                return s
        names = ", ".join(s.name for s in self.students) or "(none)"
        raise ConfigError(f"no student named {name!r} in the config; students: {names}")


# ---------------------------------------------------------------- loading


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting dicts to dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}: {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # PyYAML reads `3e-4` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type, raw: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = path or "top level"
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in raw.items()}
    return cls(**kwargs)


def _apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` inside the raw YAML tree (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.path=value (e.g. teacher.top_k=32)")
    key, _, text = override.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"override {override!r}: empty key path")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {e}") from None
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            idx = _list_index(node, part, where)
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:i])} is not a mapping")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def _list_index(items: list, part: str, where: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    raise ConfigError(f"override: {where}: no list item with index or name {part!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load `pipeline.yaml` (or defaults when path is None), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found (pass the path to pipeline.yaml)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{p}{where}: YAML syntax error: {problem}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for ov in overrides or []:
        _apply_override(raw, ov)
    cfg = _build(PipelineConfig, raw, "")
    derive_paths(cfg)
    validate(cfg)
    return cfg


def derive_paths(cfg: PipelineConfig) -> None:
    """Fill paths left empty from run_dir, so `atkd run run_dir=X` keeps everything under X.

    With the demo on, the data, teacher and eval paths point at what the demo
    builds under run_dir (data/, teacher/); set any of them to override.
    """
    run = Path(cfg.run_dir)
    if not cfg.cache.path:
        cfg.cache.path = str(run / "cache")
    if cfg.demo.enabled:
        cfg.data.path = cfg.data.path or str(run / "data" / "train.jsonl")
        cfg.teacher.model = cfg.teacher.model or str(run / "teacher")
        cfg.eval.path = cfg.eval.path or str(run / "data" / "test.jsonl")
        cfg.eval.validation_path = cfg.eval.validation_path or str(run / "data" / "validation.jsonl")


def validate(cfg: PipelineConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    if not cfg.data.path:
        raise ConfigError("data.path: set the training data (a .jsonl/.json/.parquet file or a hub name)")
    if not cfg.teacher.model:
        raise ConfigError("teacher.model: set the teacher's path or hub name")
    if cfg.teacher.top_k <= 0:
        raise ConfigError(f"teacher.top_k: must be > 0, got {cfg.teacher.top_k}")
    if cfg.data.max_seq_len < 2:
        raise ConfigError(f"data.max_seq_len: must be >= 2, got {cfg.data.max_seq_len}")
    if not 0.0 <= cfg.data.max_dropped_fraction <= 1.0:
        raise ConfigError(f"data.max_dropped_fraction: must be in [0, 1], got {cfg.data.max_dropped_fraction}")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise ConfigError(f"data.limit: must be >= 1 (or null for all rows), got {cfg.data.limit}")
    if cfg.cache.sequences_per_shard <= 0:
        raise ConfigError("cache.sequences_per_shard: must be > 0")
    if cfg.data.kind == "prompt_response" and "{prompt}" not in cfg.data.template:
        raise ConfigError("data.template: must contain {prompt}")
    seen: set[str] = set()
    for i, s in enumerate(cfg.students):
        where = f"students[{i}]"
        if not s.name:
            raise ConfigError(f"{where}.name: every student needs a name")
        if s.name in seen:
            raise ConfigError(f"{where}.name: duplicate student name {s.name!r}")
        check_name(s.name, f"{where}.name")
        seen.add(s.name)
        sources = [k for k, v in (("model", s.model), ("init", s.init), ("init_from", s.init_from)) if v]
        if len(sources) != 1:
            raise ConfigError(f"{where} ({s.name}): set exactly one of `model` (path or hub name), `init` "
                              f"(a model config) or `init_from` (an earlier student's name); got "
                              f"{', '.join(sources) or 'none'}")
        if s.init_from and s.init_from not in seen:
            raise ConfigError(f"{where}.init_from: {s.init_from!r} is not a student listed before {s.name!r}")
        if s.init:
            from pipeline.model_config import check_init  # imports transformers: only for `init` students

            check_init(s.init, f"{where}.init")
        if not 0.0 <= s.loss.easy_weight <= 1.0:
            raise ConfigError(f"{where}.loss.easy_weight: must be in [0, 1], got {s.loss.easy_weight}")
        if not 0.0 < s.loss.hard_ratio <= 1.0:
            raise ConfigError(f"{where}.loss.hard_ratio: must be in (0, 1], got {s.loss.hard_ratio}")
        if s.optim.batch_size <= 0 or s.optim.grad_accum <= 0 or s.optim.max_steps <= 0:
            raise ConfigError(f"{where}.optim: batch_size, grad_accum and max_steps must be > 0")
        if s.loss.chunk_size <= 0:
            raise ConfigError(f"{where}.loss.chunk_size: must be > 0, got {s.loss.chunk_size}")
        if s.checkpoint_every <= 0:
            raise ConfigError(f"{where}.checkpoint_every: must be > 0")


def check_name(name: str, where: str) -> None:
    """Student and run names become directory names: refuse path tricks."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("~"):
        raise ConfigError(f"{where}: {name!r} is not a valid name (no '/', '..' or absolute paths)")


def to_dict(cfg: PipelineConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: PipelineConfig, path: str | Path) -> None:
    """Write the fully resolved config (defaults filled in) next to a run's outputs."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # Atomic, via a private temporary name: several workers started together write this at once.
    atomic_write(p, yaml.safe_dump(to_dict(cfg), sort_keys=False))
