"""Which stage runs when, where each writes, and how we know it is done.

Run directory layout (everything a run produces lives under `run_dir`):

    <run_dir>/config.yaml              the resolved config of the last command
    <run_dir>/split.json               the held-out split (data.holdout): spec, sizes, fingerprint
    <run_dir>/students/<name>/         checkpoints, log.jsonl, tb/, final/, done.json
    <run_dir>/teacher-finetuned/       teacher.finetune: the teacher's SFT run, laid out like a student;
                                       stage one caches its final/ instead of teacher.model
    <run_dir>/cache-val/               teacher cache over the validation split (stage one, for eval;
                                       eval.validation_cache puts it elsewhere, e.g. shared by a sweep's seeds)
    <run_dir>/eval/results.json        metrics per model (written by stages.evaluate only)
    <run_dir>/eval/settings.json       what results.json was computed from (config, models, their done.json)
    <run_dir>/eval/overlap.json        evaluation rows found among the training rows (stages.overlap), keyed
                                       by both sides' fingerprints so a rerun does not rescan
    <run_dir>/eval/<model>.generations.jsonl
    <run_dir>/report/                  report.md + PNG plots (stages.report, from the results)
The training cache lives at `cache.path` (often `<run_dir>/cache`, but it can be
shared by many runs or live on an object store).

Stage imports are lazy: `atkd status` and config errors answer in a blink
without importing torch or vLLM.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

from pipeline.config import (CacheConfig, ConfigError, DataConfig, PipelineConfig, StudentConfig, TeacherConfig,
                             check_name, save_resolved)
from stages.student.config import student_data
from storage.errors import AtkdError
from storage.files import atomic_write  # noqa: F401


def _log(msg: str) -> None:
    print(f"[atkd] {msg}", flush=True)


def student_dir(cfg: PipelineConfig, name: str) -> Path:
    check_name(name, "student name")
    return Path(cfg.run_dir) / "students" / name


def finetune_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.run_dir) / "teacher-finetuned"


def reads_rows(cfg: PipelineConfig, s: StudentConfig) -> bool:
    """Whether student `s` trains from the training rows (plain SFT) rather than the teacher cache."""
    return student_data(s, bool(cfg.teacher.model)) == "rows"


def needs_training_cache(cfg: PipelineConfig) -> bool:
    """Stage one over the training data is needed when a student reads the cache."""
    return any(not reads_rows(cfg, s) for s in cfg.students)


def cached_teacher(cfg: PipelineConfig) -> TeacherConfig:
    """The teacher stage one scores and evaluation reports: teacher.model, or with
    teacher.finetune its fine-tuned final/ (stages.teacher.finetune)."""
    if not cfg.teacher.finetune.enabled:
        return cfg.teacher
    from stages.teacher.finetune import finetuned_teacher

    return finetuned_teacher(cfg.teacher, finetune_dir(cfg))


def val_cache_path(cfg: PipelineConfig) -> str:
    return cfg.eval.validation_cache or str(Path(cfg.run_dir) / "cache-val")


def demo_dir(cfg: PipelineConfig) -> str:
    """Where the demo's data/, tokenizer/ and teacher/ are built (`demo.dir`, default run_dir)."""
    return cfg.demo.dir or cfg.run_dir


def results_path(cfg: PipelineConfig) -> Path:
    return Path(cfg.run_dir) / "eval" / "results.json"


def eval_settings_path(cfg: PipelineConfig) -> Path:
    return results_path(cfg).with_name("settings.json")


def split_path(cfg: PipelineConfig) -> Path:
    return Path(cfg.run_dir) / "split.json"


# ------------------------------------------------------------------ stages


def logs_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.run_dir) / "logs"


def stage_log(cfg: PipelineConfig, stage: str):
    """Engine and library output of `stage` -> <run_dir>/logs/<stage>.log (see stages/logs.py)."""
    from stages.logs import stage_log as route

    return route(logs_dir(cfg), stage)


def prepare(cfg: PipelineConfig) -> None:
    """Record the resolved config; build the demo task and teacher if the config asks."""
    save_resolved(cfg, Path(cfg.run_dir) / "config.yaml")
    if cfg.demo.enabled:
        from stages.demo.teacher import prepare_demo

        with stage_log(cfg, "demo"):
            prepare_demo(cfg.demo, demo_dir(cfg), cfg.data)
    record_split(cfg)


