"""The `atkd` command line (also `python -m pipeline`).

    atkd run     [pipeline.yaml] [a.b=c ...]   every stage not done yet, then the report
    atkd teacher [pipeline.yaml] [--workers N|auto] [a.b=c ...]   stage one: cache the teacher's top-k log-probs
    atkd student [pipeline.yaml] [--student NAME] [a.b=c ...]   stage two
    atkd eval    [pipeline.yaml] [a.b=c ...]   evaluate students + teacher, write the report
    atkd status  [pipeline.yaml]               what is done
    atkd verify  [CACHE_OR_CONFIG]             check every shard of a cache

The config defaults to ./pipeline.yaml. Arguments containing '=' are overrides.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pipeline import orchestrator as runner
from pipeline.config import ConfigError, PipelineConfig, load_config

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


def cmd_teacher(args) -> int:
    cfg = _load(args.rest)
    _apply_workers(cfg, args)
    runner.prepare(cfg)
    runner.run_teacher(cfg)
    return 0


def cmd_student(args) -> int:
    cfg = _load(args.rest)
    names = [cfg.student(args.student).name] if args.student else [s.name for s in cfg.students]
    if not names:
        raise ConfigError("no students in the config: add a `students:` list to pipeline.yaml")
    runner.prepare(cfg)
    for name in names:
        runner.run_student(cfg, cfg.student(name))
    return 0


def cmd_eval(args) -> int:
    cfg = _load(args.rest)
    runner.prepare(cfg)
    results = runner.run_eval(cfg, force=True)
    print(runner.format_results(results))
    return 0


def cmd_run(args) -> int:
    cfg = _load(args.rest)
    _apply_workers(cfg, args)
    t0 = time.time()
    did_work = runner.run_all(cfg)
    if not did_work:
        print(f"[atkd] everything in {cfg.run_dir} is already done; nothing to do "
              f"(delete {cfg.run_dir}/eval to re-evaluate, or a student's directory to retrain it)")
    results = runner.load_results(cfg)
    if results is not None:
        print(runner.format_results(results))
    print(f"[atkd] run finished in {time.time() - t0:.0f} s; report: {Path(cfg.run_dir) / 'report' / 'report.md'}")
    return 0


def cmd_status(args) -> int:
    cfg = _load(args.rest)
    print(runner.status_text(cfg))
    return 0


def cmd_verify(args) -> int:
    from storage.verify import verify_cache

    target = args.target or DEFAULT_CONFIG
    url = target
    if target.endswith((".yaml", ".yml")):
        url = load_config(target, args.rest).cache.path
    report = verify_cache(url)
    print(report.summary())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atkd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help_text: str):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("rest", nargs="*", metavar="[CONFIG] [key=value ...]")
        sp.set_defaults(fn=fn)
        return sp

    workers_help = "teacher worker processes on this node, each on its own GPUs (N or auto; default teacher.num_workers)"
    add("run", cmd_run, "run every stage that is not done yet").add_argument("--workers", help=workers_help)
    add("teacher", cmd_teacher, "stage one: cache teacher top-k log-probs").add_argument("--workers", help=workers_help)
    sp = add("student", cmd_student, "stage two: train the students")
    sp.add_argument("--student", help="train only this student (by name)")
    add("eval", cmd_eval, "evaluate students and teacher, write the report")
    add("status", cmd_status, "show what is done")
    sp = sub.add_parser("verify", help="verify every shard of a cache")
    sp.add_argument("target", nargs="?", help="cache path/URL or a config file (default ./pipeline.yaml)")
    sp.add_argument("rest", nargs="*", metavar="key=value")
    sp.set_defaults(fn=cmd_verify)
    return p


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"atkd: config error: {e}", file=sys.stderr)
        return 2
    except runner.USER_ERRORS as e:
        # Data, model and cache problems carry messages written for the user;
        # ATKD_DEBUG=1 shows the traceback too.
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
