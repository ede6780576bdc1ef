"""`atkd teacher --workers N`: N processes on one cache, one command, equal to a one-worker run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.config import TeacherConfig
from pipeline.workers import resolve_workers
from tests.support import harness as fh
from tests.support import fixtures

REPO = Path(__file__).resolve().parents[2]


def atkd(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=fh.env_for(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, tiny_llama_dir, train_jsonl):
    """The reference: the same config cached by a single in-process worker (one thread, as the
    workers run with OMP_NUM_THREADS=1: another thread count rounds the reductions differently)."""
    import torch

    root = tmp_path_factory.mktemp("workers")
    cfg = fh.write_config(root / "one.yaml", model=str(tiny_llama_dir), data=str(train_jsonl),
                          run_dir=str(root / "one"), cache=str(root / "one" / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["teacher", str(cfg)]) == 0
    finally:
        torch.set_num_threads(threads)  # later tests build their references with the default
    return {"root": root, "snapshot": fh.cache_snapshot(str(root / "one" / "cache"))}


@pytest.mark.integration
def test_two_workers_write_each_shard_once_and_equal_one_worker(one_worker, tiny_llama_dir, train_jsonl):
    root = one_worker["root"]
    cfg = fh.write_config(root / "two.yaml", model=str(tiny_llama_dir), data=str(train_jsonl),
                          run_dir=str(root / "two"), cache=str(root / "two" / "cache"))
    p = atkd("teacher", str(cfg), "--workers", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "worker 0: pid" in p.stderr and "worker 1: pid" in p.stderr
    snapshot = fh.cache_snapshot(str(root / "two" / "cache"))
    assert fh.compare_caches(one_worker["snapshot"], snapshot) == []
    # every shard written exactly once: the workers' own counts add up to the plan
    logs = [(root / "two" / "logs" / f"teacher-worker-{i}.log").read_text() for i in range(2)]
    written = [int(m) for log in logs for m in re.findall(r"wrote (\d+) shard\(s\)", log)]
    num_shards = len(json.loads((root / "two" / "cache" / "manifest.json").read_text())["shard_plan"])
    assert len(written) == 2 and sum(written) == num_shards, logs
    assert not list((root / "two" / "cache" / "leases").glob("*.json"))


@pytest.mark.integration
def test_a_failing_worker_fails_the_command_with_its_error(tmp_path, tiny_llama_dir):
    rows = fixtures.prompt_response_rows(30)
    rows[22] = {"prompt": "no response here"}  # shard 4 of 6 holds a bad row
    data = fixtures.write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = fh.write_config(tmp_path / "bad.yaml", model=str(tiny_llama_dir), data=str(data),
                          run_dir=str(tmp_path / "run"), cache=str(tmp_path / "run" / "cache"))
    p = atkd("teacher", str(cfg), "--workers", "2")
    assert p.returncode == 1, p.stderr[-3000:]
    assert re.search(r"teacher worker \d failed \(exit code 1\)", p.stderr), p.stderr[-3000:]
    assert "train.jsonl:23: field 'response' is missing" in p.stderr, p.stderr[-3000:]
    assert "rerun the same command to continue" in p.stderr


def test_workers_auto_and_gpu_groups(monkeypatch):
    teacher = TeacherConfig(tensor_parallel_size=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert resolve_workers("auto", teacher) == (4, [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]])
    assert resolve_workers(2, teacher)[1] == [["0", "1"], ["2", "3"]]
    with pytest.raises(ValueError, match="need 10 GPUs, but 8 are visible"):
        resolve_workers(5, teacher)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_workers("auto", teacher) == (1, [[]])  # no GPU: one CPU worker
    assert resolve_workers(3, teacher) == (3, [[], [], []])
