"""Long fault-injection run (issue 6): SIGKILL `atkd teacher` and `atkd student` many times.

    python bench/fault_bench.py [--kills 24] [--seed 0] [--mode fork|subprocess] [--root DIR]
                                [--backend local|s3] [--stages teacher,student,workers]
    python bench/fault_bench.py --engine vllm-hidden --stages teacher --kills 6   # stage one on vLLM's hidden route

Per stage, campaigns on fresh run directories until at least --kills kills:
each campaign kills the command at seeded crash points (mid-shard write,
before/after the commit rename, mid-manifest replace; for students after a
step, mid-checkpoint write, before/after the checkpoint rename) and after
seeded random delays, reruns it each time, and compares the finished result
with an uninterrupted run bit for bit (cache arrays + manifest without
timestamps; per-step log records + final weights). Then rounds of four
concurrent teacher workers on one cache, two of them killed: no shard
committed twice, none missing, `atkd verify` clean, content equal.

With --backend s3 the teacher caches of the campaigns and of the worker rounds live
in s3://faults/ on a local S3 server (moto on 127.0.0.1, tests/support/s3.py) instead of a
local directory; the references stay local, so equality is checked across backends.

`--engine vllm-hidden` runs stage one on vLLM's hidden-state route (backend vllm,
vllm_route hidden, vLLM in-process so that every attempt computes with the same
threads); each attempt then starts vLLM (~30-60 s on a 2-core CPU), so use it with
`--stages teacher` and few kills.

Prints counts: kills, resumes, mismatches (must be 0). Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import harness as fh  # noqa: E402

SHARDS = 8  # 40 rows, 5 per shard
ENGINE = {}  # teacher settings over write_config's (transformers) ones: set from --engine in main


def config(ws, path: Path, run_dir: Path, cache: Path) -> Path:
    cfg = fh.write_config(path, model=ws["model"], data=ws["data"], run_dir=str(run_dir), cache=str(cache))
    if ENGINE:
        import yaml

        raw = yaml.safe_load(cfg.read_text())
        raw["teacher"].update(ENGINE)
        cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return cfg


def cache_location(ws, name: str, args) -> str:
    """Where a run's teacher cache goes: its run directory, or a prefix of the S3 bucket."""
    return f"s3://faults/{name}/cache" if args.backend == "s3" else str(ws["root"] / name / "cache")


def campaigns(stage: str, ws, ref, args, rng) -> fh.Counts:
    """Kill-and-rerun campaigns of `atkd teacher` or `atkd student` until args.kills kills."""
    teacher = stage == "teacher"
    points, max_hit = (fh.TEACHER_POINTS, 2) if teacher else (fh.STUDENT_POINTS, 3)
    total, n = fh.Counts(), 0
    while total.kills < args.kills:
        name = f"{stage}-{n:02d}"
        run = ws["root"] / name
        cache = cache_location(ws, name, args) if teacher else ws["root"] / "ref" / "cache"  # students: the ref
        cfg = config(ws, ws["root"] / f"{name}.yaml", run, cache)
        plan = fh.random_kill_plan(rng, points, max_hit=max_hit, n_points=4, n_timed=2,
                                   max_delay=0.7 * ref[f"{stage}_s"])
        counts = fh.run_campaign([stage, str(cfg)], plan, ws["root"] / "logs" / name, mode=args.mode, env=ws["env"])
        if teacher:
            diffs = fh.compare_caches(fh.cache_snapshot(str(cache)), ref["cache"])
        else:
            diffs = fh.compare_students(fh.student_snapshot(run / "students" / "s1"), ref["student"])
        counts.compared(name, plan, diffs)
        total.add(counts)
        n += 1
    return total


