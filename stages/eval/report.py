"""The run report: a Markdown table of the evaluation and PNG plots.

    path = write_report(run_dir, results, students_logs, cache_url,  # <run_dir>/report/report.md
                        sections=[markdown, ...],                    # the caller's own sections
                        continues={"kd": "base", ...})               # student -> its init_from

It only reads: the results it is given (stages.eval.evaluate writes results.json),
the students' logs and the cache; what else a run has to say (the demo
teacher's numbers: stages.demo.evaluation) comes in as `sections`. It writes
report.md and the plots, nothing else.
    print(format_table(results))                                     # the same table, for the terminal

Plots (matplotlib, Agg backend, so no display is needed):
- `loss_curves.png`: training loss per student, from each student's log.jsonl:
  the raw per-step values faint, a centred moving average over them; a student
  that continues another (`init_from`) is drawn from where that one ended, so
  the steps axis is the model's total training steps;
- `teacher_uncertainty.png`: histogram of the teacher's UNC = 1 - p(gold) over
  the training cache's positions (ATKD splits positions by it: a bimodal
  histogram means confident answer tokens and uncertain free-choice tokens);
- `topk_coverage.png`: histogram of the top-k mass sum(exp(topk_logprobs)) per
  position, i.e. how much of the teacher's distribution the cache keeps (the
  rest is the residual bucket).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from storage.files import atomic_write

COLUMNS = (  # (result key, header, format, better)
    ("exact_match", "exact match", "{:.3f}", "higher"),
    ("rouge_l", "ROUGE-L", "{:.3f}", "higher"),
    ("perplexity", "perplexity", "{:.3f}", "lower"),
    ("kl_to_teacher", "KL(teacher ‖ model)", "{:.4f}", "lower"),
    ("top1_agreement", "top-1 agreement", "{:.3f}", "higher"),
    ("ece", "ECE", "{:.3f}", "lower"),
)
MAX_CACHE_POSITIONS = 500_000  # positions read for the cache histograms


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def format_table(results: dict[str, dict]) -> str:
    """A Markdown table, one row per model (in the order given), one column per metric."""
    headers = ["model"] + [f"{h} ({'↑' if b == 'higher' else '↓'})" for _, h, _, b in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * len(COLUMNS)) + "|"]
    for name, res in results.items():
        cells = [name] + [_cell(res.get(key), fmt) for key, _, fmt, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_task_table(results: dict[str, dict]) -> str:
    """Exact match per task (the answer rule's groups; "" when no result has a per-task breakdown)."""
    tasks = sorted({t for res in results.values() for t in (res.get("exact_match_by_task") or {})})
    if not tasks:
        return ""
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for name, res in results.items():
        by_task = res.get("exact_match_by_task") or {}
        lines.append(f"| {name} | " + " | ".join(_cell(by_task.get(t), "{:.3f}") for t in tasks) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- inputs


def read_log(path: str | os.PathLike, key: str = "loss") -> tuple[list[int], list[float]]:
    """(steps, values of `key`) from a student's log.jsonl; rows without a finite value are skipped."""
    steps, losses = [], []
    p = Path(path)
    if not p.is_file():
        return steps, losses
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        loss = row.get(key)
        if isinstance(loss, (int, float)) and math.isfinite(loss) and "step" in row:
            steps.append(int(row["step"]))
            losses.append(float(loss))
    return steps, losses


def cache_statistics(cache_url: str, max_positions: int = MAX_CACHE_POSITIONS) -> dict[str, np.ndarray]:
    """Per-position teacher uncertainty (1 - p_gold) and top-k mass from the completed shards."""
    from storage.cache import Cache

    cache = Cache.open(cache_url)
    unc, mass, taken = [], [], 0
    for index in cache.completed_shards():
        shard = cache.read_shard(index)
        target = np.asarray(shard.target_logprobs, dtype=np.float64)[: max_positions - taken]
        topk = np.asarray(shard.topk_logprobs, dtype=np.float64)[: max_positions - taken]
        unc.append(-np.expm1(np.minimum(target, 0.0)))
        mass.append(np.exp(topk).sum(axis=1))
        taken += target.shape[0]
        if taken >= max_positions:
            break
    empty = np.zeros(0)
    return {
        "uncertainty": np.concatenate(unc) if unc else empty,
        "topk_mass": np.concatenate(mass) if mass else empty,
        "top_k": cache.manifest.identity.get("top_k"),
    }


# ---------------------------------------------------------------- plots


SMOOTH_POINTS = 25  # the moving average spans ~1/25 of a curve's steps


def smooth(values: Sequence[float]) -> np.ndarray:
    """Centred moving average (window ~len/SMOOTH_POINTS, odd); near the ends over the points there are."""
    x = np.asarray(values, dtype=np.float64)
    width = max(1, len(x) // SMOOTH_POINTS) | 1
    if width == 1:
        return x
    kernel = np.ones(width)
    return np.convolve(x, kernel, mode="same") / np.convolve(np.ones_like(x), kernel, mode="same")


def step_offsets(last_steps: dict[str, int], continues: dict[str, str]) -> dict[str, int]:
    """Where each student's step 1 sits on a shared axis: after the last step of the student it continues
    (init_from), recursively; 0 for a student from scratch or one whose origin has no log."""
    offsets: dict[str, int] = {}

    def offset(name: str, seen: tuple = ()) -> int:
        if name not in offsets:
            origin = continues.get(name)
            if origin is None or origin in seen or origin not in last_steps:
                offsets[name] = 0
            else:
                offsets[name] = offset(origin, seen + (name,)) + last_steps[origin]
        return offsets[name]

    for name in last_steps:
        offset(name)
    return offsets


def _plot_losses(students_logs: dict[str, str], path: Path, continues: dict[str, str] | None = None) -> bool:
    """Each student's own objective (left) and, when logged, its cross-entropy on
    the gold tokens (right: the one curve comparable across losses)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("loss", "training loss (own objective)"), ("ce", "cross-entropy on gold tokens")]
    curves = {key: {n: read_log(p, key) for n, p in students_logs.items()} for key, _ in panels}
    curves = {key: {n: c for n, c in by.items() if c[0]} for key, by in curves.items()}
    panels = [(key, label) for key, label in panels if curves[key]]
    if not panels:
        return False
    last = {n: c[0][-1] for n, c in curves[panels[0][0]].items()}
    offsets = step_offsets(last, continues or {})
    colors = {n: f"C{i % 10}" for i, n in enumerate(students_logs)}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for name, (steps, values) in curves[key].items():
            x = np.asarray(steps) + offsets.get(name, 0)
            ax.plot(x, values, color=colors[name], linewidth=0.6, alpha=0.3)
            ax.plot(x, smooth(values), color=colors[name], linewidth=1.5, label=name)
        for start in sorted({o for o in offsets.values() if o}):
            ax.axvline(start, color="0.5", linestyle=":", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step (a continuing student after the one it starts from)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Student training (faint: per step; line: moving average)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_histogram(values: np.ndarray, path: Path, *, title: str, xlabel: str, zoom: bool = False) -> bool:
    """Histogram of values in [0, 1]; `zoom` narrows the x range to [min, 1] (coverage near 1)."""
    import matplotlib.pyplot as plt

    if values.size == 0:
        return False
    values = np.clip(values, 0.0, 1.0)
    low = min(math.floor(values.min() * 100) / 100, 0.99) if zoom else 0.0
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.hist(values, bins=50, range=(low, 1.0), color="#4477aa")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("positions")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- entry point


def write_report(run_dir: str | os.PathLike, results: dict[str, dict], students_logs: dict[str, str],
                 cache_url: str | None, sections: Sequence[str] = (), continues: dict[str, str] | None = None) -> str:
    """Write `<run_dir>/report/report.md` and its PNGs; returns the report's path.

    `sections`: Markdown the caller adds after the evaluation (empty ones are skipped).
    `continues`: student -> the student it starts from (init_from), for the loss plot's steps."""
    import matplotlib

    matplotlib.use("Agg")

    out = Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    extra, sections = sections, ["# ATKD run report", "", f"Run directory: `{Path(run_dir)}`", "", "## Evaluation", "",
                format_table(results), ""]
    task_table = format_task_table(results)
    if task_table:
        sections += ["### Exact match per task", "", task_table, ""]
    sections += _notes(results)
    sections += [text.rstrip("\n") + "\n" for text in extra if text.strip()]

    plots = []
    if _plot_losses(students_logs, out / "loss_curves.png", continues):
        plots.append(("Training loss per student", "loss_curves.png"))
    stats = cache_statistics(cache_url) if cache_url else None
    if stats is not None:
        unc, mass = stats["uncertainty"], stats["topk_mass"]
        if _plot_histogram(unc, out / "teacher_uncertainty.png", title="Teacher uncertainty on the training cache",
                           xlabel="UNC = 1 - p_teacher(gold token)"):
            plots.append(("Teacher uncertainty (ATKD ranks positions by it)", "teacher_uncertainty.png"))
        k = f"top-{stats['top_k']}" if stats["top_k"] else "top-k"
        # top_k 0: a cache of sampled targets only, no top-k mass to show
        if stats["top_k"] != 0 and _plot_histogram(mass, out / "topk_coverage.png",
                                                   title=f"Teacher {k} mass kept in the cache",
                                                   xlabel=f"sum of {k} probabilities per position", zoom=True):
            plots.append((f"{k} mass coverage of the cache", "topk_coverage.png"))
        if unc.size:
            sections += ["## Cache", "",
                         f"- positions read: {unc.size}",
                         (f"- mean teacher uncertainty (1 - p_gold): {unc.mean():.3f}; share of positions "
                          f"with UNC < 0.05: {(unc < 0.05).mean():.3f}, > 0.5: {(unc > 0.5).mean():.3f}")]
            if stats["top_k"] != 0:  # a cache of sampled targets only keeps no top-k
                sections.append(f"- mean {k} mass: {mass.mean():.4f}; minimum: {mass.min():.4f}")
            sections.append("")
    if plots:
        sections += ["## Plots", ""]
        for caption, file in plots:
            sections += [f"### {caption}", "", f"![{caption}]({file})", ""]

    path = out / "report.md"
    atomic_write(path, "\n".join(sections))
    return str(path)


def _notes(results: dict[str, dict]) -> list[str]:
    rules = sorted({r["answer_rule"] for r in results.values() if r.get("answer_rule")})
    lines = [(f"Exact match: {'; '.join(rules) if rules else 'see the answer rule of the evaluation'}. "
              "Perplexity: reference responses (response tokens + EOS). KL and top-1: on the validation cache's "
              "sparse teacher (top-k + residual bucket). ECE: expected calibration error of the model's "
              "next-token distribution on the validation cache (15 equal-width bins of its top-1 probability, "
              "correct = top-1 is the gold token)."), ""]
    timing = [f"{n}: {r['seconds']} s" for n, r in results.items() if r.get("seconds") is not None]
    if timing:
        lines += ["Evaluation time per model: " + ", ".join(timing) + ".", ""]
    return lines
