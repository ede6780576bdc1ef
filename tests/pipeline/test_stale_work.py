"""Nothing stale: finished work is checked against the config before a rerun skips it (issue 23, items 1, 3,
4 and 10), through the CLI.

A finished student records what it was trained from (pipeline/student_record.py); a rerun with other data or
a weight-shaping setting refuses it with the differing keys and the fix (`--retrain NAME`), settings that
shape no weights pass, and evaluation is redone when a model it covered changed. A finished teacher
fine-tune is never modified. A refused command leaves config.yaml and split.json as they were.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.support import harness as fh
from tests.support.fixtures import atkd_here, prompt_response_rows, write_jsonl

pytestmark = pytest.mark.integration  # several students trained in process

OPTIM = {"lr": 3e-3, "warmup_steps": 1, "max_steps": 2, "batch_size": 4}
EVAL = {"max_examples": 4, "max_new_tokens": 4, "batch_size": 4, "backend": "transformers"}


def run_config(root: Path, model: str, data: str, *, name: str = "run") -> Path:
    """base (SFT from the rows), cont (continues from base, SFT from the rows), kd (from the cache)."""
    init = dict(fh.STUDENT_INIT)
    cfg = {"run_dir": str(root / name),
           "data": {"path": data, "max_seq_len": 64, "holdout": {"validation": 4, "test": 4, "seed": 0}},
           "teacher": {"model": model, "backend": "transformers", "top_k": 8, "dtype": "float32", "device": "cpu"},
           "cache": {"sequences_per_shard": 20},
           "students": [
               {"name": "base", "init": init, "data": "rows", "loss": {"kind": "sft", "chunk_size": 16},
                "optim": dict(OPTIM), "checkpoint_every": 2},
               {"name": "cont", "init_from": "base", "data": "rows", "loss": {"kind": "sft", "chunk_size": 16},
                "optim": dict(OPTIM), "checkpoint_every": 2},
               {"name": "kd", "init": init, "loss": {"kind": "kd", "chunk_size": 16}, "optim": dict(OPTIM),
                "checkpoint_every": 2}],
           "eval": dict(EVAL)}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def done(run: Path, name: str) -> dict:
    return json.loads((run / "students" / name / "done.json").read_text())


@pytest.fixture()
def trained(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", prompt_response_rows(40))
    cfg = run_config(tmp_path, str(tiny_llama_dir), str(data))
    rc, out = atkd_here(capsys, "run", str(cfg))
    assert rc == 0, out
    return {"cfg": str(cfg), "run": tmp_path / "run", "data": data, "root": tmp_path}


def test_a_changed_weight_setting_is_refused_then_retrained_on_request(trained, capsys):
    cfg, run = trained["cfg"], trained["run"]
    config_yaml = (run / "config.yaml").read_bytes()
    split_json = (run / "split.json").read_bytes()

    # A setting that shapes kd's weights: refused before any stage, with the key and the fix; nothing rewritten.
    rc, out = atkd_here(capsys, "run", cfg, "students.kd.optim.lr=0.01")
    assert rc == 1, out
    assert "StaleStudentError" in out and "'kd': optim.lr: 0.003 -> 0.01" in out and "--retrain kd" in out
    assert "already trained" not in out and "'base'" not in out
    assert (run / "config.yaml").read_bytes() == config_yaml and (run / "split.json").read_bytes() == split_json
    record = done(run, "kd")["trained_from"]
    assert record["optim"]["lr"] == 3e-3 and record["source"] == "cache" and record["data"]["top_k"] == 8
    assert done(run, "cont")["trained_from"]["continues_from"]["name"] == "base"
    rc, out = atkd_here(capsys, "status", cfg, "students.kd.optim.lr=0.01")
    assert rc == 0 and "student kd (kd): stale, trained from something else (optim.lr: 0.003 -> 0.01)" in out
    assert "student base (sft, from the rows): done" in out
    rc, out = atkd_here(capsys, "student", cfg, "--student", "kd", "students.kd.optim.lr=0.01")
    assert rc == 1 and "'kd': optim.lr: 0.003 -> 0.01" in out
    rc, out = atkd_here(capsys, "run", cfg, "--dry-run", "students.kd.optim.lr=0.01")
    assert rc == 1 and "PROBLEM: student 'kd' is stale" in out
    rc, out = atkd_here(capsys, "run", cfg, "--dry-run", "students.kd.optim.lr=0.01", "--retrain", "kd")
    assert rc == 0 and "would be trained anew (--retrain; it is stale: optim.lr: 0.003 -> 0.01)" in out, out

    # Settings that shape no weights keep every student done.
    quiet = ["students.kd.log_every=5", "students.kd.checkpoint_every=1", "students.kd.keep_checkpoints=4",
             "students.kd.num_workers=1", "students.base.gradient_checkpointing=true"]
    rc, out = atkd_here(capsys, "run", cfg, *quiet)
    assert rc == 0 and "student 'kd' is already trained" in out and "nothing to do" in out, out

    # --retrain kd: kd alone is trained again, with the new setting, and the evaluation is redone.
    base_done, results = done(run, "base"), (run / "eval" / "results.json").stat().st_mtime_ns
    rc, out = atkd_here(capsys, "run", cfg, "students.kd.optim.lr=0.01", "--retrain", "kd")
    assert rc == 0, out
    assert "--retrain kd: removing" in out and "training student 'kd'" in out and "training student 'base'" not in out
    assert done(run, "kd")["trained_from"]["optim"]["lr"] == 0.01 and done(run, "base") == base_done
    assert (run / "eval" / "results.json").stat().st_mtime_ns != results
    rc, out = atkd_here(capsys, "status", cfg, "students.kd.optim.lr=0.01")
    assert "student kd (kd): done" in out and "evaluation: done" in out


def test_students_of_other_data_or_a_retrained_origin_are_stale(trained, capsys):
    cfg, run, root = trained["cfg"], trained["run"], trained["root"]
    rows = prompt_response_rows(40)
    rows[5] = {"prompt": "a row that changed", "response": " so the training rows differ"}
    write_jsonl(trained["data"], rows)

    # Other training rows: the rows students are refused before stage one (which would refuse the cache too).
    rc, out = atkd_here(capsys, "run", cfg)
    assert rc == 1, out
    assert "'base': data.rows.source: \"sha256:" in out and "'cont': data.rows.source:" in out
    assert "continues from student 'base', which is stale" in out
    rc, out = atkd_here(capsys, "status", cfg)
    assert "student base (sft, from the rows): stale" in out and "MISMATCH" in out

    # New caches of the new rows: the cache student is refused too, naming the cache fingerprint.
    new = [f"cache.path={root / 'cache2'}", f"eval.validation_cache={root / 'cache-val2'}"]
    rc, out = atkd_here(capsys, "teacher", cfg, *new)
    assert rc == 0, out
    rc, out = atkd_here(capsys, "student", cfg, "--student", "kd", *new)
    assert rc == 1 and "'kd': data.cache: \"" in out, out

    # --retrain base retrains base and cont (which continues from it), nothing else.
    kd_done = done(run, "kd")
    rc, out = atkd_here(capsys, "student", cfg, "--retrain", "base", *new, "--student", "base")
    assert rc == 0, out
    rc, out = atkd_here(capsys, "status", cfg, *new)
    assert "student base (sft, from the rows): done" in out
    assert "student cont (sft, from the rows): stale" in out and "which was trained again since" in out
    rc, out = atkd_here(capsys, "run", cfg, *new, "--retrain", "base,kd")
    assert rc == 0, out
    assert "--retrain base: removing" in out and "--retrain cont: removing" in out and "--retrain kd" in out
    assert done(run, "kd")["finished_at"] != kd_done["finished_at"]
    rc, out = atkd_here(capsys, "run", cfg, *new)
    assert rc == 0 and "nothing to do" in out


def test_an_old_student_without_a_record_is_kept_and_said_unchecked(trained, capsys):
    cfg, run = trained["cfg"], trained["run"]
    info = done(run, "kd")
    del info["trained_from"]  # as an atkd before the record wrote it
    (run / "students" / "kd" / "done.json").write_text(json.dumps(info))
    rc, out = atkd_here(capsys, "status", cfg)
    assert "student kd (kd): done (by an atkd that did not record what it trained from: not checked" in out
    rc, out = atkd_here(capsys, "student", cfg, "--student", "kd")
    assert rc == 0 and "student 'kd' is already trained" in out and "not checked against the config" in out


def test_eval_says_which_listed_student_is_not_trained(trained, capsys, tmp_path):
    cfg = yaml.safe_load(Path(trained["cfg"]).read_text())
    cfg["students"].append({**cfg["students"][2], "name": "late"})
    path = tmp_path / "late.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, out = atkd_here(capsys, "eval", str(path))
    assert rc == 0, out
    assert "student 'late' is not started: left out of the evaluation" in out
    assert "`atkd student --student late`" in out
    results = json.loads((trained["run"] / "eval" / "results.json").read_text())
    assert "late" not in results and "kd" in results
    # Fewer top-k than kd was trained with: kd is stale, and `atkd eval` refuses it; nothing is rewritten.
    config_yaml = (trained["run"] / "config.yaml").read_bytes()
    rc, out = atkd_here(capsys, "eval", trained["cfg"], "teacher.top_k=4")
    assert rc == 1 and "StaleStudentError" in out and "'kd': data.top_k: 8 -> 4" in out, out
    assert (trained["run"] / "config.yaml").read_bytes() == config_yaml


def test_refused_commands_leave_config_and_split_as_they_were(trained, capsys):
    run = trained["run"]
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "split.json")}
    for overrides in (["data.holdout.seed=5"], ["data.response_field=answer"], ["teacher.top_k=16"]):
        for command in ("run", "teacher", "student"):
            rc, out = atkd_here(capsys, command, trained["cfg"], *overrides)
            assert rc != 0, (command, overrides, out)
            assert {name: (run / name).read_bytes() for name in before} == before, (command, overrides)


def test_a_finished_teacher_finetune_is_never_modified(tmp_path, tiny_llama_dir, capsys):
    from tests.pipeline.test_sft_and_finetune import finetune_config

    data = write_jsonl(tmp_path / "train.jsonl", prompt_response_rows(40))
    cfg = str(finetune_config(tmp_path, str(tiny_llama_dir), str(data), name="ft"))
    ft = tmp_path / "ft" / "teacher-finetuned"
    rc, out = atkd_here(capsys, "finetune", cfg)
    assert rc == 0, out
    final = {p.name: p.read_bytes() for p in (ft / "final").iterdir()}
    steps = sorted(p.name for p in (ft / "checkpoints").iterdir())
    for command in ("finetune", "teacher", "run"):
        rc, out = atkd_here(capsys, command, cfg, "teacher.finetune.optim.max_steps=6")
        assert rc == 1, out
        line = next(x for x in out.splitlines() if x.startswith("atkd: TeacherError"))
        assert "(its record -> this config: settings.optim.max_steps: 4 -> 6)" in line  # one line, the key
        assert "never changed: delete" in line
    rc, out = atkd_here(capsys, "status", cfg, "teacher.finetune.optim.max_steps=6")
    assert "done, but with other settings (settings.optim.max_steps: 4 -> 6)" in out
    assert {p.name: p.read_bytes() for p in (ft / "final").iterdir()} == final
    assert sorted(p.name for p in (ft / "checkpoints").iterdir()) == steps
    rc, out = atkd_here(capsys, "teacher", cfg)  # set back: the fine-tune is used as it was
    assert rc == 0 and "fine-tuning" not in out, out
