"""Which stage runs when, where each writes, and how we know it is done.

Run directory layout (everything a run produces lives under `run_dir`):

    <run_dir>/config.yaml              the resolved config of the last command
    <run_dir>/split.json               the held-out split (data.holdout): spec, sizes, fingerprint
    <run_dir>/students/<name>/         checkpoints, log.jsonl, tb/, final/, done.json (with `trained_from`: what it
                                       was trained from, pipeline/student_record.py)
    <run_dir>/rounds/<name>/round-<i>/ a `rounds` student's generated rows, round cache and earlier rounds'
                                       training (pipeline/rounds.py); its last round trains into students/<name>/
    <run_dir>/teacher-finetuned/       teacher.finetune: the teacher's SFT run, laid out like a student;
                                       stage one caches its final/ instead of teacher.model
    <run_dir>/cache-val/               teacher cache over the validation split (stage one, for eval;
                                       eval.validation_cache puts it elsewhere, e.g. shared by a sweep's seeds)
    <run_dir>/eval/results.json        metrics per model (written by stages.eval.evaluate only)
    <run_dir>/eval/settings.json       what results.json was computed from (pipeline/evaluation.py)
    <run_dir>/eval/overlap.json        evaluation rows found among the training rows (stages.eval.overlap), keyed
                                       by both sides' fingerprints so a rerun does not rescan
    <run_dir>/eval/<model>.generations.jsonl
    <run_dir>/report/                  report.md + PNG plots (stages.eval.report, from the results)
The training cache lives at `cache.path` (often `<run_dir>/cache`, but it can be
shared by many runs or live on an object store).

Stage imports are lazy: `atkd status` and config errors answer in a blink
without importing torch or vLLM.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from pathlib import Path

from pipeline.config import (CacheConfig, ConfigError, DataConfig, LossConfig, PipelineConfig, StudentConfig,
                             TeacherConfig, check_name, save_resolved)
from stages.student.config import student_data
from storage.files import atomic_write


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
    """Build the demo task and teacher if the config asks (before any check: they are the data and
    the teacher the checks read)."""
    if cfg.demo.enabled:
        from stages.demo.teacher import prepare_demo

        with stage_log(cfg, "demo"):
            prepare_demo(cfg.demo, demo_dir(cfg), cfg.data)


def record_run(cfg: PipelineConfig) -> None:
    """<run_dir>/config.yaml and split.json, written once a command's checks passed and its work starts
    (or it finished): a command refused for a mismatch leaves the run's record as it was."""
    save_resolved(cfg, Path(cfg.run_dir) / "config.yaml")
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
    """teacher.finetune (before stage one): True if it trained. stages.teacher.finetune decides whether the
    fine-tune is done or refused; the training is plain SFT from the rows by the student trainer, whose
    pieces are the training kit's (stages/training/), run as `finetune_run` configures it."""
    if not cfg.teacher.finetune.enabled:
        return False
    from stages.student.trainer import train_student
    from stages.teacher.finetune import finetune_teacher

    out = finetune_dir(cfg)

    def train() -> None:
        train_student(finetune_run(cfg.teacher), cache_url=None, data_cfg=cfg.data, out_dir=out,
                      tokenizer_path=cfg.teacher.model)

    with stage_log(cfg, "finetune"):
        return finetune_teacher(cfg.data, cfg.teacher, out, train=train, on_start=lambda: record_run(cfg))


def finetune_run(teacher: TeacherConfig) -> StudentConfig:
    """teacher.finetune as a training run: teacher.model trained with loss sft from the rows."""
    ft = teacher.finetune
    return StudentConfig(name="teacher-finetune", model=teacher.model, data="rows",
                         trust_remote_code=teacher.trust_remote_code,
                         loss=LossConfig(kind="sft", chunk_size=ft.chunk_size), optim=ft.optim, seed=ft.seed,
                         dtype=ft.dtype, gradient_checkpointing=ft.gradient_checkpointing, fsdp=ft.fsdp,
                         checkpoint_every=ft.checkpoint_every, keep_checkpoints=ft.keep_checkpoints)


