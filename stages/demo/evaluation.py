"""What the demo adds to evaluation and the report; stages.eval.evaluate and stages.eval.report know no demo.

    rule = DemoAnswer()                                  # evaluate_models(..., answer_rule=rule)
    sections = [teacher_section(run_dir)]                # write_report(..., sections=sections)

The orchestrator passes them in when `eval.answer_rule` is "demo" (the default
with `demo.enabled`) and when the demo is enabled, respectively.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from stages.demo.task import TASKS, extract_answer, normalize_answer
from stages.errors import EvalError

TEACHER_METRICS = "demo_teacher.json"  # in <run_dir>/teacher/ (stages.demo.teacher writes it)


class DemoAnswer:
    """A demo row is correct when the answer inside any valid phrasing equals its `answer`; grouped by task."""

    description = "the answer extracted from any valid demo phrasing equals the row's answer"

    def score(self, row: dict, text: str) -> bool:
        return extract_answer(text, self.group(row)) == normalize_answer(row["answer"])

    def group(self, row: dict) -> str:
        if not isinstance(row.get("answer"), str) or row.get("task") not in TASKS:
            raise EvalError(f"eval.answer_rule=demo needs demo rows (a string `answer` and a `task` in "
                            f"{', '.join(TASKS)}); got a row with fields {sorted(row)}: set "
                            "eval.answer_rule=exact for other data")
        return row["task"]


def teacher_section(run_dir: str | os.PathLike) -> str:
    """The demo teacher's own training numbers as a report section ("" before the teacher is trained)."""
    path = Path(run_dir) / "teacher" / TEACHER_METRICS
    if not path.is_file():
        return ""
    m = json.loads(path.read_text())
    by_task = ", ".join(f"{k} {v:.2f}" for k, v in (m.get("validation_exact_match_by_task") or {}).items())
    return "\n".join([
        "## Demo teacher", "",
        (f"- {m.get('parameters', 0) / 1e6:.2f}M parameters, "
         + (f"trained on {m['train_examples']:,} examples, " if m.get("train_examples") else "")
         + f"{m.get('steps')} steps in "
         f"{m.get('train_seconds')} s ({m.get('steps_per_second')} steps/s), final loss {m.get('final_loss')}"),
        (f"- greedy exact match on {m.get('validation_examples')} validation examples: "
         f"{m.get('validation_exact_match')} ({by_task})"), ""])
