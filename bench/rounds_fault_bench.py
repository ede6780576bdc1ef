"""Fault injection for distillation rounds (issue 22): SIGKILL `atkd student` on a student with a data
round, a SeqKD round and an on-policy round, many times, and compare with an uninterrupted run.

    python bench/rounds_fault_bench.py [--kills 16] [--seed 0] [--root DIR]

Each campaign runs on a fresh run directory (the training cache is built first, unkilled) and kills
`atkd student` at seeded crash points of the generation stage (a shard generated, not committed;
committed), of the rounds' stage one (mid-shard write, before/after the commit rename) and of stage
two (after a step, mid-checkpoint, around the checkpoint rename), and after seeded random delays,
rerunning it each time. The finished run must equal the uninterrupted one bit for bit: every round's
generated rows, every round's teacher cache (arrays and manifest, timestamps aside) and the final
student (per-step log records and weights).

Prints counts: kills, resumes, mismatches (must be 0). Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import harness as fh  # noqa: E402
from tests.support.ending_model import rounds_list, rounds_workspace, write_rounds_config  # noqa: E402

POINTS = ("generate.scored", "generate.committed", "shard.write", "shard.commit", "shard.committed",
          "student.step", "ckpt.model", "ckpt.rename")
def config(ws, name: str) -> Path:
    return Path(write_rounds_config(ws["root"] / f"{name}.yaml", ws["root"] / name, ws, rounds_list(3)))


def snapshot(run: Path) -> dict:
    rounds = {}
    for i in (1, 2):
        base = run / "rounds" / "op" / f"round-{i}"
        rows = [line for f in sorted(base.glob("generated/rows/*.jsonl")) for line in f.read_text().splitlines()]
        manifest = json.loads((base / "generated" / "manifest.json").read_text())
        for key in ("created_at", "model"):  # when, and where the generating model lived (the run's directory)
            manifest.pop(key, None)
        rounds[i] = {"rows": rows, "manifest": manifest, "cache": fh.cache_snapshot(str(base / "cache"))}
    return {"rounds": rounds, "student": fh.student_snapshot(run / "students" / "op")}


def compare(a: dict, b: dict) -> list[str]:
    diffs = []
    for i in a["rounds"]:
        ra, rb = a["rounds"][i], b["rounds"][i]
        if ra["rows"] != rb["rows"] or ra["manifest"] != rb["manifest"]:
            diffs.append(f"round {i}: generated rows differ")
        diffs += [f"round {i}: {d}" for d in fh.compare_caches(ra["cache"], rb["cache"])]
    return diffs + fh.compare_students(a["student"], b["student"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=16, help="at least this many kills")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", help="work directory (default: a temporary one)")
    args = p.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="rounds-faults-"))
    ws = {"root": root, **rounds_workspace(root)}
    ref_cfg = config(ws, "ref")
    for cmd in ("teacher", "student"):
        t0 = time.perf_counter()
        rc, out = fh.run_atkd([cmd, str(ref_cfg)], root / "logs" / f"ref-{cmd}.log")
        assert rc == 0, out
    ref_s = time.perf_counter() - t0  # the student command's
    ref = snapshot(root / "ref")
    rng = random.Random(args.seed)
    total, n = fh.Counts(), 0
    while total.kills < args.kills:
        name = f"rounds-{n:02d}"
        cfg = config(ws, name)
        rc, out = fh.run_atkd(["teacher", str(cfg)], root / "logs" / name / "teacher.log")
        assert rc == 0, out
        plan = fh.random_kill_plan(rng, POINTS, max_hit=3, n_points=5, n_timed=2, max_delay=0.7 * ref_s)
        counts = fh.run_campaign(["student", str(cfg)], plan, root / "logs" / name)
        diffs = compare(snapshot(root / name), ref)
        counts.compared(name, plan, diffs)
        total.add(counts)
        n += 1
    print(f"\n| campaigns | attempts | kills | resumes | missed kills | mismatches |\n|---:|---:|---:|---:|---:|---:|\n"
          f"| {n} | {total.attempts} | {total.kills} | {total.resumes} | {total.missed} | {total.mismatches} |")
    for note in total.notes:
        print(note)
    return 1 if total.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
