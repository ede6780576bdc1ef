"""The report of a sweep: every (teacher, model) cell's metrics over seeds, with 95% intervals.

    cells = {("default", "kd"): [SeedResult(seed, metrics, examples), ...], ...}
    path = write_sweep_report(out_dir, cells, about=Sweep(...))   # report.md, results.json, sweep.png

It only reads what it is given (pipeline/sweep.py collects each run's
eval/results.json and per-example scores) and writes three files in out_dir.
Intervals come from stages.eval.bootstrap: over seeds and, for exact match and
ROUGE-L, over the evaluation examples within each seed; perplexity, KL, top-1
agreement and ECE are corpus-level numbers per run, so over seeds only.
With `eval.sets`, exact match and ROUGE-L per set and their average get
intervals too (stages.eval.report_tables).
Then where one new run lands: per seed, the exact match of every run, and a
95% prediction interval for one new run (stages.eval.bootstrap.prediction_interval:
the seeds' mean ± a t-quantile times their spread), the range a fresh run on
another seed or CPU kind should fall in. Sections beyond these appear when the
sweep has what they compare:
differences against a baseline student, the teachers side by side (teacher
size, top-k), and students derived from another one (ATKD's hard_ratio,
easy_weight, base).
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from stages.eval.bootstrap import LEVEL, SAMPLES, SEED, Estimate, bootstrap_mean, paired_difference, prediction_interval
from stages.eval.evaluate import EXAMPLE_METRICS
from stages.eval.report import COLUMNS
from stages.eval.report_tables import sweep_sets_section
from storage.files import atomic_write

COMPARED = ("exact_match", "rouge_l")  # metrics of the difference tables
PLOT = "sweep.png"
RANGES = {  # each metric's possible values: the plot's axis stays inside them
    "exact_match": (0.0, 1.0), "rouge_l": (0.0, 1.0), "top1_agreement": (0.0, 1.0), "ece": (0.0, 1.0),
    "kl_to_teacher": (0.0, None), "perplexity": (1.0, None),
}
TEACHER = "teacher"  # the model name of the teacher's row in each run's results


@dataclass
class SeedResult:
    seed: int
    metrics: dict  # the model's entry of the run's eval/results.json
    examples: dict[str, list[float]] = field(default_factory=dict)  # per-example EXAMPLE_METRICS
    set_examples: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # eval.sets: set -> the same


@dataclass
class Sweep:
    """What the report says about the sweep besides the numbers."""

    title: str = "ATKD sweep report"
    lines: list[str] = field(default_factory=list)  # sweep file, seeds, wall time, ... (Markdown bullets)
    teachers: dict[str, str] = field(default_factory=dict)  # name -> what it changes
    variants: list[tuple[str, str, str]] = field(default_factory=list)  # (name, from, what it changes)
    baseline: str | None = None  # student the others are compared with
    runs: list[dict] = field(default_factory=list)  # {teacher, seed, run_dir, seconds}


Cells = dict[tuple[str, str], list[SeedResult]]


# ---------------------------------------------------------------- statistics


def _values(results: list[SeedResult], metric: str) -> list[list[float]]:
    """Per seed: the per-example values when there are any, else the run's corpus-level value (or nothing)."""
    out = []
    for r in results:
        per_example = r.examples.get(metric) if metric in EXAMPLE_METRICS else None
        value = r.metrics.get(metric)
        if per_example:
            out.append(per_example)
        elif _finite(value):
            out.append([float(value)])
        else:
            out.append([])
    return out


def cell_estimates(cells: Cells) -> dict[tuple[str, str], dict[str, Estimate | None]]:
    return {cell: {key: bootstrap_mean(_values(results, key), key=f"{cell[0]}/{cell[1]}/{key}")
                   for key, *_ in COLUMNS}
            for cell, results in cells.items()}