def record_split(cfg: PipelineConfig) -> None:
    """<run_dir>/split.json: the held-out split of data.path (data.holdout) with its sizes and
    fingerprint; rewritten only when it changes. One indexing pass over the data (stages.rows)."""
    if cfg.data.holdout is None:
        return
    from stages.data import open_source
    from stages.split import split_record

    record = split_record(cfg.data, open_source(cfg.data))
    text = json.dumps(record, indent=1) + "\n"
    path = split_path(cfg)
    if not path.is_file() or path.read_text() != text:
        sizes = record["sizes"]
        _log(f"held-out split of {cfg.data.path} (seed {record['spec']['seed']}): train {sizes['train']:,}, "
             f"validation {sizes['validation']:,}, test {sizes['test']:,} rows -> {path}")
        atomic_write(path, text)


def open_cache(url: str):
    """The cache at `url`, or None when stage one has not created it yet."""
    from storage.cache import Cache

    return Cache.open(url) if Cache.exists(url) else None


def cache_complete(url: str) -> bool:
    cache = open_cache(url)
    return cache is not None and cache.is_complete()


def capture_jobs(cfg: PipelineConfig, *, validation: bool,
                 training: bool = True) -> list[tuple[str, DataConfig, CacheConfig]]:
    """(label, data config, cache config) of each teacher cache this run needs."""
    jobs = [("training", cfg.data, cfg.cache)] if training else []
    val_job = validation_job(cfg) if validation else None
    return jobs + [val_job] if val_job else jobs


def validation_job(cfg: PipelineConfig) -> tuple[str, object, object] | None:
    """Stage one over the validation data into <run_dir>/cache-val: `eval.validation_path`, or with
    data.holdout (and no other validation_path) the split's validation part. None when there is none
    (or when the run has no teacher)."""
    if not cfg.teacher.model:
        return None
    val_data = copy.deepcopy(cfg.data)
    holdout = cfg.data.holdout
    if holdout is not None and holdout.validation and cfg.eval.validation_path in ("", cfg.data.path):
        val_data.holdout.part = "validation"  # the same rows and limit: the split is over the same n
    elif cfg.eval.validation_path:
        val_data.path, val_data.limit, val_data.holdout = cfg.eval.validation_path, None, None
    else:
        return None
    val_cache = copy.deepcopy(cfg.cache)
    val_cache.path = val_cache_path(cfg)
    return ("validation", val_data, val_cache)


def run_finetune(cfg: PipelineConfig) -> bool:
    """teacher.finetune (before stage one): True if it trained."""
    if not cfg.teacher.finetune.enabled:
        return False
    from stages.teacher.finetune import finetune_teacher

    with stage_log(cfg, "finetune"):
        return finetune_teacher(cfg.data, cfg.teacher, finetune_dir(cfg))


def run_teacher(cfg: PipelineConfig, *, validation: bool = False, training: bool = True) -> bool:
    """The teacher fine-tune when configured, then stage one over the training data (unless
    `training` is False: `atkd run` when every student reads the rows) and the validation data.

    Returns True if it did any work. When both caches are to be written, one
    engine serves both: a vLLM start costs tens of seconds even on a tiny model.
    """
    did = run_finetune(cfg)
    jobs = capture_jobs(cfg, validation=validation, training=training)
    if not jobs:
        return did
    with stage_log(cfg, "teacher"):
        return _run_teacher(cfg, jobs) or did


def run_validation_capture(cfg: PipelineConfig) -> bool:
    """Stage one over the validation data only: what `atkd eval` runs first when `atkd run` has not.

    Returns True if it did any work (False also when no validation data is configured)."""
    job = validation_job(cfg)
    if job is None:
        return False
    run_finetune(cfg)
    with stage_log(cfg, "teacher"):
        return _run_teacher(cfg, [job])


def _teacher_for(teacher: TeacherConfig, label: str) -> TeacherConfig:
    """The validation cache is always top-k (KL to the teacher, top-1 agreement need it); the
    training cache holds what teacher.targets asks for."""
    if label == "validation" and teacher.targets != "topk":
        return dataclasses.replace(teacher, targets="topk")
    return teacher


