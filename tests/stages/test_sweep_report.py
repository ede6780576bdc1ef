"""stages.sweep_report on made-up results with known means: the table, the comparisons, the files."""

import json

import numpy as np
import pytest

from stages.sweep_report import SeedResult, Sweep, cell_estimates, difference, write_sweep_report


def _seed(seed: int, hits: list[int], ppl: float) -> SeedResult:
    rouge = [0.5 * h for h in hits]
    metrics = {"exact_match": float(np.mean(hits)), "rouge_l": float(np.mean(rouge)), "perplexity": ppl,
               "kl_to_teacher": 0.1 * ppl, "top1_agreement": 0.5, "ece": None}
    return SeedResult(seed, metrics, {"exact_match": [float(h) for h in hits], "rouge_l": rouge})


def _cells():
    return {
        ("default", "sft"): [_seed(0, [1, 0, 0, 0], 2.0), _seed(1, [0, 1, 0, 0], 2.2)],
        ("default", "kd"): [_seed(0, [1, 1, 0, 0], 1.8), _seed(1, [1, 1, 1, 0], 2.0)],
        ("default", "kd-x"): [_seed(0, [1, 1, 1, 1], 1.0), _seed(1, [1, 1, 1, 1], 1.0)],
        ("top8", "kd"): [_seed(0, [0, 0, 0, 0], 3.0), _seed(1, [0, 0, 0, 1], 3.0)],
    }


def test_estimates_and_paired_differences_have_the_known_means():
    cells = _cells()
    est = cell_estimates(cells)
    assert est[("default", "kd")]["exact_match"].mean == pytest.approx((0.5 + 0.75) / 2)
    assert est[("default", "kd")]["exact_match"].examples == 4  # per example
    assert est[("default", "kd")]["perplexity"].examples == 1  # corpus-level: over seeds only
    assert est[("default", "kd")]["perplexity"].mean == pytest.approx(1.9)
    assert est[("default", "kd")]["ece"] is None
    d = difference(cells, ("default", "kd"), ("default", "sft"), "exact_match")
    assert d.mean == pytest.approx(0.625 - 0.25)
    d = difference(cells, ("default", "kd-x"), ("default", "kd"), "exact_match")  # every example of kd-x right
    assert d.mean == pytest.approx(0.375) and 0.0 <= d.lo < d.mean < d.hi <= 1.0
    assert difference(cells, ("default", "kd"), ("nope", "kd"), "exact_match") is None


def test_report_files_and_sections(tmp_path):
    about = Sweep(lines=["- seeds [0, 1]"], teachers={"default": "", "top8": "teacher.top_k=8"},
                  variants=[("kd-x", "kd", "loss.ce_weight=1.0")], baseline="sft",
                  runs=[{"teacher": "default", "seed": 0, "run_dir": "r0", "seconds": 12.3}])
    path = write_sweep_report(tmp_path, _cells(), about)
    text = open(path).read()
    assert "| default | kd | 2 | 0.625 [" in text
    assert "## Against `sft`" in text and "| default | kd | +0.375 [" in text
    assert "## Teachers compared" in text and "- `top8`: teacher.top_k=8" in text
    assert "| top8 | +" not in text.split("against the same model")[0]  # Δ rows only in the second table
    assert "| top8 | -0.500 [" in text  # kd under top8 (0.125) minus kd under default (0.625)
    assert "| default | kd-x | kd | loss.ce_weight=1.0 | 1.000 [1.000, 1.000] |" in text
    assert "over seeds only" in text and "| default | 0 | `r0` | 12 |" in text
    results = json.loads((tmp_path / "results.json").read_text())
    cell = next(c for c in results["cells"] if (c["teacher"], c["model"]) == ("default", "kd"))
    assert cell["seeds"] == [0, 1] and cell["per_seed"]["perplexity"] == [1.8, 2.0]
    assert cell["metrics"]["exact_match"]["lo"] <= 0.625 <= cell["metrics"]["exact_match"]["hi"]
    assert (tmp_path / "sweep.png").stat().st_size > 5000
    write_sweep_report(tmp_path / "again", _cells(), about)
    assert (tmp_path / "again" / "report.md").read_text() == text  # deterministic