def run_teacher(cfg: PipelineConfig, *, validation: bool = False, training: bool = True,
                ray_address: str | None = None) -> bool:
    """The teacher fine-tune when configured, then stage one over the training data (unless
    `training` is False: `atkd run` when every student reads the rows) and the validation data.

    Returns True if it did any work. When both caches are to be written, one
    engine serves both: a vLLM start costs tens of seconds even on a tiny model.
    `ray_address` (not None: `--ray`, "" for Ray's default cluster): the training cache's
    workers run as Ray actors (pipeline/ray_workers.py).
    """
    did = run_finetune(cfg)
    jobs = capture_jobs(cfg, validation=validation, training=training)
    if not jobs:
        return did
    with stage_log(cfg, "teacher"):
        return _run_teacher(cfg, jobs, ray_address) or did


def run_validation_capture(cfg: PipelineConfig) -> bool:
    """Stage one over the validation data only: what `atkd eval` runs first when `atkd run` has not.

    Returns True if it did any work (False also when no validation data is configured)."""
    job = validation_job(cfg)
    if job is None:
        return False
    run_finetune(cfg)
    with stage_log(cfg, "teacher"):
        return _run_teacher(cfg, [job])


def validation_teacher(cfg: PipelineConfig) -> TeacherConfig:
    """The teacher as the validation cache holds it."""
    return teacher_for(cached_teacher(cfg), "validation")


def teacher_for(teacher: TeacherConfig, label: str) -> TeacherConfig:
    """The validation cache is always top-k (KL to the teacher, top-1 agreement need it); the
    training cache holds what teacher.targets asks for."""
    if label == "validation" and teacher.targets != "topk":
        return dataclasses.replace(teacher, targets="topk")
    return teacher


def describe_targets(teacher) -> str:
    """What stage one caches, for the log: 'top-64 log-probs', '16 draws per position', or both."""
    parts = [f"top-{teacher.top_k} log-probs"] if teacher.targets != "sampled" else []
    if teacher.targets != "topk":
        parts.append(f"{teacher.samples} draws per position")
    return " and ".join(parts)


def _run_teacher(cfg: PipelineConfig, jobs: list[tuple[str, object, object]], ray_address: str | None = None) -> bool:
    from stages.teacher.capture import check_complete, open_for_capture, refuse_unshared_cache, run_capture

    from pipeline.workers import resolve_workers, run_workers

    teacher = cached_teacher(cfg)
    on_ray = ray_address is not None
    num_workers, gpu_groups = (0, []) if on_ray else resolve_workers(teacher.num_workers, teacher)
    todo = []
    for label, data_cfg, cache_cfg in jobs:
        if cache_complete(cache_cfg.path):
            # Still compare the cache with the config (teacher, tokenizer, data, top_k, ...): a
            # complete cache of another teacher must be refused, not silently reused.
            check_complete(data_cfg, teacher_for(teacher, label), cache_cfg)
            _log(f"{label} cache {cache_cfg.path} is complete and matches the config")
        else:
            todo.append((label, data_cfg, cache_cfg))
    if not todo:
        return False
    if on_ray and todo[0][0] == "training":
        from pipeline.ray_workers import run_ray_workers

        label, data_cfg, cache_cfg = todo[0]
        # Ray actors are other processes, often on other nodes: the cache must take several writers.
        refuse_unshared_cache(cfg.cache.path, 2, "Ray teacher workers")
        open_for_capture(data_cfg, teacher, cache_cfg)  # the workers' own checks, once, here
        record_run(cfg)
        _log(f"stage one (training data): Ray actors caching {describe_targets(teacher)} of {teacher.model} into "
             f"{cfg.cache.path}")
        run_ray_workers(dataclasses.replace(cfg, teacher=teacher), teacher.num_workers, ray_address or None)
        todo = todo[1:]  # the validation cache is small: this process does it
    elif num_workers > 1 and todo[0][0] == "training":
        label, data_cfg, cache_cfg = todo[0]
        refuse_unshared_cache(cfg.cache.path, num_workers, f"{num_workers} teacher workers")
        open_for_capture(data_cfg, teacher, cache_cfg)  # the workers' own checks, once, here
        record_run(cfg)
        _log(f"stage one (training data): {num_workers} worker processes caching {describe_targets(teacher)} "
             f"of {teacher.model} into {cfg.cache.path}")
        run_workers(dataclasses.replace(cfg, teacher=teacher), num_workers, gpu_groups)
        todo = todo[1:]  # the validation cache is small: this process does it
    engine = None
    try:
        for label, data_cfg, cache_cfg in todo:
            if len(todo) > 1 and engine is None:  # one engine for both caches, started once the first is checked
                open_for_capture(data_cfg, teacher_for(teacher, label), cache_cfg)
                from stages.teacher.engines import make_engine

                record_run(cfg)
                engine = make_engine(teacher, max_seq_len=cfg.data.max_seq_len)
            _log(f"stage one ({label} data): caching {describe_targets(teacher_for(teacher, label))} of "
                 f"{teacher.model} into {cache_cfg.path}")
            run_capture(data_cfg, teacher_for(teacher, label), cache_cfg, engine=engine,
                        on_start=lambda: record_run(cfg))
    finally:
        if engine is not None:
            engine.close()
    return True


