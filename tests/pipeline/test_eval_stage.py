"""Evaluation as a stage: the validation cache is stage one's, results.json has one writer, and
`atkd run` re-evaluates when what the results were computed from changes (eval settings, students)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.support import harness as fh
from tests.support.fixtures import atkd_here




@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir, train_jsonl):
    """A run directory whose only student is 'trained' already (its final/ is the tiny Llama)."""
    root = tmp_path_factory.mktemp("evalstage")
    run_dir = root / "run"
    student = run_dir / "students" / "s1"
    shutil.copytree(tiny_llama_dir, student / "final")
    (student / "done.json").write_text(json.dumps({"steps": 12, "finished_at": 1.0}))
    evaluation = {"path": str(train_jsonl), "validation_path": str(train_jsonl), "max_examples": 4,
                  "max_new_tokens": 4, "batch_size": 4, "backend": "transformers",
                  "allow_train_overlap": True}  # the training rows; the refusal: tests/pipeline/test_split_run.py
    cfg = fh.write_config(root / "pipeline.yaml", model=str(tiny_llama_dir), data=str(train_jsonl),
                          run_dir=str(run_dir), cache=str(run_dir / "cache"), sequences_per_shard=20,
                          extra={"eval": evaluation})
    return {"cfg": str(cfg), "run_dir": run_dir, "student": student}


def test_run_evaluates_once_then_again_when_settings_or_students_change(run, capsys):
    from storage.cache import Cache

    rc, out = atkd_here(capsys, "run", run["cfg"])
    assert rc == 0, out
    assert Cache.open(str(run["run_dir"] / "cache-val")).is_complete()  # stage one made it, before eval
    results = run["run_dir"] / "eval" / "results.json"
    assert list(json.loads(results.read_text())) == ["s1", "teacher"]
    assert (run["run_dir"] / "eval" / "settings.json").is_file()
    assert not (run["run_dir"] / "report" / "results.json").exists()  # the report only reads results

    rc, out = atkd_here(capsys, "run", run["cfg"])
    assert rc == 0 and "nothing to do" in out and "up to date" in out
    rc, out = atkd_here(capsys, "status", run["cfg"])
    assert "evaluation: done" in out

    # Another evaluation setting: the results are stale, and `atkd run` evaluates again.
    rc, out = atkd_here(capsys, "status", run["cfg"], "eval.max_new_tokens=6")
    assert "evaluation: out of date" in out
    rc, out = atkd_here(capsys, "run", run["cfg"], "eval.max_new_tokens=6")
    assert rc == 0 and "nothing to do" not in out and "[eval] s1:" in out
    rc, out = atkd_here(capsys, "run", run["cfg"], "eval.max_new_tokens=6")
    assert "nothing to do" in out

    # A retrained student (a new done.json) too.
    (run["student"] / "done.json").write_text(json.dumps({"steps": 12, "finished_at": 2.0}))
    rc, out = atkd_here(capsys, "run", run["cfg"], "eval.max_new_tokens=6")
    assert rc == 0 and "nothing to do" not in out and "[eval] s1:" in out


def test_atkd_eval_runs_the_validation_capture_first_when_missing(run, capsys):
    from storage.cache import Cache

    atkd_here(capsys, "run", run["cfg"])
    shutil.rmtree(run["run_dir"] / "cache-val")
    rc, out = atkd_here(capsys, "eval", run["cfg"])
    assert rc == 0, out
    assert "running stage one over" in out and "| teacher |" in out
    assert Cache.open(str(run["run_dir"] / "cache-val")).is_complete()


def test_evaluation_refuses_an_unfinished_validation_cache(run, capsys, tmp_path):
    from pipeline.config import load_config
    from stages.eval import evaluate
    from storage.cache import Cache

    atkd_here(capsys, "run", run["cfg"])
    partial = tmp_path / "cache-val"
    shutil.copytree(run["run_dir"] / "cache-val", partial)
    shutil.rmtree(next((partial / "shards").glob("shard-*.zarr")))
    Cache.open(str(partial)).refresh_manifest()  # as if that shard was never committed
    cfg = load_config(run["cfg"])
    with pytest.raises(ValueError, match="not complete"):
        evaluate.evaluate_models({"teacher": cfg.teacher.model}, eval_cfg=cfg.eval, data_cfg=cfg.data,
                                 teacher_dir=cfg.teacher.model, val_cache_url=str(partial), progress=False)


def test_status_of_students_does_not_import_torch(tmp_path):
    """Whether a student is done, and its last checkpoint, come from stages.training.layout, which stays light
    (the cache check of `atkd status` may still need a tokenizer; a run without a cache must not)."""
    import os
    import subprocess
    import sys

    from tests.support.harness import REPO

    (tmp_path / "run" / "students" / "s1").mkdir(parents=True)
    (tmp_path / "run" / "students" / "s1" / "done.json").write_text(json.dumps({"steps": 100}))  # the default
    (tmp_path / "run" / "students" / "s2" / "checkpoints" / "step_000004").mkdir(parents=True)
    (tmp_path / "run" / "students" / "s2" / "checkpoints" / "step_000004" / "complete").write_text("{}")
    (tmp_path / "run" / "students" / "s2" / "checkpoints" / "step_000006").mkdir()  # no marker: not counted
    code = ("import sys; from pipeline.config import PipelineConfig, StudentConfig; "
            "from pipeline.status import status_text; "
            "cfg = PipelineConfig(run_dir=sys.argv[1], students=[StudentConfig(name='s1', model='m'), "
            "StudentConfig(name='s2', model='m')]); cfg.cache.path = sys.argv[1] + '/cache'; "
            "print(status_text(cfg)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    # done.json without a record (an atkd from before it): done, not checked (pipeline.student_record)
    assert "student s1 (atkd): done (by an atkd that did not record what it trained from: not checked against " \
           "the config)" in lines
    assert "student s2 (atkd): in progress (last checkpoint step_000004)" in lines
    assert lines[-1] == "False"
