"""The run report: Markdown table and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import CacheConfig, DataConfig, TeacherConfig
from stages.eval.report import format_table, read_log, smooth, step_offsets, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RESULTS = {
    "teacher": {"exact_match": 0.9, "rouge_l": 0.8, "perplexity": 1.5, "kl_to_teacher": 0.001,
                "top1_agreement": 0.99, "ece": 0.021, "exact_match_by_task": {"add": 0.8, "sort": 1.0}, "seconds": 3.0,
                "answer_rule": "the answer inside any phrasing"},
    "atkd": {"exact_match": 0.5, "rouge_l": 0.6, "perplexity": 2.5, "kl_to_teacher": 0.3,
             "top1_agreement": 0.7, "ece": 0.15, "exact_match_by_task": {"add": 0.3, "sort": 0.7}, "seconds": 2.0},
    "broken": {"exact_match": None, "rouge_l": None, "perplexity": float("nan"), "kl_to_teacher": None,
               "top1_agreement": None},
}


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory, tiny_llama_dir, train_jsonl):
    from stages.teacher.capture import run_capture

    path = tmp_path_factory.mktemp("report") / "cache"
    run_capture(DataConfig(path=str(train_jsonl), max_seq_len=64),
                TeacherConfig(model=str(tiny_llama_dir), backend="transformers", top_k=8),
                CacheConfig(path=str(path), sequences_per_shard=16), progress=False)
    return str(path)


def _write_log(path, losses):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": i + 1, "loss": x, "ce": 2 * x, "lr": 1e-3}) for i, x in enumerate(losses)]
    path.write_text("\n".join(lines) + "\n{\"step\": 99, \"lo")  # last line cut by a kill
    return str(path)


def test_format_table():
    table = format_table(RESULTS)
    lines = table.splitlines()
    assert lines[0].startswith("| model | exact match")
    assert len(lines) == 2 + len(RESULTS)
    assert lines[0].endswith("| top-1 agreement (↑) | ECE (↓) |")
    assert "| teacher | 0.900 | 0.800 | 1.500 | 0.0010 | 0.990 | 0.021 |" in table
    assert lines[-1] == "| broken | - | - | - | - | - | - |"


def test_read_log_skips_bad_lines(tmp_path):
    steps, losses = read_log(_write_log(tmp_path / "log.jsonl", [3.0, 2.0, float("nan"), 1.0]))
    assert steps == [1, 2, 4] and losses == [3.0, 2.0, 1.0]
    assert read_log(tmp_path / "log.jsonl", "ce")[1] == [6.0, 4.0, 2.0]
    assert read_log(tmp_path / "missing.jsonl") == ([], [])


def test_write_report(tmp_path, train_cache):
    logs = {"atkd": _write_log(tmp_path / "s" / "atkd" / "log.jsonl", [3.0, 2.0, 1.5]),
            "kd": _write_log(tmp_path / "s" / "kd" / "log.jsonl", [3.2, 2.1, 1.4]),
            "missing": str(tmp_path / "nowhere" / "log.jsonl")}
    path = write_report(tmp_path, RESULTS, logs, train_cache, sections=["## From the caller\n\n- hello\n", " "])
    text = Path(path).read_text()
    assert path == str(tmp_path / "report" / "report.md")
    assert format_table(RESULTS) in text
    assert "| atkd | 0.300 | 0.700 |" in text  # per-task table
    for png in ("loss_curves.png", "teacher_uncertainty.png", "topk_coverage.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in text
    assert "top-8" in text
    assert "## From the caller\n\n- hello\n" in text
    assert text.index("## From the caller") < text.index("## Plots")
    assert "Exact match: the answer inside any phrasing." in text and "ECE: expected calibration error" in text
    assert not (tmp_path / "report" / "results.json").exists()  # stages.eval.evaluate is results.json's only writer


def test_write_report_without_cache_or_logs(tmp_path):
    path = write_report(tmp_path, {"teacher": RESULTS["teacher"]}, {}, None)
    assert "teacher" in Path(path).read_text()
    assert not any(p.suffix == ".png" for p in (tmp_path / "report").iterdir())


def test_report_reads_no_demo_file(tmp_path):
    """A demo_teacher.json in the run directory shows only when the caller passes the demo's section."""
    from stages.demo.evaluation import teacher_section

    assert teacher_section(tmp_path) == ""  # the demo teacher not trained yet
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "demo_teacher.json").write_text(json.dumps(
        {"parameters": 3_000_000, "train_examples": 20000, "steps": 600, "train_seconds": 200.0,
         "steps_per_second": 3.0, "final_loss": 0.3,
         "validation_examples": 150, "validation_exact_match": 0.9, "validation_exact_match_by_task": {"add": 0.8}}))
    plain = Path(write_report(tmp_path, RESULTS, {}, None)).read_text()
    assert "Demo teacher" not in plain
    with_demo = Path(write_report(tmp_path, RESULTS, {}, None, sections=[teacher_section(tmp_path)])).read_text()
    assert "## Demo teacher" in with_demo and "3.00M parameters" in with_demo and "add 0.80" in with_demo
    assert "trained on 20,000 examples, 600 steps" in with_demo
    assert "| atkd | 0.300 | 0.700 |" in with_demo  # the per-task table stays


def test_continuing_students_are_drawn_after_their_origin_and_smoothed(tmp_path, monkeypatch):
    """base trains 4 steps; kd continues it (init_from) for 3: kd's curve starts at step 5, on integer
    ticks, each curve once raw and once smoothed."""
    from matplotlib.figure import Figure

    drawn = {}
    save = Figure.savefig

    def capture(fig, *args, **kwargs):
        if str(args[0]).endswith("loss_curves.png"):
            ax = fig.axes[0]
            drawn["lines"] = [(line.get_label(), list(line.get_xdata())) for line in ax.get_lines()]
            drawn["ticks"] = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    logs = {"base": _write_log(tmp_path / "base" / "log.jsonl", [4.0, 3.0, 2.5, 2.2]),
            "kd": _write_log(tmp_path / "kd" / "log.jsonl", [2.1, 2.0, 1.9])}
    write_report(tmp_path, RESULTS, logs, None, continues={"kd": "base"})
    kd = [x for label, x in drawn["lines"] if label == "kd"]
    assert kd == [[5, 6, 7]]  # the smoothed, labelled line
    assert [5, 6, 7] in [x for _, x in drawn["lines"]][:-1]  # and the raw one under it
    assert [1, 2, 3, 4] in [x for label, x in drawn["lines"] if label == "base" or label.startswith("_")]
    assert drawn["ticks"] and all(float(t).is_integer() for t in drawn["ticks"])


def test_step_offsets_follow_init_from_chains():
    last = {"base": 500, "sft": 250, "more": 100, "solo": 50}
    offsets = step_offsets(last, {"sft": "base", "more": "sft", "orphan": "gone", "loop": "loop"})
    assert offsets == {"base": 0, "sft": 500, "more": 750, "solo": 0}


def test_smooth_is_a_centred_mean_that_keeps_length_and_level():
    x = [float(i % 2) for i in range(100)]  # 0, 1, 0, 1, ...: a window of 5 averages to 0.4-0.6
    y = smooth(x)
    assert y.shape == (100,) and np.all(np.abs(y[2:-2] - 0.5) <= 0.1 + 1e-12)
    assert smooth([3.0, 2.0]).tolist() == [3.0, 2.0]  # too short to smooth
    ramp = np.arange(200, dtype=float)
    assert np.allclose(smooth(ramp)[10:-10], ramp[10:-10])  # a centred mean does not lag a trend