def predictions(cells: Cells) -> dict[tuple[str, str], dict[str, Estimate | None]]:
    """Per cell and metric: the prediction interval for one new run from the seeds' values, clipped to
    the metric's range (None for the teacher, the same model in every seed's run)."""
    out: dict[tuple[str, str], dict[str, Estimate | None]] = {}
    for cell, results in cells.items():
        out[cell] = {}
        for key, *_ in COLUMNS:
            est = None if cell[1] == TEACHER else prediction_interval([r.metrics.get(key) for r in results])
            low, high = RANGES.get(key, (None, None))
            if est is not None:
                est = replace(est, lo=est.lo if low is None else max(est.lo, low),
                              hi=est.hi if high is None else min(est.hi, high))
            out[cell][key] = est
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def difference(cells: Cells, a: tuple[str, str], b: tuple[str, str], metric: str) -> Estimate | None:
    """a - b paired by seed (the seeds both have) and by example where both have per-example values."""
    if a not in cells or b not in cells:
        return None
    by_seed = {r.seed: r for r in cells[b]}
    pairs = [(r, by_seed[r.seed]) for r in cells[a] if r.seed in by_seed]
    xa, xb = _values([p[0] for p in pairs], metric), _values([p[1] for p in pairs], metric)
    keep = [(x, y) for x, y in zip(xa, xb) if x and y]
    if not keep:
        return None
    if any(len(x) != len(y) for x, y in keep):  # not the same examples: compare the seeds' means
        keep = [([sum(x) / len(x)], [sum(y) / len(y)]) for x, y in keep]
    return paired_difference([x for x, _ in keep], [y for _, y in keep],
                             key=f"{a[0]}/{a[1]}-{b[0]}/{b[1]}/{metric}")


# ---------------------------------------------------------------- tables


def fmt(est: Estimate | None, spec: str = "{:.3f}", signed: bool = False) -> str:
    if est is None:
        return "-"
    f = spec.replace("{:", "{:+") if signed else spec
    return f"{f.format(est.mean)} [{spec.format(est.lo)}, {spec.format(est.hi)}]"


def _label(cell: tuple[str, str], one_teacher: bool) -> str:
    return cell[1] if one_teacher else f"{cell[0]} / {cell[1]}"


