"""The demo's own lm-evaluation-harness task: multiple choice over the held-out test rows.

    write_demo_mc_task(data_dir, out_dir, data_cfg)   # <out_dir>/atkd_demo_mc.yaml + .jsonl

Each of the first `MC_EXAMPLES` test rows (disjoint from the training rows by
construction, stages/demo/task.py) becomes a question: the prompt rendered with
the students' own template (stages.data.render_prompt), and four continuations
in one fixed phrasing, the right answer and three other answers of the same task
drawn from the test split. lm-eval scores them by log-likelihood (`acc`, and
`acc_norm` per byte). A pure function of the test split and the template;
rewritten only when its content changes, so lm-eval results stay current.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from stages.demo.task import read_jsonl
from storage.files import atomic_write

TASK = "atkd_demo_mc"
MC_EXAMPLES = 100
CHOICES = 4
PHRASING = "The answer is {answer}."  # one of the demo's phrasings (stages.demo.task.PHRASINGS)


def mc_rows(test_rows: list[dict], data_cfg, seed: int = 0) -> list[dict]:
    """Questions with CHOICES continuations each (label: the right one's index)."""
    from stages.data import render_prompt

    rng = random.Random(f"atkd-demo-mc/{seed}")  # noqa: S311 - seeded demo data, no secret
    answers: dict[str, list[str]] = {}
    for row in test_rows:
        answers.setdefault(row["task"], [])
        if row["answer"] not in answers[row["task"]]:
            answers[row["task"]].append(row["answer"])
    out = []
    for row in test_rows[:MC_EXAMPLES]:
        others = [a for a in answers[row["task"]] if a != row["answer"]]
        if len(others) < CHOICES - 1:
            continue  # too few distinct answers in the split for this task (not with the demo's sizes)
        picked = rng.sample(others, CHOICES - 1)
        label = rng.randrange(CHOICES)
        picked.insert(label, row["answer"])
        out.append({"text": render_prompt(row, data_cfg), "task": row["task"],
                    "choices": [PHRASING.format(answer=a) for a in picked], "label": label})
    return out


def task_yaml(data_file: Path) -> str:
    return "\n".join([
        "# The atkd demo's multiple-choice task (stages/demo/lm_eval_task.py); written by the demo, do not edit.",
        f"task: {TASK}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file.resolve()))}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{text}}"',
        'doc_to_choice: "{{choices}}"',
        "doc_to_target: label",
        'target_delimiter: ""  # the response follows the template directly, as in training',
        "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        "metadata:",
        "  version: 1.0", ""])


def write_demo_mc_task(data_dir: str | Path, out_dir: str | Path, data_cfg, seed: int = 0) -> Path:
    """Write (or keep, when unchanged) the task's YAML and data under out_dir; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / f"{TASK}.jsonl"
    rows = mc_rows(read_jsonl(Path(data_dir) / "test.jsonl"), data_cfg, seed)
    files = {data_file: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
             out / f"{TASK}.yaml": task_yaml(data_file)}
    for path, text in files.items():
        if not path.is_file() or path.read_text() != text:
            atomic_write(path, text)
    return out
