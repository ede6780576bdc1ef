"""Fault injection, short version: SIGKILL real `atkd teacher` / `atkd student` processes
at named crash points and at seeded random moments, rerun, and compare bit for bit
with an uninterrupted run. The long version is bench/fault_bench.py; concurrent
workers, some killed, are in tests/stages/teacher/test_teacher.py.

Processes come from a warm forkserver (tests/support/harness.py); one attempt per
stage runs as a plain `python -m pipeline` subprocess so the real entry point is covered.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.support import harness as fh

pytestmark = pytest.mark.integration

SEED = 6


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_llama_dir, train_jsonl):
    """The tiny teacher and 40 rows (8 shards of 5), and the uninterrupted teacher and student runs."""
    root = tmp_path_factory.mktemp("faults")
    ws = {"root": root, "model": str(tiny_llama_dir), "data": str(train_jsonl)}
    ref = config(ws, "ref")
    rc, out = fh.run_atkd(["teacher", str(ref)], root / "logs" / "ref-teacher.log")
    assert rc == 0, out
    rc, out = fh.run_atkd(["student", str(ref)], root / "logs" / "ref-student.log")
    assert rc == 0, out
    ws["ref_cache"] = fh.cache_snapshot(str(root / "ref" / "cache"))
    ws["ref_student"] = fh.student_snapshot(root / "ref" / "students" / "s1")
    assert len(ws["ref_cache"]["shards"]) == 8
    assert len(ws["ref_student"]["log"]) == 12
    return ws


def config(ws, name: str, *, cache: str | None = None) -> Path:
    root = ws["root"]
    return fh.write_config(root / f"{name}.yaml", model=ws["model"], data=ws["data"], run_dir=str(root / name),
                           cache=cache or str(root / name / "cache"))


def verify_ok(cache: str) -> None:
    from pipeline import cli

    assert cli.main(["verify", cache]) == 0


def test_teacher_killed_at_crash_points_and_random_moments_ends_bit_identical(ws):
    rng = random.Random(SEED)
    kills = ["shard.write:2", "shard.commit:1", "fs.replace.manifest.json:1", "shard.committed:2",
             round(rng.uniform(0.3, 1.5), 2)]
    cfg = config(ws, "teacher-kills")
    counts = fh.run_campaign(["teacher", str(cfg)], kills, ws["root"] / "logs" / "teacher-kills",
                             final_mode="subprocess")
    assert counts.kills >= 4 and counts.mismatches == 0, counts
    cache = str(ws["root"] / "teacher-kills" / "cache")
    assert fh.compare_caches(fh.cache_snapshot(cache), ws["ref_cache"]) == []
    verify_ok(cache)


def test_teacher_killed_after_the_last_commit_still_updates_the_manifest(ws):
    """Killed between the last shard's rename and the manifest update: the rerun sees
    every shard complete; the manifest must still end up listing them all."""
    cfg = config(ws, "teacher-last")
    counts = fh.run_campaign(["teacher", str(cfg)], ["shard.committed:8"], ws["root"] / "logs" / "teacher-last")
    assert counts.kills == 1
    cache = str(ws["root"] / "teacher-last" / "cache")
    assert fh.compare_caches(fh.cache_snapshot(cache), ws["ref_cache"]) == []


def test_student_killed_at_steps_and_checkpoint_writes_resumes_bit_identical(ws):
    rng = random.Random(SEED + 2)
    cfg = config(ws, "student-kills", cache=str(ws["root"] / "ref" / "cache"))
    kills = [f"student.step:{rng.randint(1, 4)}", "ckpt.model:1", "ckpt.rename:1", "ckpt.optim:2",
             "ckpt.renamed:2", round(rng.uniform(0.5, 2.0), 2)]
    # All attempts in the reference's launch mode: once (CI, heavy load) a final attempt started as a
    # plain subprocess resumed a fork-mode run and its last update differed from the reference in the
    # last bits. bench/fault_bench.py --mode subprocess covers the plain entry point (0 mismatches).
    counts = fh.run_campaign(["student", str(cfg)], kills, ws["root"] / "logs" / "student-kills")
    assert counts.kills >= 5, counts
    got = fh.student_snapshot(ws["root"] / "student-kills" / "students" / "s1")
    assert fh.compare_students(got, ws["ref_student"]) == []


def test_student_killed_while_resume_rewrites_its_log_keeps_the_earlier_steps(ws):
    cfg = config(ws, "student-log", cache=str(ws["root"] / "ref" / "cache"))
    """A resume first drops log lines past its checkpoint; a kill during that rewrite
    must not lose the steps before the checkpoint."""
    counts = fh.run_campaign(["student", str(cfg)], ["student.step:5", "log.rewrite:1"],
                             ws["root"] / "logs" / "student-log")
    assert counts.kills == 2
    got = fh.student_snapshot(ws["root"] / "student-log" / "students" / "s1")
    assert fh.compare_students(got, ws["ref_student"]) == []


def test_lossy_teacher_killed_ends_bit_identical_and_within_its_bound_of_the_exact_cache(ws):
    """cache.logprob_encoding u8-rel: killed captures resume bit for bit (the encoding is a pure
    function of the scored rows), and the cache decodes to the exact run's top-k within the bound."""
    import numpy as np

    from tests.support.target_kl import target_kl
    from storage.cache import Cache

    def lossy_config(name: str) -> Path:
        root = ws["root"]
        cache = {"path": str(root / name / "cache"), "sequences_per_shard": 5, "logprob_encoding": "u8-rel"}
        return fh.write_config(root / f"{name}.yaml", model=ws["model"], data=ws["data"], run_dir=str(root / name),
                               cache="", extra={"cache": cache})

    rc, out = fh.run_atkd(["teacher", str(lossy_config("lossy-ref"))], ws["root"] / "logs" / "lossy-ref.log")
    assert rc == 0, out
    ref = fh.cache_snapshot(str(ws["root"] / "lossy-ref" / "cache"))
    counts = fh.run_campaign(["teacher", str(lossy_config("lossy-kills"))],
                             ["shard.write:2", "shard.commit:1", "shard.committed:3"],
                             ws["root"] / "logs" / "lossy-kills")
    assert counts.kills == 3 and counts.mismatches == 0, counts
    cache = str(ws["root"] / "lossy-kills" / "cache")
    assert fh.compare_caches(fh.cache_snapshot(cache), ref) == []
    verify_ok(cache)

    lossy, exact = Cache.open(cache), Cache.open(str(ws["root"] / "ref" / "cache"))
    assert lossy.encoding.lossy and not exact.encoding.lossy
    for i in range(exact.num_shards):
        a, b = exact.read_shard(i), lossy.read_shard(i)
        gold = a.input_ids[a.seq_offsets[np.repeat(np.arange(a.num_sequences), np.diff(a.target_offsets))]
                           + a.target_positions + 1]
        kl = target_kl(a.topk_ids, a.topk_logprobs, b.topk_ids, b.topk_logprobs, gold, a.target_logprobs,
                       lossy.vocab_size)
        assert kl.max() <= lossy.encoding.kl_bound, (i, kl.max())


def test_sampled_teacher_killed_at_crash_points_ends_bit_identical(ws):
    """teacher.targets=sampled (cache format v2): killed at crash points and a random moment,
    the rerun's cache equals an uninterrupted sampled run's, draws included."""
    import yaml

    def sampled(name: str) -> Path:
        path = config(ws, name)
        cfg = yaml.safe_load(path.read_text())
        cfg["teacher"].update(targets="sampled", samples=8)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    rc, out = fh.run_atkd(["teacher", str(sampled("sampled-ref"))], ws["root"] / "logs" / "sampled-ref.log")
    assert rc == 0, out
    ref = fh.cache_snapshot(str(ws["root"] / "sampled-ref" / "cache"))
    rng = random.Random(SEED + 1)
    kills = ["shard.write:2", "shard.committed:3", round(rng.uniform(0.3, 1.5), 2)]
    counts = fh.run_campaign(["teacher", str(sampled("sampled-kills"))], kills, ws["root"] / "logs" / "sampled-kills")
    assert counts.kills >= 2 and counts.mismatches == 0, counts
    cache = str(ws["root"] / "sampled-kills" / "cache")
    assert fh.compare_caches(fh.cache_snapshot(cache), ref) == []
    verify_ok(cache)
