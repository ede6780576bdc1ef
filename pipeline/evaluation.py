"""Evaluation as a stage of a run: which models it covers, whether results.json is current, the
train/evaluation overlap check (before any training too), and the report.

    <run_dir>/eval/results.json    metrics per model (stages.eval.evaluate is its only writer)
    <run_dir>/eval/settings.json   what they were computed from (eval_settings): the eval and data
                                   config, the evaluation rows' and the validation cache's content,
                                   and each model as it was (a student's training record and finish
                                   time, the teacher's weights): when any of it changes, `atkd run`
                                   evaluates again
    <run_dir>/eval/overlap.json    evaluation rows found among the training rows (stages.eval.overlap)
"""

from __future__ import annotations

import dataclasses
import json

from pipeline import orchestrator as runner
from pipeline.config import PipelineConfig
from pipeline.student_record import USABLE, StudentState, refuse_stale, student_states


def _log(msg: str) -> None:
    print(f"[atkd] {msg}", flush=True)


def eval_models(cfg: PipelineConfig, states: dict[str, StudentState] | None = None) -> dict[str, str]:
    """What evaluation covers: every trained, current student's final/ and the teacher (fine-tuned with
    teacher.finetune; none in a run without one)."""
    states = student_states(cfg) if states is None else states
    models = {s.name: str(runner.student_dir(cfg, s.name) / "final") for s in cfg.students
              if states[s.name].kind in USABLE}
    if cfg.teacher.model:
        models["teacher"] = runner.cached_teacher(cfg).model
    return models


def _source_fingerprints(cfg: PipelineConfig) -> dict:
    """The content evaluation reads: eval.path's rows and the validation cache (None while missing)."""
    from stages.data import open_source
    from storage.errors import AtkdError

    out = {}
    if cfg.eval.path:
        try:
            out["eval_rows"] = open_source(cfg.data, cfg.eval.path, cfg.eval.split, key="eval.path").fingerprint
        except AtkdError:
            out["eval_rows"] = None  # evaluating says what is wrong with it
    if runner.validation_job(cfg) is not None:
        cache = runner.open_cache(runner.val_cache_path(cfg))
        out["validation_cache"] = cache.fingerprint if cache is not None and cache.is_complete() else None
    if cfg.eval.sets:
        from stages.eval.sets import set_fingerprints

        out["eval_sets"] = set_fingerprints(cfg.data, cfg.eval)
    if cfg.eval.lm_eval.tasks:
        from stages.eval.lm_harness import fingerprint

        out["lm_eval"] = fingerprint(cfg.eval.lm_eval)  # lm-eval's version, the task YAMLs and their data
    return out


def eval_settings(cfg: PipelineConfig, states: dict[str, StudentState] | None = None) -> dict:
    """Everything results.json depends on (module doc). JSON-plain."""
    from stages.fingerprint import fingerprint_json, model_fingerprint
    from stages.training.layout import read_done

    states = student_states(cfg) if states is None else states
    students, models = {s.name for s in cfg.students}, {}
    for name, path in eval_models(cfg, states).items():
        done = read_done(runner.student_dir(cfg, name)) if name in students else None
        entry = {"dir": path}
        if name == "teacher":
            entry["fingerprint"] = model_fingerprint(path)  # a fine-tune trained again changes it too
        if done:
            entry.update(steps=done.get("steps"), finished_at=done.get("finished_at"),
                         record=fingerprint_json(done.get("trained_from")))
        models[name] = entry
    settings = {"eval": dataclasses.asdict(cfg.eval), "data": dataclasses.asdict(cfg.data),
                "teacher": cfg.teacher.model, "models": models, "sources": _source_fingerprints(cfg)}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def eval_stale(cfg: PipelineConfig, states: dict[str, StudentState] | None = None) -> bool:
    """No results yet, or they were computed from something else (module doc)."""
    if not runner.results_path(cfg).is_file():
        return True
    try:
        recorded = json.loads(runner.eval_settings_path(cfg).read_text())
    except (OSError, ValueError):
        return True  # results of an older atkd (no settings.json) or of a killed write: evaluate again
    return recorded != eval_settings(cfg, states)


def check_overlap(cfg: PipelineConfig, *, record: bool = True, unreadable_ok: bool = False) -> str | None:
    """Evaluation rows that are training rows, found before anything trains (stages.eval.overlap): an
    EvalError unless eval.allow_train_overlap (then evaluation warns). `record`: keep the scan's
    outcome in <run_dir>/eval/overlap.json (--dry-run: False). Returns the refusal's text instead of
    raising when `record` is False. `unreadable_ok` (`atkd teacher` / `student`, which do not
    evaluate): data that cannot be read yet (no eval file on this node) is left to the stage that reads it."""
    from stages.errors import EvalError
    from stages.eval.overlap import check_train_overlap, evaluation_sets
    from stages.rows import DataError

    if cfg.eval.allow_train_overlap or not (cfg.eval.path or cfg.eval.sets or runner.validation_job(cfg)):
        return None
    val_job = runner.validation_job(cfg)
    try:
        sets, source = evaluation_sets(cfg.data, cfg.eval, val_job[1] if val_job else None, quiet=True)
        if sets and source is not None:
            check_train_overlap(cfg.data, sets, allow=False, source=source,
                                out_dir=runner.results_path(cfg).parent if record else None)
    except EvalError as e:
        if record:
            raise
        return str(e)
    except DataError:
        if not unreadable_ok:
            raise
    return None


