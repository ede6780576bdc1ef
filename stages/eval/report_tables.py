"""The report's tables for several evaluation sets and for lm-evaluation-harness.

    sections = eval_sections(results)      # Markdown, after the main evaluation table

Per set (stages.eval.sets): a summary per metric with one column per set and
their average, as the paper's tables have (eval.path's set is `eval.path`),
then one table per set. lm-eval (stages.eval.lm_harness): one row per model,
one column per requested task's metric, value ± standard error, and the
versions it was computed with. Only reads the results it is given.
"""

from __future__ import annotations

import math

SET_COLUMNS = (  # (result key, header, format, better): the generation metrics of every set
    ("exact_match", "exact match", "{:.3f}", "higher"),
    ("rouge_l", "ROUGE-L", "{:.3f}", "higher"),
    ("perplexity", "perplexity", "{:.3f}", "lower"),
)
PATH_SET = "eval.path"  # the name of eval.path's set in the summary


def _cell(value, fmt: str = "{:.3f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _arrow(better: str) -> str:
    return "↑" if better == "higher" else "↓"


def set_results(results: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """model -> set name -> that set's metrics; eval.path's set first when the model has one."""
    out = {}
    for model, res in results.items():
        sets = {PATH_SET: res} if res.get("num_examples") else {}
        sets.update(res.get("sets") or {})
        out[model] = sets
    return out


def average(values: list) -> float | None:
    """Mean over the sets; None when a set has no value (an average over fewer sets would mislead)."""
    if not values or any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        return None
    return sum(values) / len(values)


def sets_section(results: dict[str, dict]) -> str:
    per_model = set_results(results)
    names = list(dict.fromkeys(n for sets in per_model.values() for n in sets))
    if not any(res.get("sets") for res in results.values()):
        return ""
    lines = ["## Evaluation sets", ""]
    for key, header, fmt, better in SET_COLUMNS:
        if key == "perplexity":
            continue  # per set below: perplexities of different data do not average into a meaningful number
        lines += [f"### {header} per set ({_arrow(better)})", "",
                  "| model | " + " | ".join(names) + " | average |", "|---|" + "---:|" * (len(names) + 1)]
        for model, sets in per_model.items():
            values = [sets.get(n, {}).get(key) for n in names]
            lines.append(f"| {model} | " + " | ".join(_cell(v, fmt) for v in values)
                         + f" | {_cell(average(values), fmt)} |")
        lines.append("")
    for name in names:
        if name == PATH_SET:
            continue
        first = next((sets[name] for sets in per_model.values() if name in sets), {})
        about = f"{first.get('num_examples', '?')} rows; exact match: {first.get('answer_rule') or '-'}"
        if first.get("train_overlap"):
            about += f"; {first['train_overlap']} rows are training rows (eval.allow_train_overlap)"
        headers = [f"{h} ({_arrow(b)})" for _, h, _, b in SET_COLUMNS]
        lines += [f"### Set `{name}`", "", about, "", "| model | " + " | ".join(headers) + " |",
                  "|---|" + "---:|" * len(SET_COLUMNS)]
        for model, sets in per_model.items():
            res = sets.get(name, {})
            lines.append(f"| {model} | " + " | ".join(_cell(res.get(k), f) for k, _, f, _ in SET_COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def lm_eval_section(results: dict[str, dict]) -> str:
    runs = {m: r["lm_eval"] for m, r in results.items() if r.get("lm_eval")}
    if not runs:
        return ""
    columns = []  # (task, metric, filter) in order of first appearance
    for run in runs.values():
        for task, entry in run["tasks"].items():
            for m in entry["metrics"]:
                col = (task, m["metric"], m["filter"])
                if col not in columns:
                    columns.append(col)
    headers = [f"{t} {m}" + ("" if f == "none" else f" ({f})") for t, m, f in columns]
    lines = ["## lm-evaluation-harness", "", "| model | " + " | ".join(headers) + " |",
             "|---|" + "---:|" * len(columns)]
    for model, run in runs.items():
        cells = []
        for task, metric, filt in columns:
            found = [m for m in run["tasks"].get(task, {}).get("metrics", [])
                     if m["metric"] == metric and m["filter"] == filt]
            m = found[0] if found else {}
            cell = _cell(m.get("value"), "{:.4f}")
            if cell != "-" and isinstance(m.get("stderr"), (int, float)):
                cell += f" ± {m['stderr']:.4f}"
            cells.append(cell)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    first = next(iter(runs.values()))
    tasks = ", ".join(f"{t} v{e['version']}, {e['n_shot']}-shot, {e['samples']} examples"
                      for t, e in first["tasks"].items())
    dtype = first["model_args"].split(",")[-1]
    lines += ["", (f"lm-eval {first.get('version')} (Hugging Face model wrapper, `{dtype}`, "
                   f"batch size {first.get('batch_size')}, limit {first.get('limit')}); tasks: {tasks}. "
                   "± is lm-eval's standard error of the mean over the task's examples."), ""]
    return "\n".join(lines)


def eval_sections(results: dict[str, dict]) -> list[str]:
    return [s for s in (sets_section(results), lm_eval_section(results)) if s]


# ---------------------------------------------------------------- sweeps: intervals per set


def sweep_sets_section(cells: dict) -> list[str]:
    """Per metric, each (teacher, model)'s mean over seeds per set with its 95% interval (over seeds and
    the set's examples, from each run's per-example scores), and the average over the sets (its
    interval over seeds: each seed's average of its set means). `cells` as stages.sweep_report's."""
    from stages.eval.bootstrap import bootstrap_mean
    from stages.eval.sweep_report import fmt

    names = list(dict.fromkeys(n for results in cells.values() for r in results
                               for n in (r.metrics.get("sets") or {})))
    if not names:
        return []
    lines = ["## Evaluation sets: mean over seeds [95% interval]", ""]
    for key, header, _, better in SET_COLUMNS[:2]:
        lines += [f"### {header} per set ({_arrow(better)})", "",
                  "| teacher | model | " + " | ".join(names) + " | average |", "|---|---|" + "---:|" * (len(names) + 1)]
        for (teacher, model), results in cells.items():
            row = []
            for name in names:
                values = [r.set_examples.get(name, {}).get(key) or _one((r.metrics.get("sets") or {}).get(name), key)
                          for r in results]
                row.append(fmt(bootstrap_mean(values, key=f"{teacher}/{model}/sets/{name}/{key}")))
            averages = [average([(r.metrics.get("sets") or {}).get(n, {}).get(key) for n in names]) for r in results]
            row.append(fmt(bootstrap_mean([[a] if a is not None else [] for a in averages],
                                          key=f"{teacher}/{model}/sets/average/{key}")))
            lines.append(f"| {teacher} | {model} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _one(metrics: dict | None, key: str) -> list[float]:
    value = (metrics or {}).get(key)
    return [float(value)] if isinstance(value, (int, float)) and math.isfinite(value) else []
