"""The lm-eval worker: `python -m stages.eval.lm_harness_worker REQUEST.json` (stages.eval.lm_harness
starts it). It imports lm-eval once and resolves the task names, then forks one child per model, in
turn: the child loads the tasks' data (the first one: every task, then writes the ready file), then its
model, runs `lm_eval.simple_evaluate` and writes what atkd keeps of the results; its exit returns the
model's memory. A task error is written to the error file (exit 2); anything else ends in the log.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from stages.eval.lm_harness import ERROR_FILE, installed_version


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager: over include_path alone when it defines every task (indexing lm-eval's own
    ~15k YAMLs takes about a minute on a busy CPU), else over both. An unknown name: an EvalError."""
    import difflib

    from lm_eval.tasks import TaskManager

    from stages.errors import EvalError

    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks and not _yaml_file(t) for t in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks and not _yaml_file(t)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        where = f" or in eval.lm_eval.include_path {include_path!r}" if include_path else ""
        raise EvalError(f"eval.lm_eval.tasks: {unknown[0]!r} is no lm-eval task, group or tag{where}{hint}; "
                        "`lm-eval ls tasks` lists them (a local task needs its YAML under include_path)")
    return manager


def _yaml_file(task: str) -> bool:
    """lm-eval also takes a path to a task YAML as a task."""
    return task.endswith((".yaml", ".yml")) and Path(task).is_file()


def load_tasks(tasks: list[str], manager) -> dict:
    """lm-eval's task objects, data read (a task whose data or template fails: an EvalError naming it)."""
    from lm_eval.tasks import get_task_dict

    from stages.errors import EvalError

    task_dict = {}
    for name in tasks:
        try:
            task_dict.update(get_task_dict([name], manager))
        except Exception as e:  # noqa: BLE001 - lm-eval raises anything (KeyError, FileNotFoundError, jinja...)
            raise EvalError(f"eval.lm_eval.tasks: task {name!r} cannot be loaded: {type(e).__name__}: "
                            f"{str(e)[:300]}") from None
    for name, task in _leaves(task_dict):
        try:
            docs = task.eval_docs
            if len(docs):
                task.doc_to_text(docs[0])
                task.doc_to_target(docs[0])
        except Exception as e:  # noqa: BLE001 - a template naming no field (jinja's UndefinedError), ...
            raise EvalError(f"eval.lm_eval.tasks: task {name!r} cannot render its first example: "
                            f"{type(e).__name__}: {str(e)[:300]}") from None
    return task_dict


def _leaves(task_dict: dict):
    for key, value in task_dict.items():
        if isinstance(value, dict):
            yield from _leaves(value)
        elif value is not None:
            yield getattr(key, "group_name", key), value


def number(value):
    """A JSON number from lm-eval's numpy scalars; None for 'N/A' and non-finite values."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def summarise(raw: dict) -> dict:
    """What atkd keeps of simple_evaluate's output: per task its version, n-shot, samples and metrics."""
    tasks = {}
    for task, values in {**raw.get("results", {}), **raw.get("groups", {})}.items():
        metrics = []
        for key, value in values.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, _, filt = key.partition(",")
            metrics.append({"metric": metric, "filter": filt, "value": number(value),
                            "stderr": number(values.get(f"{metric}_stderr,{filt}"))})
        samples = raw.get("n-samples", {}).get(task, {})
        version = raw.get("versions", {}).get(task)
        tasks[task] = {"version": version if version is None or isinstance(version, str) else number(version),
                       "n_shot": None if number(raw.get("n-shot", {}).get(task)) is None
                       else int(number(raw["n-shot"][task])),
                       "samples": samples.get("effective") if isinstance(samples, dict) else None,
                       "metrics": metrics}
    return tasks


def evaluate(job: dict, request: dict, manager=None) -> dict:
    """simple_evaluate on one model (`job`: model and tokenizer directories) with `request`'s tasks and
    settings: what each worker child runs, and what the tests compare with lm-eval's own run."""
    import lm_eval
    import torch

    t0 = time.perf_counter()
    manager = manager if manager is not None else task_manager(request["tasks"], request.get("include_path"))
    if job.get("ready"):  # the first model: every task loaded before the model, so a bad task costs no model
        load_tasks(request["tasks"], manager)
        Path(job["ready"]).touch()
    on_gpu = torch.cuda.is_available()
    model_args = f"pretrained={job['model']},tokenizer={job['tokenizer']},dtype={'bfloat16' if on_gpu else 'float32'}"
    raw = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=request["tasks"],
                                  num_fewshot=request.get("num_fewshot"), limit=request.get("limit"),
                                  batch_size=request.get("batch_size", 8), device="cuda" if on_gpu else "cpu",
                                  task_manager=manager, log_samples=False)
    return {"version": installed_version(), "model_args": model_args, "num_fewshot": request.get("num_fewshot"),
            "limit": request.get("limit"), "batch_size": request.get("batch_size"), "tasks": summarise(raw),
            "seconds": round(time.perf_counter() - t0, 2)}


def _child(job: dict, request: dict, manager, error_file: Path) -> int:
    """One model in a forked child: 0 done, 2 a task error (in error_file), 1 anything else."""
    import traceback

    from stages.errors import EvalError
    from storage.files import atomic_write

    try:
        atomic_write(Path(job["out"]), json.dumps(evaluate(job, request, manager), indent=1))
        return 0
    except EvalError as e:
        atomic_write(error_file, str(e) + "\n")
        return 2
    except BaseException:  # noqa: BLE001 - reported in the log, the parent names the model
        traceback.print_exc()
        return 1


def main(argv: list[str]) -> int:
    """The worker: lm-eval imported and the tasks resolved once, then one forked child per model, in turn."""
    from stages.errors import EvalError
    from storage.files import atomic_write

    request_path = Path(argv[0])
    request = json.loads(request_path.read_text())
    error_file = request_path.parent / ERROR_FILE
    try:
        import lm_eval.models.huggingface  # noqa: F401 - imported once, before the forks
        manager = task_manager(request["tasks"], request.get("include_path"))
    except EvalError as e:
        atomic_write(error_file, str(e) + "\n")
        return 2
    for job in request["models"]:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: its model's memory goes when it exits
            code = 1
            try:
                code = _child(job, request, manager, error_file)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
