"""`--dry-run` sees what it can, and evaluation rows that are training rows are refused before anything
trains (issue 23, items 6 and 7), through the CLI.

Each problem the real run would stop at is a `PROBLEM:` line (exit 1), nothing is written, no engine starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support import harness as fh
from tests.support.fixtures import atkd_here, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir, train_jsonl):
    root = tmp_path_factory.mktemp("dry")
    cfg = fh.write_config(root / "cfg.yaml", model=str(tiny_llama_dir), data=str(train_jsonl),
                          run_dir=str(root / "run"), cache=str(root / "run" / "cache"))
    return {"root": root, "cfg": str(cfg), "data": str(train_jsonl), "model": str(tiny_llama_dir)}


def dry(capsys, setup, *overrides: str, command: str = "run") -> tuple[int, str, list[str]]:
    rc, out = atkd_here(capsys, command, setup["cfg"], "--dry-run", *overrides)
    return rc, out, [line.strip()[len("PROBLEM: "):] for line in out.splitlines() if line.strip().startswith("PROBLEM")]


# (overrides, the problem's text, other text of the plan)
CASES = {
    "missing_data_file": (["data.path=/nonexistent/train.jsonl"],
                          "data.path '/nonexistent/train.jsonl': file not found; check data.path",
                          "row count unknown (see the problem above)"),
    "missing_local_data_dir": (["data.path=./no/such/dir"], "data.path './no/such/dir': no such file or directory",
                               ""),
    "missing_teacher": (["teacher.model=/nonexistent/teacher"],
                        "teacher.model '/nonexistent/teacher': no such directory",
                        "parameters unknown (its vocabulary is the teacher's, and teacher.model is not a local model)"),
    "missing_field": (["data.response_field=answer"], "train.jsonl:1: field 'answer' is missing",
                      "upper bound: data.max_seq_len per row; the rows could not be tokenised (see the problem)"),
    "all_rows_over_long": (["data.max_seq_len=4", "data.overlong=skip"],
                           "the first 40 rows: 40 of 40 rows (100%) were dropped (40 over-long, 0 bad)", ""),
    "top_k_above_vocabulary": (["teacher.top_k=100000"],
                               "teacher.top_k=100000 exceeds the vocabulary of teacher.model", ""),
    "student_model_missing": (["students.s1.init=null", "students.s1.model=/nonexistent/student"],
                              "students[0].model '/nonexistent/student': no such directory", ""),
    "eval_rows_are_training_rows": (["eval.path={data}"],
                                    "evaluation rows are training rows: 40 of the 40 test rows", ""),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_names_what_the_run_would_stop_at(setup, capsys, case):
    overrides, problem, also = CASES[case]
    rc, out, problems = dry(capsys, setup, *[o.format(data=setup["data"]) for o in overrides])
    assert rc == 1, out
    assert len(problems) == 1 and problem in problems[0], out
    assert also in out
    assert "not a local directory" not in out  # the old message for any tokenisation failure
    assert "the dry run found 1 problem(s) the run would stop at" in out
    assert not (setup["root"] / "run").exists()  # nothing written


def test_dry_run_of_a_good_config_has_no_problem_and_shows_sampled_targets_as_such(setup, capsys):
    rc, out, problems = dry(capsys, setup)
    assert rc == 0 and problems == [], out
    rc, out, problems = dry(capsys, setup, "teacher.targets=sampled", command="teacher")
    assert rc == 0 and problems == [], out
    assert "16 draws per position (no top-k: teacher.top_k is not used)" in out and "top_k 8" not in out


def test_dry_run_checks_an_existing_cache_against_the_config(setup, capsys, tmp_path):
    cfg = fh.write_config(tmp_path / "cfg.yaml", model=setup["model"], data=setup["data"],
                          run_dir=str(tmp_path / "run"), cache=str(tmp_path / "run" / "cache"))
    rc, out = atkd_here(capsys, "teacher", str(cfg))
    assert rc == 0, out
    rc, out = atkd_here(capsys, "teacher", str(cfg), "--dry-run")
    assert rc == 0 and "complete" in out and "it matches the config" in out, out
    rc, out = atkd_here(capsys, "teacher", str(cfg), "--dry-run", "data.max_seq_len=48")
    assert rc == 1, out
    assert "PROBLEM: stage one would refuse the teacher cache" in out and "identity.max_seq_len: 64 -> 48" in out


def test_overlap_is_found_before_anything_trains(setup, capsys, tmp_path):
    """The evaluation rows are the training rows: `atkd run`, `teacher` and `student` refuse before any work."""
    cfg = yaml.safe_load(Path(setup["cfg"]).read_text())
    cfg["run_dir"], cfg["cache"]["path"] = str(tmp_path / "run"), str(tmp_path / "run" / "cache")
    cfg["eval"] = {"path": setup["data"], "max_examples": 8}
    path = tmp_path / "overlap.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for command in ("run", "teacher", "student"):
        rc, out = atkd_here(capsys, command, str(path))
        assert rc == 1, out
        assert "EvalError: evaluation rows are training rows: 8 of the 8 test rows" in out
        assert not (tmp_path / "run" / "cache").exists() and not (tmp_path / "run" / "students").exists()
        assert not (tmp_path / "run" / "config.yaml").exists()
    # A split whose held-out rows repeat training rows (duplicates in data.path): found when the split is made.
    rows = fh.prompt_response_rows(30)
    data = write_jsonl(tmp_path / "dup.jsonl", rows + rows[:10])
    rc, out = atkd_here(capsys, "run", str(path), f"data.path={data}", "eval.path=",
                        "data.holdout={validation: 0, test: 10, seed: 0}")
    assert rc == 1 and "evaluation rows are training rows" in out and "remove the repeated rows" in out, out
    assert not (tmp_path / "run" / "cache").exists()
