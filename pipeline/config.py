"""Typed configuration for the whole pipeline, loaded from `pipeline.yaml`.

Every section is a dataclass defined next to the stage it configures
(stages/data_config.py, stages/teacher/config.py, stages/student/config.py,
stages/eval/config.py, stages/demo/config.py; OptimConfig in stages/training/config.py)
and checks its own values (`check()`); this module loads the YAML, applies
overrides, builds those types (and re-exports them), calls each section's check
and owns the rules that join sections (`validate`).
`load_config` walks the YAML tree against the dataclass fields so an unknown
key or a wrong type fails at load time with the key's full path
(`students[1].optim.lr: expected a number, got 'fast'`).
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
from typing import Any, Literal

import yaml

from stages.data_config import DataConfig
from stages.errors import ConfigError, check_name  # noqa: F401 - re-exported
from stages.demo.config import DemoConfig
from stages.eval.config import EvalConfig
from stages.student.config import LossConfig, StudentConfig, student_data
from stages.teacher.config import CacheConfig, FinetuneConfig, TeacherConfig
from stages.training.config import OptimConfig
from storage.files import atomic_write


# The section types live next to the stage each configures; re-exported here
# (`from pipeline.config import DataConfig` keeps working).
__all__ = ["CacheConfig", "ConfigError", "DataConfig", "DemoConfig", "EvalConfig", "FinetuneConfig", "LossConfig",
           "OptimConfig", "PipelineConfig", "StudentConfig", "TeacherConfig", "check_name", "config_from_raw",
           "load_config", "read_yaml", "save_resolved",
           "to_dict", "validate"]


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
    return config_from_raw(read_yaml(path) if path is not None else {}, overrides)


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """The mapping at the top of a YAML file; a missing file or a syntax error is a ConfigError saying where."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} not found" + (" (pass the path to pipeline.yaml)"
                                                             if what == "config file" else ""))
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{p}{where}: YAML syntax error: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def config_from_raw(raw: dict, overrides: list[str] | None = None) -> PipelineConfig:
    """A PipelineConfig from a YAML tree (changed in place by the `a.b=c` overrides), paths derived, validated."""
    if overrides:
        raw.update(_unaliased(raw))  # `optim: *distil` shared by students: an override changes one of them
    for ov in overrides or []:
        _apply_override(raw, ov)
    cfg = _build(PipelineConfig, raw, "")
    derive_paths(cfg)
    validate(cfg)
    from storage.fs import register_storage_options

    register_storage_options(cfg.cache.path, cfg.cache.storage_options)
    return cfg