_checked_caches: dict[tuple, int] = {}


def check_training_cache(cfg: PipelineConfig) -> int:
    """Refuse a cache built from another teacher, tokenizer or data than the config's (stage
    two would silently learn the wrong thing); returns the top_k to train with. Once per cache
    and config."""
    from storage.cache import Cache
    from stages.teacher.identity import check_for_students

    cache = Cache.open(cfg.cache.path)
    key = (cfg.cache.path, cache.fingerprint, json.dumps(dataclasses.asdict(cfg.data), default=str),
           json.dumps(dataclasses.asdict(cfg.teacher), default=str))
    if key not in _checked_caches:
        top_k, notes = check_for_students(cache, cfg.data, cached_teacher(cfg))
        for note in notes:
            _log(note)
        _checked_caches[key] = top_k
    return _checked_caches[key]


def student_top_k(cfg: PipelineConfig, scfg: StudentConfig) -> int:
    """The top-k entries per position `scfg` trains on: its loss.top_k, else teacher.top_k (the
    first k of the cache's rows; a teacher.top_k below the cache's is deprecated for this, and
    check_training_cache says so); 0 for a cache of sampled targets only, which has no top-k."""
    if cfg.teacher.targets == "sampled":
        return 0
    return int(scfg.loss.top_k if scfg.loss.top_k is not None else cfg.teacher.top_k)


def _check_loss_targets(cfg: PipelineConfig, scfg: StudentConfig) -> None:
    """The student's loss fits the cache's targets (topk / sampled): a ConfigError naming the field."""
    from stages.errors import TrainingError
    from stages.student.objective import resolve_targets
    from storage.cache import Cache
    from storage.schema import targets_of

    try:
        resolve_targets(scfg.loss, targets_of(Cache.open(cfg.cache.path).manifest.identity),
                        f"{student_key(cfg, scfg.name)}.loss ({scfg.name})")
    except TrainingError as e:
        raise ConfigError(str(e)) from None


def student_key(cfg: PipelineConfig, name: str) -> str:
    """`students[i]`: where a student's settings are in the config, for messages."""
    return f"students[{next((i for i, s in enumerate(cfg.students) if s.name == name), 0)}]"


def require_training_cache(url: str) -> None:
    """A cache student needs the complete cache: a storage error saying what is missing, and the fix."""
    from storage.errors import CacheNotReadyError

    cache = open_cache(url)
    if cache is None:
        raise CacheNotReadyError(f"the teacher cache {url} does not exist (no manifest.json); run `atkd teacher` "
                                 "first (or `atkd run`)")
    if not cache.is_complete():
        done = set(cache.completed_shards())
        missing = [i for i in range(cache.num_shards) if i not in done]
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise CacheNotReadyError(f"the teacher cache {url} is not complete: {len(done)} of {cache.num_shards} "
                                 f"shards, missing shard(s) {shown}; run `atkd teacher` (or `atkd run`) to write "
                                 "them (`atkd verify` checks the others)")


def run_student(cfg: PipelineConfig, scfg: StudentConfig, retrain: set[str] | frozenset = frozenset()) -> bool:
    """Stage two for one student (retrained anew when its name is in `retrain`). True if it did any work."""
    if scfg.rounds:  # generate -> cache -> train, round after round (pipeline/rounds.py)
        from pipeline.rounds import run_rounds

        return run_rounds(cfg, scfg, retrain)
    with stage_log(cfg, "student"):
        return _run_student(cfg, scfg, retrain)