def main_table(cells: Cells, estimates) -> list[str]:
    headers = ["teacher", "model", "seeds"] + [f"{h} ({'↑' if b == 'higher' else '↓'})" for _, h, _, b in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for cell, results in cells.items():
        row = [cell[0], cell[1], str(len(results))]
        row += [fmt(estimates[cell][key], spec) for key, _, spec, _ in COLUMNS]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def prediction_section(cells: Cells, predicted, metric: str = "exact_match") -> list[str]:
    """Each seed's value and where one new run lands (95% prediction interval)."""
    seeds = sorted({r.seed for results in cells.values() for r in results})
    if len(seeds) < 2:
        return []
    header = "| teacher | model | " + " | ".join(f"seed {k}" for k in seeds) + f" | sd | one new run ({LEVEL:.0%}) |"
    lines = [f"## One new run: where it lands ({metric.replace('_', ' ')})", "",
             (f"Each seed's value, the seeds' standard deviation, and a {LEVEL:.0%} prediction interval for one "
              "new run (another seed, or the same seed on another machine, whose rounding sends training down "
              "another path): mean ± t · sd · √(1 + 1/n), t Student's quantile with n − 1 degrees of freedom. "
              "The interval of the table above is for the mean over seeds; this one is for a single run. The "
              "teacher is the same model in every run, so the seeds give it no spread (a teacher trained on "
              "another CPU kind can differ: that is not measured here)."), "",
             header, "|---|---|" + "---:|" * (len(seeds) + 2)]
    for cell, results in cells.items():
        value = {r.seed: r.metrics.get(metric) for r in results}
        row = ["{:.3f}".format(value[k]) if _finite(value.get(k)) else "-" for k in seeds]
        est = predicted[cell][metric]
        xs = [v for v in value.values() if _finite(v)]
        sd = "{:.3f}".format(float(np.std(xs, ddof=1))) if len(xs) > 1 else "-"
        interval = f"[{est.lo:.3f}, {est.hi:.3f}]" if est is not None else "-"
        lines.append(f"| {cell[0]} | {cell[1]} | " + " | ".join(row) + f" | {sd} | {interval} |")
    return lines + [""]


def baseline_section(cells: Cells, baseline: str) -> list[str]:
    rows = []
    for teacher in dict.fromkeys(t for t, _ in cells):
        for t, model in cells:
            if t == teacher and model not in (baseline, "teacher") and (teacher, baseline) in cells:
                diffs = [difference(cells, (t, model), (t, baseline), m) for m in COMPARED]
                rows.append(f"| {teacher} | {model} | " + " | ".join(fmt(d, signed=True) for d in diffs) + " |")
    if not rows:
        return []
    return [f"## Against `{baseline}` (paired by seed and example)", "",
            f"Difference model − {baseline}; an interval that excludes 0 is a difference these seeds and "
            "examples resolve.", "",
            "| teacher | model | Δ exact match | Δ ROUGE-L |", "|---|---|---:|---:|", *rows, ""]


def teachers_section(cells: Cells, estimates, teachers: dict[str, str]) -> list[str]:
    """The teachers side by side (teacher size, top-k): exact match of each model that two or more teachers
    share, ATKD − KD per teacher, and each model against itself under the first teacher."""
    names = [t for t in teachers if any(c[0] == t for c in cells)]
    models = [m for m in dict.fromkeys(m for _, m in cells) if sum((t, m) in cells for t in names) >= 2]
    if len(names) < 2 or not models:
        return []
    pair = _has_pair(cells, names)
    head = "| teacher | " + " | ".join(models) + (" | atkd − kd |" if pair else " |")
    rule = "|---|" + "---:|" * (len(models) + pair)
    lines = ["## Teachers compared (exact match)", "",
             *[f"- `{t}`: {teachers[t] or 'the config as it is'}" for t in names], "", head, rule]
    for t in names:
        row = [fmt(estimates[(t, m)]["exact_match"]) if (t, m) in cells else "-" for m in models]
        if pair:
            row.append(fmt(difference(cells, (t, "atkd"), (t, "kd"), "exact_match"), signed=True))
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    first = names[0]
    lines += ["", f"Each model against the same model under `{first}` (Δ exact match, paired by seed and example):",
              "", "| teacher | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for t in names[1:]:
        row = [fmt(difference(cells, (t, m), (first, m), "exact_match"), signed=True) for m in models]
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    return lines + [""]


def _has_pair(cells: Cells, teachers: list[str]) -> bool:
    return any((t, "atkd") in cells and (t, "kd") in cells for t in teachers)


def variants_section(cells: Cells, estimates, variants: list[tuple[str, str, str]]) -> list[str]:
    """Students derived from another (ATKD's hard_ratio / easy_weight / base): each against its origin."""
    rows = []
    for teacher in dict.fromkeys(t for t, _ in cells):
        for name, origin, what in variants:
            if (teacher, name) in cells and (teacher, origin) in cells:
                est = estimates[(teacher, name)]
                diffs = [difference(cells, (teacher, name), (teacher, origin), m) for m in COMPARED]
                rows.append(f"| {teacher} | {name} | {origin} | {what} | {fmt(est['exact_match'])} | "
                            f"{fmt(est['rouge_l'])} | " + " | ".join(fmt(d, signed=True) for d in diffs) + " |")
    if not rows:
        return []
    return ["## Variants against the student they derive from", "",
            "| teacher | variant | from | changes | exact match | ROUGE-L | Δ exact match | Δ ROUGE-L |",
            "|---|---|---|---|---:|---:|---:|---:|", *rows, ""]


def notes() -> list[str]:
    return ["## How the intervals are made", "",
            (f"Mean over seeds of each run's value; {LEVEL:.0%} percentile interval of a hierarchical bootstrap "
             f"({SAMPLES} replicates, generator seed {SEED}, so the report is deterministic): resample the seeds, "
             "then, for exact match and ROUGE-L, the evaluation examples within each drawn seed (both are stored "
             "per example in the runs' `eval/<model>.generations.jsonl`). Perplexity, KL(teacher ‖ model), top-1 "
             "agreement and ECE are corpus-level per run (ratios over tokens/positions, and ECE is not a sum of "
             "per-example terms), so their intervals are over seeds only: with three seeds such an interval "
             "cannot reach beyond the seeds' range and understates the uncertainty. Differences (Δ) are "
             "bootstrapped the same way on per-seed, per-example differences of the two models (paired: same "
             "seeds, same examples). The teacher row of each teacher is the same model evaluated in every seed's "
             "run: its interval is the evaluation examples' (and the float noise of the runs)."), ""]


# ---------------------------------------------------------------- output


def machine() -> str:
    """CPU model, family/model numbers and the kernels torch dispatches to (AVX2, AVX512, ...), cores, and
    the GPU if torch sees one. A model name alone ("AMD EPYC" in a VM) can hide the generation, and the
    kernels decide the rounding: runs are bit-identical only on the same CPU kind."""
    cpu, ident = platform.processor() or platform.machine(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key in ("model name", "cpu family", "model") and key not in ident:
                ident[key] = value
            if key == "flags":
                break
    except OSError:
        pass
    cpu = ident.get("model name", cpu)
    if "cpu family" in ident:
        cpu += f" (family {ident['cpu family']}, model {ident.get('model', '?')})"
    text = f"{cpu}, {os.cpu_count()} logical cores"
    try:
        import torch

        text += f", torch CPU kernels {torch.backends.cpu.get_cpu_capability()}"
        if torch.cuda.is_available():
            text += f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover
        pass
    return text


def _plot(cells: Cells, estimates, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_label(c, len({t for t, _ in cells}) == 1) for c in cells]
    if not labels:
        return False
    fig, axes = plt.subplots(2, 3, figsize=(15, 2.0 + 0.32 * len(labels) * 2), squeeze=False)
    for ax, (key, header, _, better) in zip(axes.flat, COLUMNS):
        ys, xs, lo, hi = [], [], [], []
        for y, cell in enumerate(cells):
            est = estimates[cell][key]
            if est is not None:
                ys.append(y)
                xs.append(est.mean)
                lo.append(max(est.mean - est.lo, 0.0))  # a constant metric: the replicates' float sums can
                hi.append(max(est.hi - est.mean, 0.0))  # land 1e-17 beside the mean; matplotlib refuses < 0
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", capsize=3, color="#4477aa", clip_on=False)
        low, high = RANGES.get(key, (None, None))  # matplotlib's margin would reach past the metric's range
        left, right = ax.get_xlim()
        ax.set_xlim(left if low is None else max(left, low), right if high is None else min(right, high))
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{header} ({'higher' if better == 'higher' else 'lower'} is better)", fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"mean over seeds, {LEVEL:.0%} bootstrap interval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_sweep_report(out_dir: str | os.PathLike, cells: Cells, about: Sweep) -> str:
    """Write `<out_dir>/report.md`, `results.json` and `sweep.png`; returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    estimates, predicted = cell_estimates(cells), predictions(cells)
    lines = [f"# {about.title}", "", *about.lines, "",
             f"## Results: mean over seeds [{LEVEL:.0%} interval]", "", *main_table(cells, estimates), "",
             *prediction_section(cells, predicted)]
    if about.baseline:
        lines += baseline_section(cells, about.baseline)
    lines += sweep_sets_section(cells)  # eval.sets: per set and their average (stages.eval.report_tables)
    lines += teachers_section(cells, estimates, about.teachers)
    lines += variants_section(cells, estimates, about.variants)
    lines += notes()
    if _plot(cells, estimates, out / PLOT):
        lines += ["## Plot", "", f"![metrics with {LEVEL:.0%} intervals]({PLOT})", ""]
    if about.runs:
        lines += ["## Runs", "", "| teacher | seed | run directory | seconds |", "|---|---:|---|---:|"]
        lines += [f"| {r['teacher']} | {r['seed']} | `{r['run_dir']}` | {r.get('seconds', 0):.0f} |"
                  for r in about.runs] + [""]
    results = {"bootstrap": {"samples": SAMPLES, "level": LEVEL, "seed": SEED,
                             "over_examples": list(EXAMPLE_METRICS)},
               "one_new_run": f"{LEVEL:.0%} prediction interval, mean ± t(n-1) · sd · sqrt(1 + 1/n) over seeds",
               "cells": [{"teacher": t, "model": m, "seeds": [r.seed for r in cells[(t, m)]],
                          "per_seed": {key: [r.metrics.get(key) for r in cells[(t, m)]] for key, *_ in COLUMNS},
                          "metrics": {k: (e.as_dict() if e else None) for k, e in estimates[(t, m)].items()},
                          "one_new_run": {k: (e.as_dict() if e else None) for k, e in predicted[(t, m)].items()}}
                         for t, m in cells],
               "runs": about.runs}
    atomic_write(out / "results.json", json.dumps(results, indent=1))
    path = out / "report.md"
    atomic_write(path, "\n".join(lines))
    return str(path)
