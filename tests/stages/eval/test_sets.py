"""eval.sets: several held-out sets, each with its own fields, checked against the training rows,
scored per model, and a table per set with their average in the report (stages/eval/sets.py)."""

from __future__ import annotations

import json

import pytest

from tests.support import harness as fh
from pipeline.config import ConfigError, load_config
from stages.errors import EvalError


def write_config(tmp_path, train_jsonl, model, sets: dict, **evaluation):
    evaluation = {"max_examples": 4, "max_new_tokens": 4, "batch_size": 4, "backend": "transformers",
                  "sets": sets, **evaluation}
    return fh.write_config(tmp_path / "cfg.yaml", model=str(model), data=str(train_jsonl),
                           run_dir=str(tmp_path / "run"), cache=str(tmp_path / "run" / "cache"),
                           extra={"eval": evaluation})


@pytest.fixture
def other_rows(tmp_path):
    """Held-out rows under other field names (question/answer), none of them a training row."""
    rows = [{"question": f"What is item {i}?", "answer": f" item {i} is new"} for i in range(6)]
    return fh.write_jsonl(tmp_path / "other.jsonl", rows)


@pytest.mark.parametrize("sets, expected", [
    ({"x": {"split": "test"}}, "eval.sets.x.path: missing"),
    ({"x": {"path": "a.jsonl", "template": "Q: {question}\n"}}, "eval.sets.x.template: {question} names no field"),
    ({"x": {"path": "a.jsonl", "kind": "text"}}, "eval.sets.x.kind"),
    ({"a.b": {"path": "a.jsonl"}}, "eval.sets.a.b: a set name is letters"),
    ({"x": {"path": "a.jsonl", "max_examples": 0}}, "eval.sets.x.max_examples: must be >= 1"),
    ({"x": {"path": "a.jsonl", "colour": 1}}, "eval.sets.x: unknown key(s) 'colour'"),
])
def test_bad_sets_fail_at_load_naming_the_set(tmp_path, train_jsonl, tiny_llama_dir, sets, expected):
    cfg = write_config(tmp_path, train_jsonl, tiny_llama_dir, sets)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert expected in str(err.value)


def test_a_set_with_missing_fields_is_refused_before_any_model_runs(tmp_path, train_jsonl, tiny_llama_dir,
                                                                       other_rows):
    from stages.eval.overlap import evaluation_sets

    from stages.rows import DataError

    cfg = load_config(write_config(tmp_path, train_jsonl, tiny_llama_dir, {"qa": {"path": str(other_rows)}}))
    with pytest.raises(DataError) as err:  # the data's prompt/response fields are not this set's
        evaluation_sets(cfg.data, cfg.eval)
    assert "eval.sets.qa:" in str(err.value) and "other.jsonl:1" in str(err.value)
    assert "'question'" in str(err.value) and "eval.sets.qa.fields" in str(err.value)


def test_sets_are_scored_per_model_and_checked_against_training_rows(tmp_path, train_jsonl, tiny_llama_dir,
                                                                     other_rows):
    from pipeline.evaluation import eval_settings
    from stages.eval.report_tables import average, eval_sections
    from stages.eval.evaluate import evaluate_models, read_example_scores

    sets = {"qa": {"path": str(other_rows), "fields": {"prompt": "question", "response": "answer"}},
            "again": {"path": str(other_rows), "fields": {"prompt": "question", "response": "answer"},
                      "template": "Q: {prompt}\nA:", "max_examples": 2}}
    cfg = load_config(write_config(tmp_path, train_jsonl, tiny_llama_dir, sets))
    out = tmp_path / "eval"
    results = evaluate_models({"m": str(tiny_llama_dir)}, eval_cfg=cfg.eval, data_cfg=cfg.data,
                              teacher_dir=str(tiny_llama_dir), out_dir=str(out), progress=False)
    got = results["m"]["sets"]
    assert list(got) == ["qa", "again"] and got["qa"]["num_examples"] == 4 and got["again"]["num_examples"] == 2
    for name, res in got.items():
        assert 0.0 <= res["rouge_l"] <= 1.0 and res["perplexity"] > 1.0 and res["train_overlap"] == 0
        scores = read_example_scores(out / "sets" / name / "m.generations.jsonl")
        assert len(scores["rouge_l"]) == res["num_examples"]
        assert sum(scores["rouge_l"]) / len(scores["rouge_l"]) == pytest.approx(res["rouge_l"])
    assert got["qa"]["perplexity"] != got["again"]["perplexity"]  # another template: other prompts
    assert results["m"]["exact_match"] is None  # no eval.path: no top-level generation metrics
    report = "\n".join(eval_sections(results))
    assert "### ROUGE-L per set" in report and "| model | qa | again | average |" in report
    mean = average([got["qa"]["rouge_l"], got["again"]["rouge_l"]])
    assert f"| {mean:.3f} |" in report.split("### ROUGE-L per set")[1].split("\n\n")[1]
    assert "### Set `again`" in report

    # the sets' rows are part of what the results were computed from
    before = eval_settings(cfg)["sources"]["eval_sets"]
    fh.write_jsonl(other_rows, [{"question": "changed?", "answer": "yes"}] * 3)
    assert eval_settings(cfg)["sources"]["eval_sets"]["qa"] != before["qa"]