def _unaliased(value: Any) -> Any:
    """A copy in which no mapping or list is shared (YAML anchors and aliases load as one object)."""
    if isinstance(value, dict):
        return {k: _unaliased(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unaliased(v) for v in value]
    return value


def derive_paths(cfg: PipelineConfig) -> None:
    """Fill paths left empty from run_dir, so `atkd run run_dir=X` keeps everything under X.

    With the demo on, the data, teacher and eval paths point at what the demo
    builds under demo.dir (default run_dir: data/, teacher/) and `eval.answer_rule: auto` is the
    demo's answer check; set any of them to override. Without it, auto is "exact".
    With data.holdout (a test part) and no eval.path, evaluation reads data.path's test part.
    """
    run = Path(cfg.run_dir)
    if not cfg.cache.path:
        cfg.cache.path = str(run / "cache")
    if cfg.demo.enabled:
        cfg.demo.dir = cfg.demo.dir or str(run)
        demo = Path(cfg.demo.dir)
        cfg.data.path = cfg.data.path or str(demo / "data" / "train.jsonl")
        cfg.teacher.model = cfg.teacher.model or str(demo / "teacher")
        cfg.eval.path = cfg.eval.path or str(demo / "data" / "test.jsonl")
        cfg.eval.validation_path = cfg.eval.validation_path or str(demo / "data" / "validation.jsonl")
    if cfg.data.holdout is not None and cfg.data.holdout.test and not cfg.eval.path:
        cfg.eval.path, cfg.eval.split = cfg.data.path, cfg.data.split  # evaluation reads its test part
    if cfg.eval.answer_rule == "auto":
        cfg.eval.answer_rule = "demo" if cfg.demo.enabled else "exact"
    from stages.eval import lm_harness, sets

    sets.resolve_paths(cfg)  # after eval.answer_rule: a set's `auto` is eval's
    if cfg.demo.enabled and cfg.eval.lm_eval.tasks and not cfg.eval.lm_eval.include_path:
        cfg.eval.lm_eval.include_path = lm_harness.demo_include_path(cfg)


def validate(cfg: PipelineConfig) -> None:
    """Each section's own check() (next to its dataclass), then the rules that join sections."""
    cfg.data.check()
    if not cfg.teacher.model and (cfg.teacher.finetune.enabled or not cfg.students
                                  or any(student_data(s, False) == "cache" for s in cfg.students)):
        raise ConfigError("teacher.model: set the teacher's path or hub name (only a run whose students are "
                          "all `loss.kind: sft` reading the rows needs no teacher)")
    cfg.teacher.check()
    cfg.cache.check()
    from pipeline.eval_checks import check_lm_eval, check_sets

    check_sets(cfg)
    check_lm_eval(cfg)
    if cfg.cache.logprob_encoding != "exact" and cfg.teacher.targets == "sampled":
        raise ConfigError(f"cache.logprob_encoding: {cfg.cache.logprob_encoding} encodes the top-k log-probs, but "
                          "teacher.targets: sampled stores no top-k (only the draws and the gold log-prob); use "
                          "cache.logprob_encoding: exact, or teacher.targets: topk+sampled")
    cfg.eval.check()
    cfg.demo.check()
    seen: set[str] = set()
    for i, s in enumerate(cfg.students):
        where = f"students[{i}]"
        s.check(where)
        if s.name in seen:
            raise ConfigError(f"{where}.name: duplicate student name {s.name!r}")
        seen.add(s.name)
        if s.init_from and s.init_from not in seen:
            raise ConfigError(f"{where}.init_from: {s.init_from!r} is not a student listed before {s.name!r}")
        if s.init:
            from pipeline.model_config import check_init  # imports transformers: only for `init` students

            check_init(s.init, f"{where}.init")
        from stages.rounds_config import check_rounds

        for problem in check_rounds(s.rounds, where, cfg.data.kind, has_start=bool(s.init_from or s.model)):
            raise ConfigError(problem)
        if student_data(s, bool(cfg.teacher.model)) == "rows" and s.loss.kind != "sft":
            raise ConfigError(f"{where}.data: {s.name!r} reads the training rows (data: rows), which only plain "
                              f"SFT can: loss.kind {s.loss.kind} learns from the teacher cache (set data: cache or "
                              "auto, or loss.kind: sft)")
        if s.init and not s.tokenizer and not cfg.teacher.model:
            raise ConfigError(f"{where}.tokenizer: {s.name!r} is initialised from `init` in a run without a "
                              "teacher, so there is no teacher tokenizer to borrow; set its tokenizer")
        if s.loss.top_k is not None and s.loss.top_k > cfg.teacher.top_k:
            raise ConfigError(f"{where}.loss.top_k: {s.loss.top_k} is more than stage one caches "
                              f"(teacher.top_k={cfg.teacher.top_k}); set it to at most {cfg.teacher.top_k}, or null "
                              "for all of them")


def to_dict(cfg: PipelineConfig) -> dict:
    """The config as plain data, secrets in cache.storage_options redacted (what a run saves; child
    processes get the secrets through the environment, storage.fs.register_storage_options)."""
    from storage.fs import redact_options

    out = dataclasses.asdict(cfg)
    out["cache"]["storage_options"] = redact_options(out["cache"]["storage_options"])
    return out


def save_resolved(cfg: PipelineConfig, path: str | Path) -> None:
    """Write the fully resolved config (defaults filled in) next to a run's outputs."""
    p = Path(path)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if p.is_file() and p.read_text() == text:
        return  # unchanged: no rewrite
    p.parent.mkdir(parents=True, exist_ok=True)
    # Atomic, via a private temporary name: several workers started together write this at once.
    atomic_write(p, text)
