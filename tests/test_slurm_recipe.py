"""scripts/slurm_teacher.sbatch, without SLURM: its directives are well formed, a dry run renders and
checks the command a task runs, and two tasks started by hand (as an array would) on one cache on S3
split the shards through leases and end equal to a one-worker run."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support import harness as fh

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_teacher.sbatch"
ATKD = f"{sys.executable} -m pipeline"


def task(cfg: Path, task_id: int, count: int, *args: str, env: dict | None = None) -> subprocess.Popen:
    slurm = {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": str(task_id), "SLURM_ARRAY_TASK_COUNT": str(count),
             "ATKD": ATKD, **(env or {})}
    return subprocess.Popen(["bash", str(SCRIPT), str(cfg), *args], cwd=REPO, env=fh.env_for(slurm),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_directives_are_well_formed():
    lines = [line for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    assert lines and all(re.fullmatch(r"#SBATCH --[a-z-]+(=\S+)?", line) for line in lines), lines
    assert "#SBATCH --array=0-7" in lines
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_dry_run_renders_and_checks_the_command_of_a_task(tmp_path, tiny_llama_dir, train_jsonl):
    cfg = fh.write_config(tmp_path / "cfg.yaml", model=str(tiny_llama_dir), data=str(train_jsonl),
                          run_dir=str(tmp_path / "run"), cache=str(tmp_path / "run" / "cache"))
    p = task(cfg, 3, 8, "teacher.top_k=4", env={"ATKD_DRY_RUN": "1"})
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    assert "array job 77, task 3 of 8" in out, out
    assert f"teacher {cfg} teacher.worker_id=slurm-77-3 teacher.top_k=4" in out, out
    assert "shards" in out and not (tmp_path / "run" / "cache").exists(), out  # the plan; nothing written
    p = task(tmp_path / "missing.yaml", 0, 1, env={"ATKD_DRY_RUN": "1"})
    out = p.communicate(timeout=300)[0]
    assert p.returncode != 0 and "missing.yaml" in out, out


def test_two_array_tasks_share_an_s3_cache_and_equal_one_worker(tmp_path, tiny_llama_dir, train_jsonl, local_s3):
    ref = fh.write_config(tmp_path / "ref.yaml", model=str(tiny_llama_dir), data=str(train_jsonl),
                          run_dir=str(tmp_path / "ref"), cache=str(tmp_path / "ref" / "cache"))
    rc, out = fh.run_atkd(["teacher", str(ref)], tmp_path / "ref.log")
    assert rc == 0, out
    url = f"s3://atkd-test/slurm-{uuid.uuid4().hex[:8]}/cache"
    cfg = fh.write_config(tmp_path / "cfg.yaml", model=str(tiny_llama_dir), data=str(train_jsonl),
                          run_dir=str(tmp_path / "run"), cache=url)
    procs = [task(cfg, i, 2, env=local_s3.env()) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    written = [int(m) for out in outs for m in re.findall(r"worker slurm-77-\d: wrote (\d+) shard", out)]
    assert len(written) == 2 and sum(written) == 8, outs
    assert fh.compare_caches(fh.cache_snapshot(url), fh.cache_snapshot(str(tmp_path / "ref" / "cache"))) == []
