"""`atkd status`: what of a run is done, checked against its config.

The teacher fine-tune, the training cache and the validation cache (shards
done, and whether each matches the config), every student (done, stale and
why, in progress, not started: pipeline.student_record) and the evaluation.
"""

from __future__ import annotations

from pipeline import orchestrator as runner
from pipeline.config import PipelineConfig
from storage.errors import AtkdError


def _cache_lines(cfg: PipelineConfig, label: str, url: str, check) -> list[str]:
    from storage.errors import CacheMismatchError
    from storage.verify import status_summary

    if runner.open_cache(url) is None:
        return [f"{label} cache {url}: not started"]
    lines = [f"{label} cache: {status_summary(url)}"]
    try:
        check()
    except CacheMismatchError as e:
        lines.append(f"MISMATCH: {e}")
    except AtkdError as e:  # e.g. the fine-tuned teacher it should match is not there yet
        lines.append(f"not checked against the config: {e}")
    return lines


def status_text(cfg: PipelineConfig) -> str:
    from pipeline.evaluation import eval_stale
    from pipeline.student_record import student_states

    lines = [f"run dir: {cfg.run_dir}"]
    if cfg.teacher.finetune.enabled:
        from stages.teacher.finetune import finetune_state

        out = runner.finetune_dir(cfg)
        lines.append(f"teacher fine-tune {out}: {finetune_state(cfg.teacher, out)}")
    if not runner.needs_training_cache(cfg):
        lines.append("teacher cache: not needed (every student trains from the rows)")
    else:
        lines += _cache_lines(cfg, "teacher", cfg.cache.path, lambda: runner.check_training_cache(cfg))
    job = runner.validation_job(cfg)
    if job is not None:
        from stages.teacher.capture import check_cache

        lines += _cache_lines(cfg, "validation", job[2].path,
                              lambda: check_cache(job[1], runner.validation_teacher(cfg), job[2]))
    states = student_states(cfg)
    for s in cfg.students:
        rows = ", from the rows" if runner.reads_rows(cfg, s) else ""
        lines.append(f"student {s.name} ({s.loss.kind}{rows}): {states[s.name].text()}")
        if s.rounds:
            from pipeline.rounds import rounds_lines

            lines += rounds_lines(cfg, s)
    if not runner.results_path(cfg).is_file():
        lines.append("evaluation: not run")
    else:
        lines.append("evaluation: " + ("out of date (settings, data or students changed since)"
                                       if eval_stale(cfg, states) else "done"))
    return "\n".join(lines)
