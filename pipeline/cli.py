"""The `atkd` command line (also `python -m pipeline`).

    atkd run     [pipeline.yaml] [a.b=c ...]   every stage not done yet, then the report
    atkd teacher [pipeline.yaml] [--workers N|auto] [--ray [ADDRESS]] [a.b=c ...]   stage one: the teacher's top-k
    atkd finetune [pipeline.yaml] [a.b=c ...]  teacher.finetune only (runs under torchrun too)
    atkd student [pipeline.yaml] [--student NAME] [a.b=c ...]   stage two
    atkd eval    [pipeline.yaml] [a.b=c ...]   evaluate students + teacher, write the report
    atkd sweep   SWEEP.yaml [a.b=c ...] [--dry-run]   students x seeds x teachers, report with 95% intervals
    atkd status  [pipeline.yaml]               what is done
    atkd verify  [CACHE_OR_CONFIG]             check every shard of a cache
    atkd inspect [CACHE_OR_CONFIG] [--shards N]   counts, size, teacher uncertainty, provenance

The config defaults to ./pipeline.yaml. Arguments containing '=' are overrides,
anywhere on the line. run/teacher/student take --dry-run; -v shows engine and
library logs on the console (they always go to <run_dir>/logs/<stage>.log).
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


def _dry_run(args, cfg: PipelineConfig, only_student: str | None = None) -> bool:
    """With --dry-run: print the plan and return True (the command then does nothing else)."""
    if not getattr(args, "dry_run", False):
        return False
    from pipeline.dryrun import plan_text

    print(plan_text(cfg, args.command, only_student))
    return True


def cmd_teacher(args) -> int:
    ray = args.ray
    if ray and (ray.endswith((".yaml", ".yml")) or "=" in ray):  # `--ray cfg.yaml`: no address given
        args.rest, ray = [ray, *args.rest], ""
    cfg = _load(args.rest)
    _apply_workers(cfg, args)
    if _dry_run(args, cfg):
        return 0
    runner.prepare(cfg)
    runner.run_teacher(cfg, ray_address=ray)
    return 0


def cmd_finetune(args) -> int:
    cfg = _load(args.rest)
    if not cfg.teacher.finetune.enabled:
        raise ConfigError("teacher.finetune.enabled is false: there is no teacher fine-tune to run")
    runner.prepare(cfg)
    runner.run_finetune(cfg)
    return 0


def cmd_student(args) -> int:
    cfg = _load(args.rest)
    names = [cfg.student(args.student).name] if args.student else [s.name for s in cfg.students]
    if not names:
        raise ConfigError("no students in the config: add a `students:` list to pipeline.yaml")
    if _dry_run(args, cfg, args.student and names[0]):
        return 0
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
    if _dry_run(args, cfg):
        return 0
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


def cmd_sweep(args) -> int:
    from pipeline.sweep import load_sweep, plan, plan_text, run_sweep

    path, overrides = _split_args(args.rest)
    if not any(item == path for item in args.rest):
        raise ConfigError("atkd sweep: give the sweep file (e.g. configs/demo-sweep.yaml)")
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
    cfg = _load(args.rest)
    print(runner.status_text(cfg))
    return 0


def _cache_target(args) -> str:
    """A cache path/URL, or the cache.path of a config file (with its overrides)."""
    target = args.target or DEFAULT_CONFIG
    if target.endswith((".yaml", ".yml")):
        return load_config(target, args.rest).cache.path
    if args.rest:
        raise ConfigError(f"overrides {args.rest} only apply to a config file, and {target!r} is a cache")
    return target


def cmd_verify(args) -> int:
    from storage.verify import verify_cache

    report = verify_cache(_cache_target(args))
    print(report.summary())
    return 0 if report.ok else 1


def cmd_inspect(args) -> int:
    from storage.inspect import inspect_cache

    print(inspect_cache(_cache_target(args), max_shards=args.shards).text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atkd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show engine and library logs on the console (always in <run_dir>/logs/)")
    sub = p.add_subparsers(dest="command", required=True)
    # -v after the subcommand too; SUPPRESS keeps a top-level -v from being reset by the subparser.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def add(name: str, fn, help_text: str, *, dry_run: bool = False):
        sp = sub.add_parser(name, help=help_text, parents=[verbose])
        sp.add_argument("rest", nargs="*", metavar="[CONFIG] [key=value ...]")
        if dry_run:
            sp.add_argument("--dry-run", action="store_true",
                            help="say what would run (data rows, shards, cache size, students) and run nothing")
        sp.set_defaults(fn=fn)
        return sp

    workers_help = ("teacher worker processes on this node, each on its own GPUs "
                    "(N or auto; default teacher.num_workers)")
    add("run", cmd_run, "run every stage that is not done yet",
        dry_run=True).add_argument("--workers", help=workers_help)
    sp = add("teacher", cmd_teacher, "stage one: cache teacher top-k log-probs", dry_run=True)
    sp.add_argument("--workers", help=workers_help)
    sp.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="run the workers as Ray actors on the cluster at ADDRESS (default: RAY_ADDRESS, else a "
                         "local one); needs atkd[ray]")
    add("finetune", cmd_finetune, "teacher.finetune only: fine-tune the teacher (torchrun for many GPUs)")
    sp = add("student", cmd_student, "stage two: train the students", dry_run=True)
    sp.add_argument("--student", help="train only this student (by name)")
    add("eval", cmd_eval, "evaluate students and teacher, write the report")
    add("sweep", cmd_sweep, "students x seeds x teachers, each an `atkd run`; report with 95%% intervals",
        dry_run=True)
    add("status", cmd_status, "show what is done")
    for name, fn, help_text in (("verify", cmd_verify, "verify every shard of a cache"),
                                ("inspect", cmd_inspect, "what a cache holds: counts, size, teacher uncertainty")):
        sp = sub.add_parser(name, help=help_text, parents=[verbose])
        sp.add_argument("target", nargs="?", help="cache path/URL or a config file (default ./pipeline.yaml)")
        sp.add_argument("rest", nargs="*", metavar="key=value")
        sp.set_defaults(fn=fn)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from stages.logs import set_verbose

    set_verbose(args.verbose)
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