def _what(teacher) -> str:
    """What stage one caches, for the log: 'top-64 log-probs', '16 draws per position', or both."""
    parts = [f"top-{teacher.top_k} log-probs"] if teacher.targets != "sampled" else []
    if teacher.targets != "topk":
        parts.append(f"{teacher.samples} draws per position")
    return " and ".join(parts)


def _run_teacher(cfg: PipelineConfig, jobs: list[tuple[str, object, object]]) -> bool:
    from stages.teacher.capture import run_capture

    from pipeline.workers import resolve_workers, run_workers

    teacher = cached_teacher(cfg)
    num_workers, gpu_groups = resolve_workers(teacher.num_workers, teacher)
    todo = []
    for label, data_cfg, cache_cfg in jobs:
        if cache_complete(cache_cfg.path):
            # Still compare the cache with the config (teacher, tokenizer, data, top_k, ...): a
            # complete cache of another teacher must be refused, not silently reused. run_capture
            # loads the data, checks the identity and returns without starting an engine.
            _log(f"{label} cache {cache_cfg.path} is complete; checking that it matches the config")
            run_capture(data_cfg, _teacher_for(teacher, label), cache_cfg, progress=False)
        else:
            todo.append((label, data_cfg, cache_cfg))
    if not todo:
        return False
    if num_workers > 1 and todo[0][0] == "training":
        _log(f"stage one (training data): {num_workers} worker processes caching {_what(teacher)} "
             f"of {teacher.model} into {cfg.cache.path}")
        run_workers(dataclasses.replace(cfg, teacher=teacher), num_workers, gpu_groups)
        todo = todo[1:]  # the validation cache is small: this process does it
    engine = None
    if len(todo) > 1:
        from stages.teacher.engines import make_engine

        engine = make_engine(teacher, max_seq_len=cfg.data.max_seq_len)
    try:
        for label, data_cfg, cache_cfg in todo:
            _log(f"stage one ({label} data): caching {_what(_teacher_for(teacher, label))} of "
                 f"{teacher.model} into {cache_cfg.path}")
            run_capture(data_cfg, _teacher_for(teacher, label), cache_cfg, engine=engine)
    finally:
        if engine is not None:
            engine.close()
    return True


def student_done(cfg: PipelineConfig, name: str) -> bool:
    """The trainer's own answer (stages.student.layout.is_done) for the configured max_steps."""
    from stages.student.layout import is_done

    optim = next((s.optim for s in cfg.students if s.name == name), None)
    return optim is not None and is_done(student_dir(cfg, name), optim.max_steps, optim.epochs)


_checked_caches: dict[str, int] = {}


def check_training_cache(cfg: PipelineConfig) -> int:
    """Refuse a cache built from another teacher, tokenizer or data than the config's (stage
    two would silently learn the wrong thing); returns the top_k to train with. Once per cache."""
    from storage.cache import Cache
    from stages.teacher.identity import check_for_students

    if cfg.cache.path not in _checked_caches:
        top_k, notes = check_for_students(Cache.open(cfg.cache.path), cfg.data, cached_teacher(cfg))
        for note in notes:
            _log(note)
        _checked_caches[cfg.cache.path] = top_k
    return _checked_caches[cfg.cache.path]


def _check_loss_targets(cfg: PipelineConfig, scfg: StudentConfig) -> None:
    """The student's loss fits the cache's targets (topk / sampled): a ConfigError naming the field."""
    from stages.errors import TrainingError
    from stages.student.objective import resolve_targets
    from storage.cache import Cache
    from storage.schema import targets_of

    i = next((i for i, s in enumerate(cfg.students) if s.name == scfg.name), 0)
    try:
        resolve_targets(scfg.loss, targets_of(Cache.open(cfg.cache.path).manifest.identity),
                        f"students[{i}].loss ({scfg.name})")
    except TrainingError as e:
        raise ConfigError(str(e)) from None


def run_student(cfg: PipelineConfig, scfg: StudentConfig) -> bool:
    """Stage two for one student. Returns True if it did any work."""
    with stage_log(cfg, "student"):
        return _run_student(cfg, scfg)