def worker_rounds(ws, ref, args, rng) -> fh.Counts:
    from pipeline import cli

    total = fh.Counts()
    for n in range(args.worker_rounds):
        name = f"workers-{n:02d}"
        cache = cache_location(ws, name, args)
        cfg = config(ws, ws["root"] / f"{name}.yaml", ws["root"] / name, cache)
        logs = ws["root"] / "logs" / name
        trace = logs / "trace.txt"  # every crash-point hit, "shard.committed" ones name their shard
        point = f"{rng.choice(fh.TEACHER_POINTS)}:{rng.randint(1, 2)}"
        envs = [{}, {"ATKD_FAULT_POINT": point}, {}, {}]
        procs = [fh.atkd(["teacher", str(cfg)], logs / f"w{i}.log", mode=args.mode,
                         env={**e, **ws["env"], "ATKD_FAULT_TRACE": str(trace)}) for i, e in enumerate(envs)]
        time.sleep(rng.uniform(0.3, ref["teacher_s"]))
        procs[2].kill()
        rcs = [p.wait(300) for p in procs]
        killed = sum(rc == -9 for rc in rcs)
        total.kills += killed
        total.attempts += len(procs)
        # Shards a killed worker held are finished by the survivors; a rerun picks up anything left.
        rc, _ = fh.run_atkd(["teacher", str(cfg)], logs / "rerun.log", mode=args.mode, env=ws["env"])
        total.resumes += 1
        written = fh.committed_shards(trace)  # the rerun is not traced
        twice = sorted({i for i in written if written.count(i) > 1})
        diffs = fh.compare_caches(fh.cache_snapshot(cache), ref["cache"])
        verify_rc = cli.main(["verify", cache])
        bad = bool(diffs or twice or rc != 0 or verify_rc != 0 or any(r not in (0, -9) for r in rcs))
        total.mismatches += bad
        if bad:
            total.notes.append(f"{name}: rcs {rcs} rerun {rc} verify {verify_rc} twice {twice} diffs {diffs[:5]}")
        print(f"  {name}: point {point}, exit codes {rcs}, killed {killed}, commits {len(written)} "
              f"(twice: {twice}), verify {'ok' if verify_rc == 0 else 'FAILED'}, mismatch {bad}", flush=True)
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=24, help="at least this many kills per stage")
    p.add_argument("--worker-rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["fork", "subprocess"], default="fork",
                   help="fork: warm forkserver children (fast); subprocess: `python -m` per attempt")
    p.add_argument("--root", help="work directory (default: a temporary one)")
    p.add_argument("--backend", choices=["local", "s3"], default="local",
                   help="where the teacher caches under test live (s3: a local S3 server)")
    p.add_argument("--engine", choices=["transformers", "vllm-hidden"], default="transformers",
                   help="stage one's engine (vllm-hidden: vLLM's hidden-state route, in-process)")
    p.add_argument("--stages", default="teacher,student,workers", help="which parts to run, comma-separated")
    args = p.parse_args()
    stages = args.stages.split(",")
    if args.engine == "vllm-hidden":
        ENGINE.update(backend="vllm", vllm_route="hidden", max_num_seqs=64)
        os.environ["ATKD_VLLM_IN_PROCESS"] = "1"  # inherited by every attempt (and the forkserver)
    s3 = None
    if args.backend == "s3":
        from tests.support.s3 import LocalS3

        s3 = LocalS3().start()
        s3.apply_env()
        s3.make_bucket("faults")
    try:
        return run(args, stages, s3)
    finally:
        if s3 is not None:
            s3.stop()


def run(args, stages: list[str], s3) -> int:
    rng = random.Random(args.seed)
    root = Path(args.root or tempfile.mkdtemp(prefix="fault_bench-"))
    t0 = time.time()
    print(f"fault bench in {root} (mode {args.mode}, seed {args.seed}, engine {args.engine}, teacher caches on "
          f"{args.backend})", flush=True)
    ws = fh.make_workspace(root)
    ws["env"] = s3.env() if s3 is not None else {}

    cfg = config(ws, root / "ref.yaml", root / "ref", root / "ref" / "cache")
    fh.run_atkd(["status", str(cfg)], root / "logs" / "warmup.log", mode=args.mode)  # start the forkserver
    t = time.monotonic()
    rc, out = fh.run_atkd(["teacher", str(cfg)], root / "logs" / "ref-teacher.log", mode=args.mode)
    assert rc == 0, out
    teacher_s = time.monotonic() - t
    student_s, student = 0.0, None
    if "student" in stages:
        t = time.monotonic()
        rc, out = fh.run_atkd(["student", str(cfg)], root / "logs" / "ref-student.log", mode=args.mode)
        assert rc == 0, out
        student_s, student = time.monotonic() - t, fh.student_snapshot(root / "ref" / "students" / "s1")
    ref = {"cache": fh.cache_snapshot(str(root / "ref" / "cache")), "teacher_s": teacher_s,
           "student": student, "student_s": student_s}
    assert len(ref["cache"]["shards"]) == SHARDS
    print(f"reference runs: teacher {teacher_s:.1f} s, student {student_s:.1f} s", flush=True)

    results = {}
    if "teacher" in stages:
        print("stage one (atkd teacher):", flush=True)
        results["teacher"] = campaigns("teacher", ws, ref, args, rng)
    if "student" in stages:
        print("stage two (atkd student):", flush=True)
        results["student"] = campaigns("student", ws, ref, args, rng)
    if "workers" in stages:
        print("concurrent teacher workers:", flush=True)
        results["workers"] = worker_rounds(ws, ref, args, rng)

    print(f"\n{'':10s} {'kills':>6s} {'resumes':>8s} {'attempts':>9s} {'late':>5s} {'mismatches':>11s}")
    for stage, c in results.items():
        print(f"{stage:10s} {c.kills:6d} {c.resumes:8d} {c.attempts:9d} {c.missed:5d} {c.mismatches:11d}")
        for note in c.notes:
            print(f"    note: {note}")
    mismatches = sum(c.mismatches for c in results.values())
    print(f"total kills {sum(c.kills for c in results.values())}, resumes {sum(c.resumes for c in results.values())}, "
          f"mismatches {mismatches}; {time.time() - t0:.0f} s")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
