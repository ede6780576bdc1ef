"""eval.lm_eval, what is checked without running lm-eval: install, task YAMLs, the results' form, the
report table and what makes results stale (stages/eval/lm_harness.py, stages/eval/report_tables.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support import harness as fh
from pipeline.config import ConfigError, load_config
from stages.eval import lm_harness


def config(tmp_path, train_jsonl, model, **lm):
    return fh.write_config(tmp_path / "cfg.yaml", model=str(model), data=str(train_jsonl),
                           run_dir=str(tmp_path / "run"), cache=str(tmp_path / "run" / "cache"),
                           extra={"eval": {"lm_eval": lm}})


def test_a_config_asking_for_lm_eval_without_it_fails_at_load_with_the_install_command(
        tmp_path, train_jsonl, tiny_llama_dir, monkeypatch):
    cfg = config(tmp_path, train_jsonl, tiny_llama_dir, tasks=["mmlu"])
    monkeypatch.setattr(lm_harness, "installed", lambda: False)  # as on a machine without the extra
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "eval.lm_eval.tasks (mmlu) needs lm-evaluation-harness" in str(err.value)
    assert "pip install 'atkd[lm-eval]'" in str(err.value)
    load_config(config(tmp_path, train_jsonl, tiny_llama_dir))  # no tasks: not needed


def test_a_task_yaml_that_does_not_parse_fails_at_load_naming_file_and_line(tmp_path, train_jsonl, tiny_llama_dir,
                                                                            lm_tasks):
    load_config(config(tmp_path, train_jsonl, tiny_llama_dir, tasks=["atkd_test_mc"], include_path=str(lm_tasks)))
    broken = lm_tasks / "broken.yaml"
    broken.write_text("task: broken\ndataset_path: json\n  doc_to_text: \"x\n: [\n")
    with pytest.raises(ConfigError) as err:
        load_config(config(tmp_path, train_jsonl, tiny_llama_dir, tasks=["atkd_test_mc"],
                           include_path=str(lm_tasks)))
    assert f"task YAML {broken} line 3, column 14 does not parse" in str(err.value)
    broken.unlink()
    with pytest.raises(ConfigError, match="include_path: '/nope' is not a directory"):
        load_config(config(tmp_path, train_jsonl, tiny_llama_dir, tasks=["x"], include_path="/nope"))
    with pytest.raises(ConfigError, match="eval.lm_eval.batch_size: must be >= 1"):
        load_config(config(tmp_path, train_jsonl, tiny_llama_dir, tasks=["x"], batch_size=0))


def test_local_task_names_come_from_the_yamls_and_function_tags_are_read(lm_tasks):
    (lm_tasks / "sub").mkdir()
    (lm_tasks / "sub" / "grouped.yaml").write_text("group: my_group\ntask: [atkd_test_mc, atkd_test_gen]\n"
                                                   "process_docs: !function utils.process\n")
    names = lm_harness.local_tasks(str(lm_tasks))
    assert set(names) == {"atkd_test_mc", "atkd_test_gen", "my_group"}
    assert names["my_group"].name == "grouped.yaml"


def test_results_are_json_numbers_with_metric_filter_value_and_stderr():
    raw = {"results": {"t": {"alias": "t", "acc,none": np.float64(0.25), "acc_stderr,none": np.float64(0.1),
                             "exact_match,strip": np.float32(0.5), "exact_match_stderr,strip": "N/A"}},
           "versions": {"t": 2.0}, "n-shot": {"t": np.int64(0)}, "n-samples": {"t": {"original": 8, "effective": 4}},
           "config": {"model_dtype": np.dtype("float32")}}
    from stages.eval.lm_harness_worker import summarise

    tasks = summarise(raw)
    json.dumps(tasks)  # lm-eval's numpy scalars and dtypes do not survive json.dumps as they are
    assert tasks == {"t": {"version": 2.0, "n_shot": 0, "samples": 4, "metrics": [
        {"metric": "acc", "filter": "none", "value": 0.25, "stderr": 0.1},
        {"metric": "exact_match", "filter": "strip", "value": 0.5, "stderr": None}]}}


def test_report_table_has_a_row_per_model_and_a_column_per_task_metric():
    from stages.eval.report_tables import eval_sections

    def entry(acc):
        return {"lm_eval": {"version": "0.4.13", "model_args": "pretrained=x,dtype=float32", "batch_size": 8,
                            "limit": None, "tasks": {"t": {"version": 1.0, "n_shot": 0, "samples": 10, "metrics": [
                                {"metric": "acc", "filter": "none", "value": acc, "stderr": 0.05}]}}}}

    text = "\n".join(eval_sections({"kd": entry(0.4), "teacher": entry(0.75)}))
    assert "## lm-evaluation-harness" in text and "| model | t acc |" in text
    assert "| kd | 0.4000 ± 0.0500 |" in text and "| teacher | 0.7500 ± 0.0500 |" in text
    assert "lm-eval 0.4.13" in text and "t v1.0, 0-shot, 10 examples" in text


def test_task_files_and_their_data_are_part_of_what_results_depend_on(tmp_path, lm_tasks):
    lm = lm_harness.LmEvalConfig(tasks=["atkd_test_mc"], include_path=str(lm_tasks))
    before = lm_harness.fingerprint(lm)
    assert before["version"] == lm_harness.installed_version()
    assert lm_harness.fingerprint(lm) == before
    with open(lm_tasks / "data" / "mc.jsonl", "a") as f:
        f.write(json.dumps({"question": "What is 1 plus 1?", "choices": ["2", "3", "4", "5"], "label": 0}) + "\n")
    after_data = lm_harness.fingerprint(lm)
    assert after_data != before
    (lm_tasks / "atkd_test_mc.yaml").write_text((lm_tasks / "atkd_test_mc.yaml").read_text() + "# edit\n")
    assert lm_harness.fingerprint(lm) != after_data
    assert lm_harness.fingerprint(lm_harness.LmEvalConfig()) is None