def _run_student(cfg: PipelineConfig, scfg: StudentConfig, retrain) -> bool:
    from pipeline.student_record import USABLE, clear_for_retrain, expected_record, refuse_stale, student_states
    from stages.student.trainer import train_student

    if scfg.name in retrain:
        clear_for_retrain(cfg, scfg.name)
    states = student_states(cfg)
    state = states[scfg.name]
    if state.kind in USABLE:
        note = "" if state.kind == "done" else " (trained by an older atkd: not checked against the config)"
        _log(f"student {scfg.name!r} is already trained ({student_dir(cfg, scfg.name)}/final){note}; skipping")
        return False
    refuse_stale(cfg, {scfg.name: state}, set())
    rows = reads_rows(cfg, scfg)
    if not rows:
        require_training_cache(cfg.cache.path)
    if not rows:
        check_training_cache(cfg)
    top_k = None if rows else student_top_k(cfg, scfg)
    if top_k and scfg.loss.top_k is not None:
        _log(f"student {scfg.name!r} trains on the first {top_k} top-k entries per position (loss.top_k)")
    if not rows:
        _check_loss_targets(cfg, scfg)
    if scfg.init_from:
        parent = states[scfg.init_from]
        if parent.kind not in USABLE:
            refuse_stale(cfg, {scfg.init_from: parent}, set())
            raise ConfigError(f"student {scfg.name!r} starts from student {scfg.init_from!r}, which is "
                              f"{parent.kind}: run `atkd student --student {scfg.init_from}` first (or `atkd run`)")
    check_student_model(cfg, scfg)
    record = expected_record(cfg, scfg)
    if scfg.init_from:
        scfg = copy.deepcopy(scfg)
        scfg.model = str(student_dir(cfg, scfg.init_from) / "final")
    out = student_dir(cfg, scfg.name)
    remove_student_partials(out)
    record_run(cfg)
    _log(f"stage two: training student {scfg.name!r} with loss {scfg.loss.kind}"
         + (" from the training rows (no teacher cache)" if rows else "")
         + (f", starting from student {scfg.init_from!r}" if scfg.init_from else "")
         + (f" ({'; '.join(state.why)})" if state.kind == "continues" else ""))
    existed = out.exists()
    try:
        train_student(scfg, cache_url=None if rows else cfg.cache.path, out_dir=str(out),
                      tokenizer_path=cfg.teacher.model or None, top_k=top_k, data_cfg=cfg.data, record=record)
    except BaseException:
        if not existed:
            _remove_if_nothing_kept(out)
        raise
    return True


def check_student_model(cfg: PipelineConfig, scfg: StudentConfig) -> None:
    """A student's `model` / `tokenizer` that is not there: a clear error naming the setting."""
    from stages.teacher.identity import check_model_reachable

    where = student_key(cfg, scfg.name)
    if scfg.model:
        check_model_reachable(scfg.model, f"{where}.model")
    if scfg.tokenizer:
        check_model_reachable(scfg.tokenizer, f"{where}.tokenizer")


def _remove_if_nothing_kept(out: Path) -> None:
    """A first attempt that failed before its first checkpoint leaves no students/<name> behind."""
    from stages.training.layout import list_checkpoints, read_done

    if os.environ.get("RANK", "0") == "0" and out.is_dir() and not list_checkpoints(out) and read_done(out) is None:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        with contextlib.suppress(OSError):
            out.parent.rmdir()  # students/, when this was its only student


def remove_student_partials(out: Path) -> None:
    """Leftovers of killed saves (final.partial-<pid>, ...); one process per job does it (RANK 0)."""
    if os.environ.get("RANK", "0") != "0":
        return
    from stages.training.checkpoint import remove_stale_partials

    for path in remove_stale_partials(out):
        _log(f"removed {path} (left by an interrupted save whose process is gone)")


def run_finished(cfg: PipelineConfig) -> bool:
    """Every student trained and current, and the evaluation current: `atkd run` would do nothing."""
    from pipeline.evaluation import eval_stale
    from pipeline.student_record import USABLE, student_states

    states = student_states(cfg)
    return all(st.kind in USABLE for st in states.values()) and not eval_stale(cfg, states)


def run_all(cfg: PipelineConfig, retrain: list[str] | None = None) -> bool:
    """`atkd run`: every stage that is not done yet, in order. Returns True if anything ran.

    Before any stage: finished students trained from something else than the config are refused
    (unless `retrain` names them: pipeline.student_record), and so are evaluation rows that are
    training rows (pipeline.evaluation.check_overlap)."""
    from pipeline.evaluation import check_overlap, run_eval
    from pipeline.student_record import refuse_stale, retrain_set, student_states

    prepare(cfg)
    again = retrain_set(cfg, retrain or [])
    refuse_stale(cfg, student_states(cfg), again)
    check_overlap(cfg)
    did = run_teacher(cfg, validation=True, training=needs_training_cache(cfg))
    for s in cfg.students:
        did = run_student(cfg, s, again) or did
    did = (run_eval(cfg) is not None) or did
    record_run(cfg)
    return did
