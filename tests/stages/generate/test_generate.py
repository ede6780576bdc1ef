"""The generation stage (stages/generate/): seeded rows, identity, shards, resume, bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from stages.data_config import DataConfig, HoldoutConfig
from stages.rounds_config import GenerateConfig
from stages.generate.generation import (GenerationError, GenerationJob, is_complete, keeps_data, row_seeds,
                                        run_generation)
from tests.support.fixtures import write_jsonl
from tests.support.ending_model import make_ending_llama, short_rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = make_ending_llama(root)
    data = write_jsonl(root / "train.jsonl", short_rows(22, seed=4))
    return {"root": root, "model": model, "data": str(data)}


def _job(ws, out, **gen) -> GenerationJob:
    settings = dict(n=2, temperature=1.0, top_p=0.9, max_new_tokens=5, backend="transformers", rows_per_shard=5,
                    batch_size=1)
    settings.update(gen)
    return GenerationJob(model=ws["model"], source="student", data_cfg=DataConfig(path=ws["data"], max_seq_len=64),
                         gen=GenerateConfig(**settings), seed=7, out=str(out))


def _rows(out) -> list[dict]:
    return [json.loads(line) for f in sorted(Path(out, "rows").glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_row_seeds_depend_on_row_and_seed_only():
    idx = np.arange(1000)
    a = row_seeds(7, idx)
    assert np.array_equal(a[500:], row_seeds(7, idx[500:]))  # a row's seed does not depend on its neighbours
    assert len(set(a.tolist())) == 1000 and not np.array_equal(a, row_seeds(8, idx))
    assert int(a.max()) < 2 ** 31
    keep = keeps_data(7, np.arange(20000), 0.25)
    assert abs(keep.mean() - 0.25) < 0.02 and not keeps_data(7, idx, 0.0).any()


def test_rows_identity_provenance_and_rerun(workspace, tmp_path):
    summary = run_generation(_job(workspace, tmp_path / "a"))
    assert is_complete(str(tmp_path / "a")) and summary.shards_written == 5 and summary.engine == "transformers"
    rows = _rows(tmp_path / "a")
    assert len(rows) == summary.generated and summary.generated + summary.overlong + summary.empty == 22 * 2
    assert summary.generated > 0 and summary.overlong > 0  # the model ends some answers, not all
    for r in rows:
        meta = r["_atkd"]
        assert meta["source"] == "student" and meta["sample"] in (0, 1) and r["response"].strip()
        assert r["prompt"] == short_rows(22, seed=4)[meta["row"]]["prompt"]
        assert meta["seed"] == int(row_seeds(7, np.array([meta["row"]]))[0]) + meta["sample"]
    assert summary.retokenized_same == sum(r["_atkd"]["same_tokens"] for r in rows) > 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    ident = manifest["identity"]
    assert ident["sampling"]["top_p"] == 0.9 and ident["base_seed"] == 7 and ident["engine"] == "transformers"
    assert ident["model_fingerprint"].startswith("sha256:") or ident["model_fingerprint"]
    # a rerun does nothing; another shard size gives the same rows (per-row generators, no padding)
    assert run_generation(_job(workspace, tmp_path / "a")).shards_written == 0
    run_generation(_job(workspace, tmp_path / "b", rows_per_shard=7))
    assert _rows(tmp_path / "b") == rows
    # another seed, other rows
    other = replace(_job(workspace, tmp_path / "c"), seed=8)
    run_generation(other)
    assert _rows(tmp_path / "c") != rows


def test_other_settings_refused_naming_the_key(workspace, tmp_path):
    run_generation(_job(workspace, tmp_path / "a", rows_per_shard=11))
    with pytest.raises(GenerationError, match=r"sampling\.temperature: 1\.0 -> 0\.7.*--retrain"):
        run_generation(_job(workspace, tmp_path / "a", rows_per_shard=11, temperature=0.7))


def test_data_fraction_keeps_dataset_rows_and_holdout_is_respected(workspace, tmp_path):
    job = _job(workspace, tmp_path / "a", n=1)
    job = replace(job, data_fraction=0.5, data_cfg=replace(job.data_cfg, holdout=HoldoutConfig(validation=4, test=4)))
    summary = run_generation(job)
    rows = _rows(tmp_path / "a")
    data_rows = [r for r in rows if r["_atkd"]["source"] == "data"]
    assert summary.prompts == 14 and summary.data_rows == len(data_rows) > 0
    source = short_rows(22, seed=4)
    assert all(r["response"] == source[r["_atkd"]["row"]]["response"] for r in data_rows)
    from stages import split

    held = {int(i) for part in ("validation", "test") for i in split.members(job.data_cfg, 22, part)}
    assert len(held) == 8 and not {r["_atkd"]["row"] for r in rows} & held


def test_only_overlong_responses_is_an_error_with_counts(workspace, tmp_path):
    job = _job(workspace, tmp_path / "a", max_new_tokens=1, top_p=1.0, temperature=0.05)
    with pytest.raises(GenerationError, match=r"kept no response for shard 0.*of 10 responses \d+ stopped at the "
                                               r"token limit without EOS.*\d+ were empty"):
        run_generation(job)
    assert not list((tmp_path / "a").glob("rows/*.jsonl"))  # nothing empty committed


def _generate(job):
    run_generation(job)


@pytest.mark.integration
def test_killed_generation_reruns_to_identical_rows(workspace, tmp_path):
    from tests.support.harness import KILLED, call

    run_generation(_job(workspace, tmp_path / "ref"))
    job = _job(workspace, tmp_path / "run")
    for point in ("generate.scored:2", "generate.committed:2"):
        proc = call(_generate, (job,), tmp_path / f"{point}.log", env={"ATKD_FAULT_POINT": point})
        assert proc.wait(300) in KILLED, proc.output()
    assert not is_complete(job.out) and len(list(Path(job.out, "rows").glob("*.jsonl"))) == 3
    assert run_generation(job).shards_written == 2
    assert _rows(tmp_path / "run") == _rows(tmp_path / "ref")


@pytest.mark.integration
def test_two_workers_split_the_shards_through_leases(workspace, tmp_path):
    from tests.support.harness import call

    run_generation(_job(workspace, tmp_path / "ref"))
    job = _job(workspace, tmp_path / "run")
    trace = tmp_path / "trace.txt"
    procs = [call(_generate, (job,), tmp_path / f"w{i}.log", env={"ATKD_FAULT_TRACE": str(trace)}) for i in range(2)]
    assert [p.wait(300) for p in procs] == [0, 0], [p.output() for p in procs]
    commits = [line.split()[1] for line in trace.read_text().splitlines() if line.startswith("generate.committed")]
    assert sorted(commits) == sorted(set(commits)) and len(commits) == 5  # each shard once
    assert _rows(tmp_path / "run") == _rows(tmp_path / "ref")