def _run_student(cfg: PipelineConfig, scfg: StudentConfig) -> bool:
    from stages.student.trainer import train_student

    if student_done(cfg, scfg.name):
        _log(f"student {scfg.name!r} is already trained ({student_dir(cfg, scfg.name)}/final); skipping")
        return False
    rows = reads_rows(cfg, scfg)
    if not rows and not cache_complete(cfg.cache.path):
        raise ConfigError(
            f"the teacher cache {cfg.cache.path} is not complete; run `atkd teacher` first (or `atkd run`)"
        )
    top_k = None if rows else check_training_cache(cfg)
    if not rows:
        _check_loss_targets(cfg, scfg)
    if scfg.init_from:
        if not student_done(cfg, scfg.init_from):
            raise ConfigError(f"student {scfg.name!r} starts from student {scfg.init_from!r}, which is not "
                              f"trained yet: run `atkd student --student {scfg.init_from}` first (or `atkd run`)")
        scfg = copy.deepcopy(scfg)
        scfg.model = str(student_dir(cfg, scfg.init_from) / "final")
    _remove_stale_partials(student_dir(cfg, scfg.name))
    _log(f"stage two: training student {scfg.name!r} with loss {scfg.loss.kind}"
         + (" from the training rows (no teacher cache)" if rows else "")
         + (f", starting from student {scfg.init_from!r}" if scfg.init_from else ""))
    train_student(scfg, cache_url=None if rows else cfg.cache.path, out_dir=str(student_dir(cfg, scfg.name)),
                  tokenizer_path=cfg.teacher.model or None, top_k=top_k, data_cfg=cfg.data)
    return True


def _remove_stale_partials(out: Path) -> None:
    """Leftovers of killed saves (final.partial-<pid>, ...); one process per job does it (RANK 0)."""
    if os.environ.get("RANK", "0") != "0":
        return
    from stages.student.checkpoint import remove_stale_partials

    for path in remove_stale_partials(out):
        _log(f"removed {path} (left by an interrupted save whose process is gone)")


def eval_models(cfg: PipelineConfig) -> dict[str, str]:
    """What evaluation covers: every trained student's final/ and the teacher (fine-tuned with
    teacher.finetune; none in a run without one)."""
    models = {s.name: str(student_dir(cfg, s.name) / "final") for s in cfg.students if student_done(cfg, s.name)}
    if cfg.teacher.model:
        models["teacher"] = cached_teacher(cfg).model
    return models


def eval_settings(cfg: PipelineConfig) -> dict:
    """Everything results.json depends on: the eval and data config, the teacher, and each model with
    the steps and finish time of its done.json (retraining a student changes them). JSON-plain."""
    from stages.student.layout import read_done

    students, models = {s.name for s in cfg.students}, {}
    for name, path in eval_models(cfg).items():
        done = read_done(student_dir(cfg, name)) if name in students else None
        if name == "teacher" and cfg.teacher.finetune.enabled:
            done = read_done(finetune_dir(cfg))  # a fine-tune trained again changes the teacher
        models[name] = {"dir": path, **({k: done.get(k) for k in ("steps", "finished_at")} if done else {})}
    settings = {"eval": dataclasses.asdict(cfg.eval), "data": dataclasses.asdict(cfg.data),
                "teacher": cfg.teacher.model, "models": models}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _eval_stale(cfg: PipelineConfig) -> bool:
    """No results yet, or they were computed with other settings (eval config, models, retrained students)."""
    if not results_path(cfg).is_file():
        return True
    try:
        recorded = json.loads(eval_settings_path(cfg).read_text())
    except (OSError, ValueError):
        return True  # results of an older atkd (no settings.json) or of a killed write: evaluate again
    return recorded != eval_settings(cfg)


def run_eval(cfg: PipelineConfig, force: bool = False) -> dict | None:
    """Evaluate every trained student and the teacher (stages.evaluate writes results.json), then the report.

    The validation cache is stage one's: run first, as that stage, when it is missing."""
    run_finetune(cfg)  # the teacher row is the fine-tuned teacher (nothing to do once it is trained)
    if not force and not _eval_stale(cfg):
        _log(f"evaluation {results_path(cfg)} is up to date; skipping")
        return None
    if validation_job(cfg) is not None and not cache_complete(val_cache_path(cfg)):
        _log(f"the validation cache {val_cache_path(cfg)} is not complete: running stage one over "
             f"{cfg.eval.validation_path or 'the validation part of ' + cfg.data.path} first")
        run_validation_capture(cfg)
    with stage_log(cfg, "eval"):
        return _run_eval(cfg)