def run_eval(cfg: PipelineConfig, force: bool = False, standalone: bool = False) -> dict | None:
    """Evaluate every trained student and the teacher (stages.eval.evaluate writes results.json), then the report;
    None when results.json is current (eval_stale) and not `force`.

    A stale student is refused (pipeline.student_record); one not trained yet is left out, said so.
    The validation cache is stage one's: run first, as that stage, when it is missing. `standalone`
    (`atkd eval`): a validation cache there is checked against this config first."""
    runner.run_finetune(cfg)  # the teacher row is the fine-tuned teacher (nothing to do once it is trained)
    states = student_states(cfg)
    refuse_stale(cfg, states, set())
    for name, state in states.items():
        if state.kind not in USABLE:
            _log(f"student {name!r} is {state.kind}: left out of the evaluation (train it with "
                 f"`atkd student --student {name}` or `atkd run`)")
    if not force and not eval_stale(cfg, states):
        _log(f"evaluation {runner.results_path(cfg)} is up to date; skipping (`atkd eval --force` evaluates again)")
        return None
    job = runner.validation_job(cfg)
    if job is not None and not runner.cache_complete(job[2].path):
        _log(f"the validation cache {job[2].path} is not complete: running stage one over "
             f"{cfg.eval.validation_path or 'the validation part of ' + cfg.data.path} first")
        runner.run_validation_capture(cfg)
    elif job is not None and (force or standalone):  # `atkd eval`: the cache it measures KL on must be this config's
        from stages.teacher.capture import check_cache

        check_cache(job[1], runner.validation_teacher(cfg), job[2])
    check_overlap(cfg)
    runner.record_run(cfg)
    with runner.stage_log(cfg, "eval"):
        return _run_eval(cfg, states)


def answer_rule(cfg: PipelineConfig):
    """The exact-match rule `eval.answer_rule` names (None: stages.eval.evaluate's default, the whole response)."""
    rule = cfg.eval.answer_rule
    if rule == "auto":  # a config built in code, not by load_config
        rule = "demo" if cfg.demo.enabled else "exact"
    return named_rules()["demo"] if rule == "demo" else None


def named_rules() -> dict:
    """Rules an eval set's `answer_rule` may name besides "exact": the demo's answer check."""
    from stages.demo.evaluation import DemoAnswer

    return {"demo": DemoAnswer()}


def report_sections(cfg: PipelineConfig) -> list[str]:
    """What the run adds to the report beyond the evaluation: the demo teacher's numbers."""
    if not cfg.demo.enabled:
        return []
    from stages.demo.evaluation import teacher_section

    return [teacher_section(runner.demo_dir(cfg))]


def start_lm_eval(cfg: PipelineConfig, models: dict[str, str]):
    """eval.lm_eval's run (stages.eval.lm_harness) started, its tasks resolved and loaded (a task that
    cannot be: an EvalError before any model runs); None without tasks. On a CPU it goes on beside the
    generation metrics (the small models there leave cores idle); on a GPU it finishes first, so two
    models never share the GPU's memory."""
    if not cfg.eval.lm_eval.tasks or not models:
        return None
    import torch

    from stages.eval.lm_harness import LmEvalRun

    run = LmEvalRun(models, cfg.eval.lm_eval, teacher_dir=runner.cached_teacher(cfg).model,
                    out_dir=runner.results_path(cfg).parent)
    try:
        run.wait_ready()
        if torch.cuda.is_available():
            run.results()  # kept: evaluate_models asks for them again at its end
    except BaseException:
        run.stop()
        raise
    return run


def _run_eval(cfg: PipelineConfig, states: dict[str, StudentState]) -> dict:
    from stages.eval.evaluate import evaluate_models
    from stages.eval.report import write_report
    from stages.eval.report_tables import eval_sections

    settings = eval_settings(cfg, states)  # before evaluating: a student finishing meanwhile makes them stale
    val_job = runner.validation_job(cfg)
    val_url = runner.val_cache_path(cfg) if val_job is not None else None
    if val_url is None and not cfg.teacher.model:
        _log("KL to the teacher, top-1 agreement and ECE are skipped: the run has no teacher")
    elif val_url is None:
        _log("KL to the teacher, top-1 agreement and ECE are skipped: they need held-out rows cached by the "
             "teacher; set eval.validation_path to a file of them, or data.holdout.validation")
    models = eval_models(cfg, states)
    lm_run = start_lm_eval(cfg, models)
    try:
        results = evaluate_models(models, eval_cfg=cfg.eval, data_cfg=cfg.data,
                                  teacher_dir=runner.cached_teacher(cfg).model, val_cache_url=val_url,
                                  backend=cfg.eval.backend, out_dir=str(runner.results_path(cfg).parent),
                                  settings=settings, answer_rule=answer_rule(cfg), named_rules=named_rules(),
                                  val_data_cfg=val_job[1] if val_job else None,
                                  extra=lm_run.results if lm_run is not None else None)
    finally:
        if lm_run is not None:
            lm_run.stop()
    logs = {s.name: str(runner.student_dir(cfg, s.name) / "log.jsonl") for s in cfg.students}
    cache = cfg.cache.path if runner.needs_training_cache(cfg) and runner.cache_complete(cfg.cache.path) else None
    report = write_report(cfg.run_dir, results, logs, cache, sections=eval_sections(results) + report_sections(cfg),
                          continues={s.name: s.init_from for s in cfg.students if s.init_from})
    _log(f"report written to {report}")
    return results


def load_results(cfg: PipelineConfig) -> dict | None:
    rp = runner.results_path(cfg)
    return json.loads(rp.read_text()) if rp.is_file() else None


def format_results(results: dict) -> str:
    from stages.eval.report import format_table
    from stages.eval.report_tables import eval_sections

    return "\n\n".join([format_table(results), *eval_sections(results)]).rstrip("\n")
