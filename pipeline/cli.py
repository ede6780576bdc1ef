"""The `atkd` command line (also `python -m pipeline`).

    atkd run     [pipeline.yaml] [a.b=c ...] [--retrain NAME]   every stage not done yet, then the report
    atkd teacher [pipeline.yaml] [--workers N|auto] [--ray [ADDRESS]] [a.b=c ...]   stage one: cache the teacher
    atkd finetune [pipeline.yaml] [a.b=c ...]  teacher.finetune only (runs under torchrun too)
    atkd student [pipeline.yaml] [--student NAME] [a.b=c ...]   stage two
    atkd eval    [pipeline.yaml] [a.b=c ...]   evaluate students + teacher, write the report
    atkd sweep   SWEEP.yaml [a.b=c ...] [--dry-run]   students x seeds x teachers, report with 95% intervals
    atkd status  [pipeline.yaml]               what is done
    atkd verify  [CACHE_OR_CONFIG]             check every shard of a cache
    atkd inspect [CACHE_OR_CONFIG] [--shards N]   counts, size, teacher uncertainty, provenance

The config defaults to ./pipeline.yaml. Arguments containing '=' are overrides,
anywhere on the line. run/teacher/student take --dry-run, run/student --retrain NAME;
-v shows engine and library logs on the console (they always go to <run_dir>/logs/<stage>.log).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pipeline import orchestrator as runner
from pipeline.config import ConfigError, PipelineConfig, load_config
from storage.errors import AtkdError

DEFAULT_CONFIG = "pipeline.yaml"


def _split_args(items: list[str]) -> tuple[str, list[str]]:
    """First non-override argument is the config path; the rest must be overrides."""
    config, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif not item.endswith((".yaml", ".yml")) and not os.path.exists(item):
            raise ConfigError(f"argument {item!r} is neither a config file nor an override: "
                              "overrides are key.path=value (e.g. teacher.top_k=32)")
        elif config is None:
            config = item
        else:
            raise ConfigError(
                f"unexpected argument {item!r}: give one config file and then key.path=value overrides"
            )
    return config or DEFAULT_CONFIG, overrides


def _load(items: list[str]) -> PipelineConfig:
    path, overrides = _split_args(items)
    return load_config(path, overrides)


def _apply_workers(cfg: PipelineConfig, args) -> None:
    if getattr(args, "workers", None) is not None:
        cfg.teacher.num_workers = args.workers if args.workers == "auto" else _positive_int(args.workers)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"--workers: expected a number >= 1 or auto, got {text!r}")
    return value


def _dry_run(args, cfg: PipelineConfig, only_student: str | None = None) -> int | None:
    """With --dry-run: print the plan and return the exit code (1 when it found problems the run
    would fail on); None without --dry-run."""
    if not getattr(args, "dry_run", False):
        return None
    from pipeline.dryrun import plan

    text, problems = plan(cfg, args.command, only_student, getattr(args, "retrain", None))
    print(text)
    if problems:
        print(f"atkd: the dry run found {len(problems)} problem(s) the run would stop at (marked PROBLEM above)",
              file=sys.stderr)
    return 1 if problems else 0


def cmd_teacher(args) -> int:
    ray = args.ray
    if ray and (ray.endswith((".yaml", ".yml")) or "=" in ray):  # `--ray cfg.yaml`: no address given
        args.rest, ray = [ray, *args.rest], ""
    cfg = _load(args.rest)
    _apply_workers(cfg, args)
    rc = _dry_run(args, cfg)
    if rc is not None:
        return rc
    from pipeline.evaluation import check_overlap

    runner.prepare(cfg)
    check_overlap(cfg, unreadable_ok=True)
    runner.run_teacher(cfg, ray_address=ray)
    runner.record_run(cfg)
    return 0


def cmd_finetune(args) -> int:
    cfg = _load(args.rest)
    if not cfg.teacher.finetune.enabled:
        raise ConfigError("teacher.finetune.enabled is false: there is no teacher fine-tune to run")
    runner.prepare(cfg)
    runner.run_finetune(cfg)
    runner.record_run(cfg)
    return 0


def cmd_student(args) -> int:
    cfg = _load(args.rest)
    names = [cfg.student(args.student).name] if args.student else [s.name for s in cfg.students]
    if not names:
        raise ConfigError("no students in the config: add a `students:` list to pipeline.yaml")
    rc = _dry_run(args, cfg, args.student and names[0])
    if rc is not None:
        return rc
    from pipeline.evaluation import check_overlap
    from pipeline.student_record import refuse_stale, retrain_set, student_states

    runner.prepare(cfg)
    again = retrain_set(cfg, args.retrain or [])
    states = student_states(cfg)
    refuse_stale(cfg, {n: states[n] for n in names}, again)
    check_overlap(cfg, unreadable_ok=True)
    for name in names:
        runner.run_student(cfg, cfg.student(name), again)
    runner.record_run(cfg)
    return 0


def cmd_eval(args) -> int:
    from pipeline.evaluation import format_results, load_results, run_eval

    cfg = _load(args.rest)
    runner.prepare(cfg)
    results = run_eval(cfg, force=args.force, standalone=True)  # None: results.json is current
    print(format_results(results if results is not None else load_results(cfg)))
    runner.record_run(cfg)
    return 0


def cmd_run(args) -> int:
    from pipeline.evaluation import format_results, load_results

    cfg = _load(args.rest)
    _apply_workers(cfg, args)
    rc = _dry_run(args, cfg)
    if rc is not None:
        return rc
    t0 = time.time()
    did_work = runner.run_all(cfg, retrain=args.retrain)
    if not did_work:
        print(f"[atkd] everything in {cfg.run_dir} is already done and matches the config; nothing to do "
              f"(--retrain NAME retrains a student; delete {cfg.run_dir}/eval to re-evaluate)")
    results = load_results(cfg)
    if results is not None:
        print(format_results(results))
    print(f"[atkd] run finished in {time.time() - t0:.0f} s; report: {Path(cfg.run_dir) / 'report' / 'report.md'}")
    return 0


def cmd_sweep(args) -> int:
    from pipeline.sweep import load_sweep, plan, plan_text, run_sweep

    path, overrides = _split_args(args.rest)
    if not any(item == path for item in args.rest):
        raise ConfigError("atkd sweep: give the sweep file (e.g. sweeps/demo-sweep.yaml)")
    spec = load_sweep(path, overrides)
    runs = plan(spec)
    if args.dry_run:
        print(plan_text(spec, runs))
        return 0
    t0 = time.time()
    report = run_sweep(spec, runs)
    print(f"[atkd sweep] finished in {time.time() - t0:.0f} s; report: {report}")
    return 0


def cmd_status(args) -> int:
    from pipeline.status import status_text

    cfg = _load(args.rest)
    print(status_text(cfg))
    return 0


def _cache_targets(args) -> list[tuple[str, str]]:
    """(label, path/URL) of the caches to look at: the one given, or a config's training cache and,
    when the run has one, its validation cache (with the config's overrides)."""
    target = args.target or DEFAULT_CONFIG
    if not target.endswith((".yaml", ".yml")):
        if args.rest:
            raise ConfigError(f"overrides {args.rest} only apply to a config file, and {target!r} is a cache")
        return [("cache", target)]
    cfg = load_config(target, args.rest)
    targets = [("training", cfg.cache.path)] if runner.needs_training_cache(cfg) else []
    if runner.validation_job(cfg) is not None:
        targets.append(("validation", runner.val_cache_path(cfg)))
    return targets or [("training", cfg.cache.path)]


def cmd_verify(args) -> int:
    from storage.cache import Cache
    from storage.verify import verify_cache

    ok = True
    for label, url in _cache_targets(args):
        if label == "validation" and not Cache.exists(url):
            print(f"validation cache {url}: not written yet (stage one writes it for evaluation)")
            continue
        report = verify_cache(url)
        print(report.summary())
        ok = ok and report.ok
    return 0 if ok else 1


def cmd_inspect(args) -> int:
    from storage.inspect import inspect_cache

    for label, url in _cache_targets(args):
        if label == "validation":
            continue  # the training cache is what students learn from; `atkd inspect <cache-val>` shows the other
        print(inspect_cache(url, max_shards=args.shards).text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atkd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show engine and library logs on the console (always in <run_dir>/logs/)")
    sub = p.add_subparsers(dest="command", required=True)
    # -v after the subcommand too; SUPPRESS keeps a top-level -v from being reset by the subparser.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="also show engine and library logs on the console (always in <run_dir>/logs/)")

    def parser(name: str, fn, help_text: str, description: str):
        sp = sub.add_parser(name, help=help_text, description=description, parents=[verbose],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(fn=fn)
        return sp

    def add(name: str, fn, help_text: str, description: str, *, dry_run: bool = False,
            metavar: str = "[CONFIG] [key=value ...]"):
        sp = parser(name, fn, help_text, description)
        sp.add_argument("rest", nargs="*", metavar=metavar)
        if dry_run:
            sp.add_argument("--dry-run", action="store_true",
                            help="say what would run (data rows, shards, cache size, students, what is done or "
                                 "stale, problems the run would stop at) and run nothing; exit 1 on a problem")
        return sp

    workers_help = ("teacher worker processes on this node, each on its own GPUs "
                    "(N or auto; default teacher.num_workers)")
    retrain_help = ("train this student anew (and the students continuing from it), e.g. after its data or "
                    "settings changed; repeat it or give NAME,NAME")
    sp = add("run", cmd_run, "run every stage that is not done yet",
             "Every stage of the config that is not done yet: the teacher fine-tune, stage one, the students,\n"
             "evaluation and the report. Finished work is checked against the config first: a student trained\n"
             "from other data or settings is refused until --retrain NAME (or its directory is deleted).",
             dry_run=True)
    sp.add_argument("--workers", help=workers_help)
    sp.add_argument("--retrain", action="append", metavar="NAME", help=retrain_help)
    sp = add("teacher", cmd_teacher, "stage one: cache the teacher's top-k log-probs",
             "Stage one: score the training data with the teacher and write the cache (resumes a killed run).",
             dry_run=True)
    sp.add_argument("--workers", help=workers_help)
    sp.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="run the workers as Ray actors on the cluster at ADDRESS (default: RAY_ADDRESS, else a "
                         "local one); needs atkd[ray]")
    add("finetune", cmd_finetune, "teacher.finetune only: fine-tune the teacher (torchrun for many GPUs)",
        "teacher.finetune only: plain SFT of teacher.model on the training rows into <run_dir>/teacher-finetuned/\n"
        "(runs under torchrun too; a finished fine-tune is never trained again).")
    sp = add("student", cmd_student, "stage two: train the students",
             "Stage two: train every student (or --student NAME) from the teacher cache or the rows.", dry_run=True)
    sp.add_argument("--student", help="train only this student (by name)")
    sp.add_argument("--retrain", action="append", metavar="NAME", help=retrain_help)
    sp = add("eval", cmd_eval, "evaluate students and teacher, write the report",
             "Evaluate every trained student and the teacher (the validation cache is written first when missing),\n"
             "then write the report. A student not trained yet is left out, said so; a stale one is refused.\n"
             "Results computed from the same models, data and settings are kept (nothing runs).")
    sp.add_argument("--force", action="store_true", help="evaluate again even when results.json is current")
    add("sweep", cmd_sweep, "students x seeds x teachers, each an `atkd run`; report with 95%% intervals",
        "A sweep file: students x seeds x teachers, each an ordinary `atkd run`; report with 95% intervals.",
        dry_run=True, metavar="SWEEP [key=value ...]")
    add("status", cmd_status, "show what is done",
        "What of the run is done: the fine-tune, the training and validation caches (checked against the\n"
        "config), each student (done, stale and why, in progress, not started) and the evaluation.")
    for name, fn, help_text, description in (
            ("verify", cmd_verify, "verify every shard of a cache",
             "Check every shard of a cache (or of a config's training and validation caches); exit 1 naming\n"
             "each bad shard."),
            ("inspect", cmd_inspect, "what a cache holds: counts, size, teacher uncertainty",
             "What a cache holds and how it was made: counts, bytes, the teacher's uncertainty, provenance.")):
        sp = parser(name, fn, help_text, description)
        sp.add_argument("target", nargs="?", help="cache path/URL or a config file (default ./pipeline.yaml)")
        sp.add_argument("rest", nargs="*", metavar="key=value")
    sp.add_argument("--shards", type=int, default=8, metavar="N",
                    help="read at most N shards for the histogram and top-k mass (default 8)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but key=value (and the config path) may come anywhere, e.g. after --student NAME.

    argparse stops filling the positional list at the first option; whatever
    positional text it could not place is handed back here and appended in order.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    options = [a for a in extra if a.startswith("-")]
    if options:
        parser.error(f"unrecognized arguments: {' '.join(options)} (see `atkd {args.command} --help`)")
    if extra and getattr(args, "target", "") is None:
        args.target, extra = extra[0], extra[1:]
    args.rest = list(args.rest) + extra
    return args


def _os_error_hint(e: BaseException) -> str:
    """What to do about a filesystem error (the message itself says what and where)."""
    import errno

    code = getattr(e, "errno", None) if isinstance(e, OSError) else None
    keep = "work already completed (committed shards, checkpoints) is kept; rerun the same command to continue"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = getattr(e, "filename", None) or "the output directory"
        return (f"cannot write {where}: make its directory writable, or point cache.path / run_dir at a "
                f"writable place; {keep}")
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"the disk (or quota) is full: free space; {keep}"
    return ""


# Commands that may start processes (engines, workers, DataLoader workers): they get a watchdog.
STARTS_PROCESSES = ("run", "teacher", "finetune", "student", "eval", "sweep")


def main(argv: list[str] | None = None) -> int:
    """The CLI; `argv` None: this process's own command line (`atkd ...`, `python -m pipeline ...`)."""
    args = parse_args(argv)
    from stages.logs import set_verbose

    set_verbose(args.verbose)
    reaper = None
    if argv is None and args.command in STARTS_PROCESSES and not getattr(args, "dry_run", False):
        from stages.reaper import start

        reaper = start()  # what this command starts dies with it, even on kill -9 (stages/reaper.py)
    try:
        return _run_command(args)
    finally:
        if reaper is not None:
            reaper.stop()


def _run_command(args) -> int:
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"atkd: config error: {e}", file=sys.stderr)
        return 2
    except AtkdError as e:
        # Data, model, cache and disk problems carry messages written for the user; ATKD_DEBUG=1
        # shows the traceback too. Any other exception is a bug and keeps its traceback.
        if os.environ.get("ATKD_DEBUG"):
            raise
        print(f"atkd: {type(e).__name__}: {e}", file=sys.stderr)
        hint = _os_error_hint(e)
        if hint:
            print(f"atkd: {hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("atkd: interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