def answer_rule(cfg: PipelineConfig):
    """The exact-match rule `eval.answer_rule` names (None: stages.evaluate's default, the whole response)."""
    rule = cfg.eval.answer_rule
    if rule == "auto":  # a config built in code, not by load_config
        rule = "demo" if cfg.demo.enabled else "exact"
    if rule == "demo":
        from stages.demo.evaluation import DemoAnswer

        return DemoAnswer()
    return None


def report_sections(cfg: PipelineConfig) -> list[str]:
    """What the run adds to the report beyond the evaluation: the demo teacher's numbers."""
    if not cfg.demo.enabled:
        return []
    from stages.demo.evaluation import teacher_section

    return [teacher_section(demo_dir(cfg))]


def _run_eval(cfg: PipelineConfig) -> dict:
    from stages.evaluate import evaluate_models
    from stages.report import write_report

    settings = eval_settings(cfg)  # before evaluating: a student finishing meanwhile makes the results stale
    val_job = validation_job(cfg)
    val_url = val_cache_path(cfg) if val_job is not None else None
    if val_url is None and not cfg.teacher.model:
        _log("KL to the teacher, top-1 agreement and ECE are skipped: the run has no teacher")
    elif val_url is None:
        _log("KL to the teacher, top-1 agreement and ECE are skipped: they need held-out rows cached by the "
             "teacher; set eval.validation_path to a file of them, or data.holdout.validation")
    results = evaluate_models(eval_models(cfg), eval_cfg=cfg.eval, data_cfg=cfg.data,
                              teacher_dir=cached_teacher(cfg).model,
                              val_cache_url=val_url, backend=cfg.eval.backend, out_dir=str(results_path(cfg).parent),
                              settings=settings, answer_rule=answer_rule(cfg),
                              val_data_cfg=val_job[1] if val_job else None)
    logs = {s.name: str(student_dir(cfg, s.name) / "log.jsonl") for s in cfg.students}
    cache = cfg.cache.path if needs_training_cache(cfg) and cache_complete(cfg.cache.path) else None
    report = write_report(cfg.run_dir, results, logs, cache, sections=report_sections(cfg),
                          continues={s.name: s.init_from for s in cfg.students if s.init_from})
    _log(f"report written to {report}")
    return results


def run_finished(cfg: PipelineConfig) -> bool:
    """Every student trained and the evaluation current: `atkd run` would do nothing."""
    return all(student_done(cfg, s.name) for s in cfg.students) and not _eval_stale(cfg)


def run_all(cfg: PipelineConfig) -> bool:
    """`atkd run`: every stage that is not done yet, in order. Returns True if anything ran."""
    prepare(cfg)
    did = run_teacher(cfg, validation=True, training=needs_training_cache(cfg))
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
    if cfg.teacher.finetune.enabled:
        from stages.teacher.finetune import finetune_state

        lines.append(f"teacher fine-tune {finetune_dir(cfg)}: {finetune_state(cfg.teacher, finetune_dir(cfg))}")
    if not needs_training_cache(cfg):
        lines.append("teacher cache: not needed (every student trains from the rows)")
    elif open_cache(cfg.cache.path) is None:
        lines.append(f"teacher cache {cfg.cache.path}: not started")
    else:
        from storage.errors import CacheMismatchError
        from storage.verify import status_summary

        lines.append(f"teacher cache: {status_summary(cfg.cache.path)}")
        try:
            check_training_cache(cfg)
        except CacheMismatchError as e:
            lines.append(f"MISMATCH: {e}")
        except AtkdError as e:  # e.g. the fine-tuned teacher it should match is not there yet
            lines.append(f"not checked against the config: {e}")
    from stages.student.layout import last_checkpoint

    for s in cfg.students:
        if student_done(cfg, s.name):
            state = "done"
        else:
            last = last_checkpoint(student_dir(cfg, s.name))
            state = f"in progress (last checkpoint {last.name})" if last else "not started"
        lines.append(f"student {s.name} ({s.loss.kind}{', from the rows' if reads_rows(cfg, s) else ''}): {state}")
    if not results_path(cfg).is_file():
        lines.append("evaluation: not run")
    else:
        lines.append("evaluation: " + ("out of date (settings or students changed since)" if _eval_stale(cfg)
                                       else "done"))
    return "\n".join(lines)
