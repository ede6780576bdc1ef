"""`atkd teacher --ray ADDRESS`: stage one's workers as Ray actors on a local Ray cluster started by the
test (`ray.init(num_cpus=2)`), the CLI run as a subprocess that connects to it: the cache equals a
one-worker run's, an actor killed mid-shard is restarted and its shard redone, repeated deaths fail
with the actor's last log lines, and a worker's own error fails the command at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import harness as fh
from tests.support import fixtures

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_llama_dir, train_jsonl):
    """A local 2-CPU Ray cluster, and the reference cache of a single worker (one thread)."""
    root = tmp_path_factory.mktemp("ray")
    ref = fh.write_config(root / "ref.yaml", model=str(tiny_llama_dir), data=str(train_jsonl),
                          run_dir=str(root / "ref"), cache=str(root / "ref" / "cache"))
    rc, out = fh.run_atkd(["teacher", str(ref)], root / "logs" / "ref.log")
    assert rc == 0, out
    ctx = ray.init(num_cpus=2, object_store_memory=80 << 20, include_dashboard=False, log_to_driver=False)
    try:
        yield {"root": root, "address": ctx.address_info["gcs_address"], "model": str(tiny_llama_dir),
               "data": str(train_jsonl), "ref": fh.cache_snapshot(str(root / "ref" / "cache"))}
    finally:
        ray.shutdown()


def run(cluster, name: str, *args: str, env: dict | None = None, data: str | None = None,
        extra: dict | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    root = cluster["root"]
    cfg = fh.write_config(root / f"{name}.yaml", model=cluster["model"], data=data or cluster["data"],
                          run_dir=str(root / name), cache=str(root / name / "cache"), extra=extra)
    p = subprocess.run([sys.executable, "-m", "pipeline", "teacher", str(cfg), "--ray", cluster["address"], *args],
                       cwd=REPO, env=fh.env_for(env), capture_output=True, text=True, timeout=600)
    return p, root / name


def test_two_actors_one_killed_mid_shard_end_equal_to_one_worker(cluster):
    """Every actor would die at its second commit; ATKD_FAULT_ONCE lets only the first one die, once."""
    once = cluster["root"] / "killed-once"
    p, run_dir = run(cluster, "kill", "--workers", "2",
                     env={"ATKD_FAULT_POINT": "shard.commit:2", "ATKD_FAULT_ONCE": str(once)})
    assert p.returncode == 0, p.stderr[-4000:]
    assert once.exists(), "no actor was killed"
    assert "2 actor(s), each cpus 1" in p.stderr, p.stderr[-2000:]
    assert "(Ray actor) died" in p.stderr and "restart 1 of 3" in p.stderr, p.stderr[-3000:]
    assert p.stderr.count("teacher] 8/8 shard") == 1, p.stderr[-3000:]  # one progress line for the cache
    assert fh.compare_caches(fh.cache_snapshot(str(run_dir / "cache")), cluster["ref"]) == []
    logs = [(run_dir / "logs" / f"teacher-worker-{i}.log").read_text() for i in range(2)]
    assert sum(log.count("(Ray actor, pid") for log in logs) == 3, logs  # two starts and one restart


def test_an_actor_dying_more_often_than_max_restarts_fails_with_its_last_lines(cluster):
    p, run_dir = run(cluster, "dies", "--workers", "1", "teacher.max_restarts=1",
                     env={"ATKD_FAULT_POINT": "shard.write:1"})
    assert p.returncode == 1, p.stderr[-3000:]
    assert "teacher worker 0 (Ray actor) died 2 times, more than teacher.max_restarts=1" in p.stderr, p.stderr
    assert "its last lines:" in p.stderr and "| [teacher] worker 0 (pid" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_a_worker_error_fails_the_command_at_once_with_its_message(cluster, tmp_path):
    rows = fixtures.prompt_response_rows(30)
    rows[22] = {"prompt": "no response here"}  # shard 4 of 6 holds a bad row
    data = fixtures.write_jsonl(tmp_path / "train.jsonl", rows)
    p, _ = run(cluster, "bad", "--workers", "2", data=str(data))
    assert p.returncode == 1, p.stderr[-3000:]
    assert "(Ray actor) failed: DataError" in p.stderr, p.stderr[-3000:]
    assert "train.jsonl:23: field 'response' is missing" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