def test_a_set_holding_training_rows_is_refused_under_its_own_field_names(tmp_path, train_jsonl, tiny_llama_dir):
    from stages.eval.overlap import check_train_overlap, evaluation_sets

    train = [json.loads(line) for line in train_jsonl.read_text().splitlines()]
    renamed = [{"q": r["prompt"], "a": r["response"]} for r in train[3:5]] + [{"q": "fresh", "a": "row"}]
    path = fh.write_jsonl(tmp_path / "leaky.jsonl", renamed)
    cfg = load_config(write_config(tmp_path, train_jsonl, tiny_llama_dir,
                                   {"leaky": {"path": str(path), "fields": {"prompt": "q", "response": "a"}}}))
    sets, source = evaluation_sets(cfg.data, cfg.eval)
    with pytest.raises(EvalError) as err:
        check_train_overlap(cfg.data, sets, allow=False, source=source)
    assert "2 of the 3 eval.sets.leaky rows" in str(err.value)
    assert f"eval.sets.leaky {path}:1 = training {train_jsonl}:4" in str(err.value)
    record = check_train_overlap(cfg.data, sets, allow=True, source=source)
    assert record["by_set"] == {"eval.sets.leaky": 2}


def test_sweep_report_has_intervals_per_set():
    from stages.eval.report_tables import sweep_sets_section
    from stages.eval.sweep_report import SeedResult

    def seed(k, shift):
        sets = {"a": {"rouge_l": 0.2 + shift, "exact_match": 0.5}, "b": {"rouge_l": 0.4 + shift, "exact_match": 0.0}}
        per = {"a": {"rouge_l": [0.1 + shift, 0.3 + shift], "exact_match": [1.0, 0.0]},
               "b": {"rouge_l": [0.4 + shift, 0.4 + shift], "exact_match": [0.0, 0.0]}}
        return SeedResult(k, {"sets": sets}, {}, per)

    lines = sweep_sets_section({("default", "kd"): [seed(0, 0.0), seed(1, 0.1)]})
    text = "\n".join(lines)
    assert "| teacher | model | a | b | average |" in text
    row = [line for line in text.split("### ROUGE-L per set")[1].splitlines() if line.startswith("| default | kd")][0]
    cells = row.split(" | ")
    assert cells[2].startswith("0.250 [") and cells[3].startswith("0.450 [") and cells[4].startswith("0.350 [")
    assert sweep_sets_section({("default", "kd"): [SeedResult(0, {}, {})]}) == []


def test_atkd_eval_refuses_a_set_with_missing_fields_before_any_model_runs(tmp_path, train_jsonl, tiny_llama_dir,
                                                                           other_rows, capsys):
    from tests.support.fixtures import atkd_here

    cfg = write_config(tmp_path, train_jsonl, tiny_llama_dir, {"qa": {"path": str(other_rows)}})
    rc, out = atkd_here(capsys, "eval", str(cfg))
    assert rc == 1 and "eval.sets.qa:" in out and "field 'response' is missing" in out, out
    assert "Traceback" not in out and "eval.sets.qa.fields (it maps nothing)" in out
    assert not (tmp_path / "run" / "eval" / "results.json").exists()
