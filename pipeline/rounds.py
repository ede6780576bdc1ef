"""A student's distillation rounds (`students[i].rounds`, stages/rounds_config.py).

Each round: generate (a `teacher` or `student` round: stages/generate/generation.py) -> stage one
caches the teacher on those rows (stages/teacher/capture.py, a cache per round, the same format) ->
stage two continues the student (stages/student/trainer.py). One engine at a time: the generator is
closed before stage one starts and stage one's teacher before the student trains, so teacher and
student never share (GPU) memory. Layout:

    <run_dir>/rounds/<student>/round-<i>/generated/   the round's rows file (manifest.json, rows/, stats/)
    <run_dir>/rounds/<student>/round-<i>/cache/       the teacher cache over them
    <run_dir>/rounds/<student>/round-<i>/student/     stage two of round i (checkpoints, final/, done.json)
    <run_dir>/students/<student>/                     the last round's stage two: what evaluation,
                                                      `atkd status` and continuing students read
A `data` round trains on the run's training cache (cache.path) and generates nothing.

Round i starts from round i-1's final/ (round 0: the student's own start: init, model or
init_from's final/) with a fresh optimiser and a schedule of `steps` steps (the student's optim
settings otherwise; its max_steps / epochs are not used). Every step is resumable: a killed
generation continues at its first uncommitted shard, stage one at its first incomplete shard,
stage two at its last checkpoint; a finished round is recognised by its done.json record.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from pathlib import Path

from pipeline import orchestrator as runner
from pipeline.config import ConfigError, PipelineConfig, StudentConfig, check_name


def _log(msg: str) -> None:
    print(f"[atkd] {msg}", flush=True)


def rounds_dir(cfg: PipelineConfig, name: str) -> Path:
    check_name(name, "student name")
    return Path(cfg.run_dir) / "rounds" / name


def round_paths(cfg: PipelineConfig, s: StudentConfig, i: int) -> dict[str, Path]:
    base = rounds_dir(cfg, s.name) / f"round-{i}"
    last = i == len(s.rounds) - 1
    return {"generated": base / "generated", "cache": base / "cache",
            "student": runner.student_dir(cfg, s.name) if last else base / "student"}


def start_model(cfg: PipelineConfig, s: StudentConfig, i: int) -> str:
    """The weights round i starts from ('' : the student's `init`, built by the trainer)."""
    if i > 0:
        return str(round_paths(cfg, s, i - 1)["student"] / "final")
    if s.init_from:
        return str(runner.student_dir(cfg, s.init_from) / "final")
    return s.model


def generation_seed(s: StudentConfig, i: int) -> int:
    """Round i's base seed (each row's seed is hashed from it and the row: stages/generate/generation.py)."""
    return (int(s.seed) << 32) ^ (int(s.rounds[i].generate.seed) << 8) ^ i


def generation_job(cfg: PipelineConfig, s: StudentConfig, i: int):
    from stages.generate.generation import GenerationJob

    r = s.rounds[i]
    model = runner.cached_teacher(cfg).model if r.source == "teacher" else start_model(cfg, s, i)
    return GenerationJob(model=model, source=r.source, data_cfg=cfg.data, gen=r.generate,
                         seed=generation_seed(s, i), out=str(round_paths(cfg, s, i)["generated"]),
                         data_fraction=r.data_fraction,
                         trust_remote_code=cfg.teacher.trust_remote_code if r.source == "teacher"
                         else s.trust_remote_code, vllm=_vllm_settings(cfg.teacher, r.source == "teacher"))


def _vllm_settings(teacher, parallel: bool) -> dict:
    """vLLM's start-up settings for generation: the teacher's (its parallelism only for the teacher)."""
    keys = ("dtype", "gpu_memory_utilization", "max_num_seqs", "enforce_eager")
    keys += ("tensor_parallel_size", "pipeline_parallel_size") if parallel else ()
    return {k: getattr(teacher, k) for k in keys}


def round_data(cfg: PipelineConfig, s: StudentConfig, i: int):
    """(data config, cache config) stage one and two read in round i."""
    if s.rounds[i].source == "data":
        return cfg.data, cfg.cache
    from stages.generate.generation import generated_data

    paths = round_paths(cfg, s, i)
    return generated_data(cfg.data, str(paths["generated"])), dataclasses.replace(cfg.cache, path=str(paths["cache"]))


def round_record(cfg: PipelineConfig, s: StudentConfig, i: int, memo: dict | None = None) -> dict:
    """What round i's done.json records: the student's record with the rounds up to i (the last
    round's is exactly the student's, so pipeline.student_record sees a finished student)."""
    from pipeline.student_record import expected_record

    if i == len(s.rounds) - 1:
        return expected_record(cfg, s, memo)
    partial = copy.deepcopy(s)
    partial.rounds = s.rounds[: i + 1]
    return {**expected_record(cfg, partial, memo), "round": i}


def round_student(cfg: PipelineConfig, s: StudentConfig, i: int) -> StudentConfig:
    """The StudentConfig stage two trains round i with."""
    r = copy.deepcopy(s)
    r.rounds = []
    r.optim.max_steps, r.optim.epochs = s.rounds[i].steps, None
    model = start_model(cfg, s, i)
    if model:
        r.model, r.init = model, None
    return r


def run_rounds(cfg: PipelineConfig, s: StudentConfig, retrain) -> bool:
    """Every round of student `s` that is not done, in order (module doc). True if anything ran."""
    from pipeline.student_record import USABLE, StaleStudentError, clear_for_retrain, student_states
    from stages.training.layout import read_done
    from storage.diff import changes

    if s.name in retrain:
        if rounds_dir(cfg, s.name).exists():
            _log(f"--retrain {s.name}: removing {rounds_dir(cfg, s.name)} (its rounds) to train it anew")
            shutil.rmtree(rounds_dir(cfg, s.name))
        clear_for_retrain(cfg, s.name)
    state = student_states(cfg)[s.name]
    if state.kind in USABLE:
        _log(f"student {s.name!r} is already trained ({len(s.rounds)} rounds, {runner.student_dir(cfg, s.name)}/final)"
             "; skipping")
        return False
    if s.init_from:
        parent = student_states(cfg)[s.init_from]
        if parent.kind not in USABLE:
            raise ConfigError(f"student {s.name!r} starts from student {s.init_from!r}, which is {parent.kind}:"
                                     f" run `atkd student --student {s.init_from}` first (or `atkd run`)")
    did = False
    for i, rnd in enumerate(s.rounds):
        out = round_paths(cfg, s, i)["student"]
        want = round_record(cfg, s, i)
        done = read_done(out)
        if done is not None:
            diff = changes(done.get("trained_from") or {}, want)
            if not diff:
                continue
            raise StaleStudentError(f"round {i} of student {s.name!r} ({out}) was trained from something else: "
                                    f"{'; '.join(diff[:4])}; rerun with --retrain {s.name}")
        _log(f"student {s.name!r} round {i + 1}/{len(s.rounds)}: {describe(rnd)}, {rnd.steps} steps")
        t0 = time.perf_counter()
        times = _generate_and_cache(cfg, s, i) if rnd.source != "data" else {}
        t1 = time.perf_counter()
        _train(cfg, s, i, want)
        times["training"] = time.perf_counter() - t1
        _log(f"student {s.name!r} round {i + 1}/{len(s.rounds)} took {time.perf_counter() - t0:.0f} s ("
             + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")")
        did = True
    return did


def _generate_and_cache(cfg: PipelineConfig, s: StudentConfig, i: int) -> dict[str, float]:
    """Round i's generation and stage one (each skipped when done); their wall times."""
    from stages.generate.generation import is_complete, run_generation
    from stages.teacher.capture import check_complete, run_capture

    job = generation_job(cfg, s, i)
    data_cfg, cache_cfg = round_data(cfg, s, i)
    t0 = time.perf_counter()
    if not is_complete(job.out):
        with runner.stage_log(cfg, "generate"):
            summary = run_generation(job)
        _log(f"round {i}: generated {summary.generated:,} responses with {summary.engine} in {summary.seconds:.0f} s "
             f"({summary.engine_start_seconds:.0f} s engine start-up; dropped {summary.overlong} over-long, "
             f"{summary.empty} empty) -> {job.out}")
    t1 = time.perf_counter()
    teacher = runner.cached_teacher(cfg)
    with runner.stage_log(cfg, "teacher"):
        if runner.cache_complete(cache_cfg.path):
            check_complete(data_cfg, teacher, cache_cfg)
        else:
            _log(f"round {i}: stage one caching {runner.describe_targets(teacher)} of {teacher.model} on the "
                 f"generated rows into {cache_cfg.path}")
            run_capture(data_cfg, teacher, cache_cfg)
    return {"generation": t1 - t0, "stage one": time.perf_counter() - t1}


def _train(cfg: PipelineConfig, s: StudentConfig, i: int, record: dict) -> None:
    from stages.student.trainer import train_student
    from stages.teacher.identity import check_for_students
    from storage.cache import Cache

    data_cfg, cache_cfg = round_data(cfg, s, i)
    runner.require_training_cache(cache_cfg.path)
    top_k, notes = check_for_students(Cache.open(cache_cfg.path), data_cfg, runner.cached_teacher(cfg))
    out = round_paths(cfg, s, i)["student"]
    runner.remove_student_partials(out)  # leftovers of a killed save in this round's directory
    runner.record_run(cfg)
    with runner.stage_log(cfg, "student"):
        train_student(round_student(cfg, s, i), cache_url=cache_cfg.path, out_dir=str(out),
                      tokenizer_path=cfg.teacher.model or None, top_k=top_k, data_cfg=data_cfg, record=record)


def describe(r) -> str:
    if r.source == "data":
        return "data (the training cache)"
    g = r.generate
    mix = f", {r.data_fraction:g} of prompts keep the dataset's response" if r.data_fraction else ""
    what = "SeqKD: the teacher's generations" if r.source == "teacher" else "on-policy: the student's generations"
    return f"{what} (n={g.n}, temperature {g.temperature:g}, top_p {g.top_p:g}, <= {g.max_new_tokens} new tokens{mix})"


def rounds_lines(cfg: PipelineConfig, s: StudentConfig) -> list[str]:
    """One line per round for `atkd status` and --dry-run: what it trains on and what of it is done."""
    from stages.generate.generation import MANIFEST, done_shards
    from stages.training.layout import last_checkpoint, read_done

    lines = []
    for i, r in enumerate(s.rounds):
        p = round_paths(cfg, s, i)
        parts = []
        if r.source != "data":
            manifest = p["generated"] / MANIFEST
            if manifest.is_file():
                import json

                total = len(json.loads(manifest.read_text())["shard_plan"])
                parts.append(f"generation {len(done_shards(str(p['generated']), total))}/{total} shards")
            else:
                parts.append("generation not started")
            cache = runner.open_cache(str(p["cache"]))
            parts.append(f"cache {len(cache.completed_shards())}/{cache.num_shards} shards" if cache is not None
                         else "cache not started")
        if read_done(p["student"]) is not None:
            parts.append("trained")
        else:
            ckpt = last_checkpoint(p["student"])
            parts.append(f"training in progress ({ckpt.name})" if ckpt else "training not started")
        lines.append(f"  round {i}: {describe(r)}, {r.steps} steps: {', '.join(parts)}")
    return lines
