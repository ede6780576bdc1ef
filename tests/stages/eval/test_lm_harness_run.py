"""lm-eval through `atkd` end to end on demo students (local task YAMLs over local jsonl: one
multiple-choice task, one generation task): the numbers equal lm-eval run directly on the same
exported model, a rerun with nothing changed does nothing, and bad tasks stop before any model runs."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from stages.errors import EvalError
from stages.eval.lm_harness import ERROR_FILE, READY_FILE, LmEvalConfig, run_models
from tests.pipeline.test_run_demo import STUDENT, atkd, reduced_config

pytestmark = pytest.mark.integration  # lm-eval's worker processes, `python -m pipeline` end to end

TASKS = ["atkd_test_mc", "atkd_test_gen"]


def direct_lm_eval(model_dir, include_path) -> dict:
    """lm-eval's own Python API on a model directory, as a user would run it."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    raw = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=TASKS,
                                  batch_size=8, device="cpu", log_samples=False,
                                  task_manager=TaskManager(include_path=str(include_path), include_defaults=False))
    return raw["results"]


def test_atkd_eval_with_sets_and_lm_eval_on_demo_students(tmp_path, lm_tasks):
    cfg = reduced_config(tmp_path / "run")
    optim = {"lr": 0.002, "warmup_steps": 1, "max_steps": 4, "batch_size": 8}
    cfg["students"] = [{"name": "base", "init": STUDENT, "loss": {"kind": "sft"}, "optim": optim},
                       {"name": "kd", "init_from": "base", "loss": {"kind": "kd"}, "optim": optim}]
    cfg["eval"]["sets"]["validation"]["max_examples"] = 8
    cfg["eval"]["lm_eval"] = {"tasks": TASKS, "include_path": str(lm_tasks), "batch_size": 8}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(cfg))

    first = atkd("run", str(config), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    run_dir = tmp_path / "run"
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert list(results) == ["base", "kd", "teacher"]
    for res in results.values():
        assert res["sets"]["validation"]["num_examples"] == 8 and res["sets"]["validation"]["train_overlap"] == 0
        lm = res["lm_eval"]
        assert lm["version"] and set(lm["tasks"]) == set(TASKS) and lm["tasks"]["atkd_test_mc"]["samples"] == 24
    report = (run_dir / "report" / "report.md").read_text()
    assert "## Evaluation sets" in report and "| model | eval.path | validation | average |" in report
    assert "## lm-evaluation-harness" in report and "atkd_test_gen exact_match (first_number)" in report
    assert "| kd | " in report.split("## lm-evaluation-harness")[1]

    # atkd's numbers are lm-eval's own on the same exported model
    direct = direct_lm_eval(run_dir / "students" / "kd" / "final", lm_tasks)
    for task, entry in results["kd"]["lm_eval"]["tasks"].items():
        for m in entry["metrics"]:
            assert m["value"] == direct[task][f"{m['metric']},{m['filter']}"], (task, m)
            assert m["stderr"] == direct[task][f"{m['metric']}_stderr,{m['filter']}"], (task, m)

    # nothing changed: `atkd eval` keeps the results (no lm-eval run, no generation)
    stamp = os.stat(run_dir / "eval" / "results.json").st_mtime_ns
    again = atkd("eval", str(config), cwd=tmp_path)
    assert again.returncode == 0 and "is up to date; skipping" in again.stdout, again.stdout + again.stderr
    assert "lm-eval" not in again.stdout.split("up to date")[1].split("| model |")[0]
    assert os.stat(run_dir / "eval" / "results.json").st_mtime_ns == stamp

    # a task's data changed: the results are out of date (`atkd run` / `atkd eval` evaluate again)
    with open(lm_tasks / "data" / "gen.jsonl", "a") as f:
        f.write(json.dumps({"question": "What is 1 plus 1?", "answer": "2"}) + "\n")
    status = atkd("status", str(config), cwd=tmp_path)
    assert "evaluation: out of date" in status.stdout, status.stdout


def test_unknown_or_broken_tasks_stop_before_any_model_runs(tmp_path, lm_tasks, tiny_llama_dir):
    out = tmp_path / "eval"
    lm = LmEvalConfig(tasks=["atkd_test_mc", "atkd_test_mcq"], include_path=str(lm_tasks))
    with pytest.raises(EvalError) as err:
        run_models({"m": str(tiny_llama_dir)}, lm, teacher_dir=str(tiny_llama_dir), out_dir=out)
    assert "eval.lm_eval.tasks: 'atkd_test_mcq' is no lm-eval task" in str(err.value)
    assert "close: atkd_test_mc" in str(err.value)
    assert not (out / "lm_eval" / "m.json").exists() and not (out / "lm_eval" / READY_FILE).exists()

    text = (lm_tasks / "atkd_test_mc.yaml").read_text()
    (lm_tasks / "atkd_test_mc.yaml").write_text(text.replace("{{question}}", "{{questionn}}"))
    lm = LmEvalConfig(tasks=["atkd_test_gen", "atkd_test_mc"], include_path=str(lm_tasks))
    with pytest.raises(EvalError) as err:
        run_models({"m": str(tiny_llama_dir), "n": str(tiny_llama_dir)}, lm, teacher_dir=str(tiny_llama_dir),
                   out_dir=out)
    assert "eval.lm_eval.tasks: task 'atkd_test_mc' cannot be" in str(err.value)  # loaded (lm-eval renders then)
    assert "UndefinedError: 'questionn' is undefined" in str(err.value)
    assert (out / "lm_eval" / ERROR_FILE).is_file() and not (out / "lm_eval" / "m.json").exists()
