"""The demo's lm-eval task: multiple choice over the held-out test rows, never a training prompt."""

from __future__ import annotations

import json

import yaml

from stages.data_config import DataConfig
from stages.demo import task as demo_task
from stages.demo.lm_eval_task import CHOICES, MC_EXAMPLES, PHRASING, TASK, write_demo_mc_task


def test_demo_mc_task_is_built_from_test_rows_with_the_students_template(tmp_path):
    splits = demo_task.generate_splits(0, train=400, validation=50, test=150)
    data = tmp_path / "data"
    data.mkdir()
    for name, rows in splits.items():
        demo_task.write_jsonl(rows, data / f"{name}.jsonl")
    data_cfg = DataConfig(template="### Instruction:\n{prompt}\n\n### Response:\n")
    out = write_demo_mc_task(data, tmp_path / "lm_eval", data_cfg)
    spec = yaml.safe_load((out / f"{TASK}.yaml").read_text())
    assert spec["task"] == TASK and spec["output_type"] == "multiple_choice" and spec["target_delimiter"] == ""
    rows = [json.loads(line) for line in (out / f"{TASK}.jsonl").read_text().splitlines()]
    assert spec["dataset_kwargs"]["data_files"]["test"] == str((out / f"{TASK}.jsonl").resolve())
    assert len(rows) == MC_EXAMPLES
    train_prompts = {r["prompt"] for r in splits["train"]}
    for row, source in zip(rows, splits["test"]):
        assert row["text"] == f"### Instruction:\n{source['prompt']}\n\n### Response:\n"
        assert source["prompt"] not in train_prompts  # held out, as every demo evaluation row
        assert len(set(row["choices"])) == CHOICES and row["choices"][row["label"]] == PHRASING.format(
            answer=source["answer"])
    # unchanged content is not rewritten (lm-eval's results stay current); the same inputs give the same task
    stamp = (out / f"{TASK}.jsonl").stat().st_mtime_ns
    write_demo_mc_task(data, tmp_path / "lm_eval", data_cfg)
    assert (out / f"{TASK}.jsonl").stat().st_mtime_ns == stamp
