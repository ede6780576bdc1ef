"""stages.eval.sweep_report on made-up results with known means: the table, the comparisons, the files."""

import json

import numpy as np
import pytest

from stages.eval.sweep_report import SeedResult, Sweep, cell_estimates, difference, predictions, write_sweep_report


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


def _five_seeds():
    values = {"kd": [0.40, 0.45, 0.50, 0.47, 0.43], "teacher": [0.8] * 5, "bad": [0.02, 0.0, 0.01, 0.03, 0.0]}
    return {("default", m): [SeedResult(k, {"exact_match": v, "kl_to_teacher": 0.0 if m == "teacher" else 0.3,
                                            "perplexity": 2.0})
                             for k, v in enumerate(vs)] for m, vs in values.items()}


def test_one_new_run_section_gives_each_seed_and_a_prediction_interval(tmp_path):
    cells = _five_seeds()
    pred = predictions(cells)
    kd = pred[("default", "kd")]["exact_match"]
    half = 2.7764451 * np.std([0.40, 0.45, 0.50, 0.47, 0.43], ddof=1) * np.sqrt(1.2)
    assert kd.lo == pytest.approx(0.45 - half) and kd.hi == pytest.approx(0.45 + half)
    assert pred[("default", "teacher")]["exact_match"] is None  # the same model in every run
    assert pred[("default", "bad")]["exact_match"].lo == 0.0  # clipped to the metric's range
    text = open(write_sweep_report(tmp_path, cells, Sweep())).read()
    section = text.split("## One new run")[1].split("\n## ")[0]
    assert "| teacher | model | seed 0 | seed 1 | seed 2 | seed 3 | seed 4 | sd | one new run (95%) |" in section
    interval = f"[{0.45 - half:.3f}, {0.45 + half:.3f}]"
    assert f"| default | kd | 0.400 | 0.450 | 0.500 | 0.470 | 0.430 | 0.038 | {interval} |" in section
    assert "| default | teacher | 0.800 | 0.800 | 0.800 | 0.800 | 0.800 | 0.000 | - |" in section
    results = json.loads((tmp_path / "results.json").read_text())
    cell = next(c for c in results["cells"] if c["model"] == "kd")
    assert cell["one_new_run"]["exact_match"]["lo"] == pytest.approx(0.45 - half)


def test_sweep_plot_axes_stay_inside_each_metrics_range(tmp_path, monkeypatch):
    """A teacher with KL 0 and a student near 0 exact match: matplotlib's margins would put the axes
    below 0; the plot keeps [0, 1] metrics inside [0, 1] and KL at >= 0."""
    from matplotlib.figure import Figure

    limits = {}
    save = Figure.savefig

    def capture(fig, *args, **kwargs):
        limits.update({ax.get_title().split(" (")[0]: ax.get_xlim() for ax in fig.axes})
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    write_sweep_report(tmp_path, _five_seeds(), Sweep())
    assert limits["exact match"][0] >= 0.0 and limits["exact match"][1] <= 1.0
    assert limits["KL(teacher ‖ model)"][0] >= 0.0
    assert limits["perplexity"][0] >= 1.0


def test_sweep_plot_takes_a_constant_metric_over_ten_seeds(tmp_path):
    """Ten seeds of one value (a teacher's): the bootstrap's upper end sat 1.4e-17 below the mean and
    matplotlib refused the negative error bar, which stopped `atkd sweep` after its seventh run."""
    cells = {("default", "teacher"): [SeedResult(k, {"exact_match": 0.1, "perplexity": 1.472}) for k in range(10)]}
    est = cell_estimates(cells)[("default", "teacher")]["exact_match"]
    assert est.hi < est.mean  # the float noise this test is about
    write_sweep_report(tmp_path, cells, Sweep())
    assert (tmp_path / "sweep.png").stat().st_size > 5000


def test_machine_names_the_cpu_kind_and_the_kernels_torch_uses():
    """'AMD EPYC' alone covered two CPU kinds that round differently (AVX-512 and AVX2 kernels)."""
    import torch

    from stages.eval.sweep_report import machine

    text = machine()
    assert f"torch CPU kernels {torch.backends.cpu.get_cpu_capability()}" in text and "logical cores" in text
    if "cpu family" in open("/proc/cpuinfo").read():
        assert "(family " in text
