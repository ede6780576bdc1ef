"""Which stage runs when, where each writes, and how we know it is done.

Run directory layout (everything a run produces lives under `run_dir`):

    <run_dir>/config.yaml              the resolved config of the last command
    <run_dir>/students/<name>/         checkpoints, log.jsonl, tb/, final/, done.json
    <run_dir>/cache-val/               teacher cache over the validation split (eval)
    <run_dir>/eval/results.json        metrics per model
    <run_dir>/report/                  report.md + PNG plots
The training cache lives at `cache.path` (often `<run_dir>/cache`, but it can be
shared by many runs or live on an object store).

Stage imports are lazy: `atkd status` and config errors answer in a blink
without importing torch or vLLM.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig, StudentConfig, check_name, save_resolved

# Errors whose message is written for users: the CLI prints them without a traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from storage.errors import StorageError

    return (StorageError, ValueError, OSError, RuntimeError)


USER_ERRORS = _user_errors()


def _log(msg: str) -> None:
    print(f"[atkd] {msg}", flush=True)


def student_dir(cfg: PipelineConfig, name: str) -> Path:
    check_name(name, "student name")
    return Path(cfg.run_dir) / "students" / name


def val_cache_path(cfg: PipelineConfig) -> str:
    return str(Path(cfg.run_dir) / "cache-val")


def results_path(cfg: PipelineConfig) -> Path:
    return Path(cfg.run_dir) / "eval" / "results.json"


# ------------------------------------------------------------------ stages


def prepare(cfg: PipelineConfig) -> None:
    """Record the resolved config; build the demo task and teacher if the config asks."""
    save_resolved(cfg, Path(cfg.run_dir) / "config.yaml")
    if cfg.demo.enabled:
        from stages.demo.teacher import prepare_demo

        prepare_demo(cfg.demo, cfg.run_dir, cfg.data)
    if not cfg.teacher.model:
        raise ConfigError("teacher.model: set the teacher's path or hub name")


def open_cache(url: str):
    """The cache at `url`, or None when stage one has not created it yet."""
    from storage.cache import Cache
    from storage.fs import CacheFS
    from storage.manifest import MANIFEST_NAME

    if not CacheFS(url).exists(MANIFEST_NAME):
        return None
    return Cache.open(url)


def cache_complete(url: str) -> bool:
    cache = open_cache(url)
    return cache is not None and cache.is_complete()


def run_teacher(cfg: PipelineConfig) -> bool:
    """Stage one over the training data. Returns True if it did any work."""
    from stages.teacher.capture import run_capture

    if cache_complete(cfg.cache.path):
        _log(f"teacher cache {cfg.cache.path} is complete; skipping stage one")
        return False
    _log(f"stage one: caching top-{cfg.teacher.top_k} log-probs of {cfg.teacher.model} into {cfg.cache.path}")
    summary = run_capture(cfg.data, cfg.teacher, cfg.cache)
    _log(f"stage one done: {summary}")
    return True


def student_done(cfg: PipelineConfig, name: str) -> bool:
    return (student_dir(cfg, name) / "done.json").is_file()


def run_student(cfg: PipelineConfig, scfg: StudentConfig) -> bool:
    """Stage two for one student. Returns True if it did any work."""
    from stages.student.trainer import train_student

    if student_done(cfg, scfg.name):
        _log(f"student {scfg.name!r} is already trained ({student_dir(cfg, scfg.name)}/final); skipping")
        return False
    if not cache_complete(cfg.cache.path):
        raise ConfigError(
            f"the teacher cache {cfg.cache.path} is not complete; run `atkd teacher` first (or `atkd run`)"
        )
    _log(f"stage two: training student {scfg.name!r} with loss {scfg.loss.kind}")
    train_student(scfg, cache_url=cfg.cache.path, out_dir=str(student_dir(cfg, scfg.name)),
                  tokenizer_path=cfg.teacher.model)
    return True


def _eval_stale(cfg: PipelineConfig) -> bool:
    rp = results_path(cfg)
    if not rp.is_file():
        return True
    done = [student_dir(cfg, s.name) / "done.json" for s in cfg.students]
    newest = max((p.stat().st_mtime for p in done if p.is_file()), default=0.0)
    return newest > rp.stat().st_mtime


def run_eval(cfg: PipelineConfig, force: bool = False) -> dict | None:
    """Evaluate every trained student and the teacher; write results.json and the report."""
    if not force and not _eval_stale(cfg):
        _log(f"evaluation {results_path(cfg)} is up to date; skipping")
        return None
    from stages.evaluate import evaluate_models
    from stages.report import write_report
    from stages.teacher.capture import run_capture

    val_url = None
    if cfg.eval.validation_path:
        val_data = copy.deepcopy(cfg.data)
        val_data.path, val_data.limit = cfg.eval.validation_path, None
        val_cache = copy.deepcopy(cfg.cache)
        val_cache.path = val_cache_path(cfg)
        if not cache_complete(val_cache.path):
            _log(f"caching the teacher on the validation data into {val_cache.path}")
            run_capture(val_data, cfg.teacher, val_cache)
        val_url = val_cache.path
    models = {s.name: str(student_dir(cfg, s.name) / "final") for s in cfg.students if student_done(cfg, s.name)}
    models["teacher"] = cfg.teacher.model
    results = evaluate_models(models, eval_cfg=cfg.eval, data_cfg=cfg.data, teacher_dir=cfg.teacher.model,
                              val_cache_url=val_url, backend=cfg.eval.backend)
    rp = results_path(cfg)
    rp.parent.mkdir(parents=True, exist_ok=True)
    tmp = rp.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, rp)
    logs = {s.name: str(student_dir(cfg, s.name) / "log.jsonl") for s in cfg.students}
    report = write_report(cfg.run_dir, results, logs, cfg.cache.path)
    _log(f"report written to {report}")
    return results


def run_all(cfg: PipelineConfig) -> bool:
    """`atkd run`: every stage that is not done yet, in order. Returns True if anything ran."""
    prepare(cfg)
    did = run_teacher(cfg)
    for s in cfg.students:
        did = run_student(cfg, s) or did
    did = (run_eval(cfg) is not None) or did
    return did


# ------------------------------------------------------------------ reporting


def load_results(cfg: PipelineConfig) -> dict | None:
    rp = results_path(cfg)
    return json.loads(rp.read_text()) if rp.is_file() else None


def format_results(results: dict) -> str:
    from stages.report import format_table

    return format_table(results)


def status_text(cfg: PipelineConfig) -> str:
    lines = [f"run dir: {cfg.run_dir}"]
    if open_cache(cfg.cache.path) is None:
        lines.append(f"teacher cache {cfg.cache.path}: not started")
    else:
        from storage.verify import status_summary

        lines.append(f"teacher cache: {status_summary(cfg.cache.path)}")
    for s in cfg.students:
        d = student_dir(cfg, s.name)
        if student_done(cfg, s.name):
            state = "done"
        else:
            ckpts = sorted((d / "checkpoints").glob("step_*")) if (d / "checkpoints").is_dir() else []
            state = f"in progress (last checkpoint {ckpts[-1].name})" if ckpts else "not started"
        lines.append(f"student {s.name} ({s.loss.kind}): {state}")
    lines.append(f"evaluation: {'done' if results_path(cfg).is_file() else 'not run'}")
    return "\n".join(lines)
