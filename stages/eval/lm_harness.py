"""Standard benchmarks through lm-evaluation-harness (`eval.lm_eval`), one process per model.

    eval:
      lm_eval:
        tasks: [mmlu, bbh, my_local_task]   # lm-eval task, group or tag names
        num_fewshot: 5                      # null: each task's own default
        limit: null                         # rows per task (>= 1) or a fraction (< 1); null: all
        batch_size: 8
        include_path: tasks/                # more task YAMLs (local data: dataset_path: json + data_files)

lm-eval (PyPI `lm-eval`, the optional extra `atkd[lm-eval]`) runs its Hugging Face
wrapper (`HFLM`) on each model directory through `lm_eval.simple_evaluate`, in a
process of its own per model (`python -m stages.eval.lm_harness REQUEST.json`), so
the model's memory is returned when it ends: one worker imports lm-eval once (about
15 s on a busy CPU) and forks a child per model. The worker resolves the task names
and the first child loads the tasks' data before its model: an unknown name, a task
whose data cannot be read or a prompt template naming no field stop the evaluation
before any model runs. At
load (check_config), without importing lm-eval: it must be installed, and every
YAML under include_path must parse.

Per model, `results[model]["lm_eval"]`: lm-eval's version, the model arguments and
per task its version, n-shot, sample count and each metric's value and standard
error (`metrics: [{metric, filter, value, stderr}]`, lm-eval's "acc,none" split
in two). Devices and dtypes are evaluation's own (stages.evaluate.load_model):
float32 on CPU, bfloat16 on a GPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

INSTALL = ("pip install 'atkd[lm-eval]' (from a checkout: pip install -e '.[lm-eval]'; or "
           "pip install 'lm-eval[hf]>=0.4.8,<0.5')")
ERROR_FILE = "error.txt"  # a worker's one-line reason when it fails on the config (not on a crash)
READY_FILE = "ready"  # the tasks are resolved and their data loaded: models can run


@dataclass
class LmEvalConfig:
    """`eval.lm_eval`: lm-evaluation-harness tasks run on every evaluated model (none: skipped)."""

    tasks: list[str] = field(default_factory=list)
    num_fewshot: Optional[int] = None  # None: each task's default
    limit: Optional[float] = None  # examples per task (>= 1) or a fraction of them (< 1); None: all
    batch_size: int = 8
    include_path: str = ""  # a directory of task YAMLs added to lm-eval's own; the demo's: <demo.dir>/lm_eval


def installed() -> bool:
    """lm-eval and its Hugging Face wrapper's needs importable here (not imported: that takes seconds)."""
    from importlib.util import find_spec

    return all(find_spec(name) is not None for name in ("lm_eval", "accelerate"))


def installed_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- task YAMLs (no lm-eval import)


class _TaskLoader(yaml.SafeLoader):
    """PyYAML's safe loader that reads lm-eval's `!function module.name` tags as their text."""


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node)
                                  if isinstance(node, yaml.ScalarNode) else None)


def task_files(include_path: str) -> list[Path]:
    root = Path(include_path).expanduser()
    return sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def read_task_yaml(path: Path) -> dict:
    """A task YAML as a mapping; a syntax error is an EvalError naming the file and line."""
    from stages.errors import EvalError

    try:
        raw = yaml.load(path.read_text(), Loader=_TaskLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise EvalError(f"eval.lm_eval.include_path: task YAML {path}{where} does not parse: "
                        f"{getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise EvalError(f"eval.lm_eval.include_path: task YAML {path} is not a mapping (got {type(raw).__name__})")
    return raw


def local_tasks(include_path: str) -> dict[str, Path]:
    """Task, group and tag name -> the YAML under include_path that defines it (every YAML parsed)."""
    names: dict[str, Path] = {}
    for path in task_files(include_path):
        raw = read_task_yaml(path)
        for key in ("task", "group", "tag"):
            value = raw.get(key)
            for name in value if isinstance(value, list) else [value]:
                if isinstance(name, str):
                    names.setdefault(name, path)
    return names


def check_config(cfg) -> None:
    """At load: lm-eval installed, include_path a directory whose YAMLs parse (a ConfigError saying which).

    The demo's include_path is built with its data (later): checked when the demo is built."""
    from pipeline.config import ConfigError
    from stages.errors import EvalError

    lm = cfg.eval.lm_eval
    if not lm.tasks:
        return
    if not installed():
        raise ConfigError(f"eval.lm_eval.tasks ({', '.join(lm.tasks)}) needs lm-evaluation-harness, which is not "
                          f"installed: {INSTALL}")
    if lm.batch_size < 1:
        raise ConfigError(f"eval.lm_eval.batch_size: must be >= 1, got {lm.batch_size}")
    if lm.num_fewshot is not None and lm.num_fewshot < 0:
        raise ConfigError(f"eval.lm_eval.num_fewshot: must be >= 0 (or null for each task's own), got {lm.num_fewshot}")
    if lm.limit is not None and lm.limit <= 0:
        raise ConfigError(f"eval.lm_eval.limit: examples per task (>= 1) or a fraction (< 1), got {lm.limit}")
    if not lm.include_path or (demo_include_path(cfg) == lm.include_path and not Path(lm.include_path).is_dir()):
        return
    if not Path(lm.include_path).expanduser().is_dir():
        raise ConfigError(f"eval.lm_eval.include_path: {lm.include_path!r} is not a directory (of task YAMLs)")
    try:
        local_tasks(lm.include_path)
    except EvalError as e:
        raise ConfigError(str(e)) from None


def demo_include_path(cfg) -> str | None:
    """Where the demo writes its multiple-choice task (stages.demo.lm_eval_task); None without the demo."""
    return str(Path(cfg.demo.dir or cfg.run_dir) / "lm_eval") if cfg.demo.enabled else None


def fingerprint(lm) -> dict | None:
    """What lm-eval's results depend on besides the config: its version, the include_path YAMLs and the
    local data files they name (None without tasks)."""
    if not lm.tasks:
        return None
    from stages.errors import EvalError
    from stages.rows import file_sha256

    digest = hashlib.sha256()
    if lm.include_path and Path(lm.include_path).expanduser().is_dir():
        for path in task_files(lm.include_path):
            digest.update(str(path).encode() + b"\0" + path.read_bytes())
            try:
                files = _data_files(read_task_yaml(path))
            except EvalError:
                continue
            for data in files:
                p = Path(data).expanduser()
                if p.is_file():
                    digest.update(str(p).encode() + b"\0" + file_sha256(str(p)).encode())
    return {"version": installed_version(), "tasks": "sha256:" + digest.hexdigest()}


def _data_files(raw: dict) -> list[str]:
    files = (raw.get("dataset_kwargs") or {}).get("data_files") if isinstance(raw.get("dataset_kwargs"), dict) else None
    if isinstance(files, str):
        return [files]
    if isinstance(files, list):
        return [f for f in files if isinstance(f, str)]
    if isinstance(files, dict):
        return [f for v in files.values() for f in (v if isinstance(v, list) else [v]) if isinstance(f, str)]
    return []


# ---------------------------------------------------------------- the parent: one process per model


class LmEvalRun:
    """lm-eval on each model (name -> directory), each in a process of its own, running in the background.

    One worker (`python -m stages.eval.lm_harness REQUEST`) imports lm-eval once and resolves the task
    names, then forks a child per model, in turn, which loads the tasks' data (the first one then writes
    READY_FILE), then its model, evaluates and exits (its memory goes with it). Output: the stage log.

        run = LmEvalRun(models, cfg.eval.lm_eval, teacher_dir=..., out_dir=...)
        run.wait_ready()    # an EvalError naming the task when one cannot be resolved or loaded
        run.results()       # {name: {"lm_eval": {...}}}, once every model is done
    """

    def __init__(self, models: dict[str, str], lm, *, teacher_dir: str, out_dir: str | Path):
        import contextlib
        import subprocess

        from stages.evaluate import has_tokenizer
        from stages.logs import current_log, verbose

        self.out = Path(out_dir) / "lm_eval"
        self.out.mkdir(parents=True, exist_ok=True)
        self.tasks = list(lm.tasks)
        self.jobs = [{"name": name, "model": str(d), "tokenizer": str(d if has_tokenizer(d) else teacher_dir),
                      "out": str(self.out / f"{name}.json")} for name, d in models.items()]
        self.jobs[0]["ready"] = str(self.out / READY_FILE)
        request = {"tasks": self.tasks, "num_fewshot": lm.num_fewshot, "limit": lm.limit,
                   "batch_size": lm.batch_size, "include_path": lm.include_path or None, "models": self.jobs}
        request_path = self.out / "request.json"
        request_path.write_text(json.dumps(request, indent=1))
        for path in [self.out / ERROR_FILE, self.out / READY_FILE, *(Path(j["out"]) for j in self.jobs)]:
            path.unlink(missing_ok=True)
        self.log = current_log() if not verbose() else None
        self._results: dict | None = None
        with open(self.log, "ab") if self.log else contextlib.nullcontext() as sink:
            self.proc = subprocess.Popen([sys.executable, "-m", "stages.eval.lm_harness", str(request_path)],
                                         stdout=sink, stderr=sink, start_new_session=True,
                                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})

    def _failed(self) -> None:
        from stages.errors import EvalError

        if (self.out / ERROR_FILE).is_file():
            raise EvalError((self.out / ERROR_FILE).read_text().strip())
        missing = [j["name"] for j in self.jobs if not Path(j["out"]).is_file()]
        if self.proc.returncode != 0 or missing:
            raise EvalError(f"lm-eval failed (exit code {self.proc.returncode}) on {', '.join(missing) or 'a model'}; "
                            f"its output is in {self.log or 'the output above'}")

    def wait_ready(self) -> None:
        """Until the tasks are resolved and their data loaded (or the worker ended: its error raised)."""
        while not (self.out / READY_FILE).is_file():
            if self.proc.poll() is not None:
                self._failed()
                return
            time.sleep(0.1)

    def results(self, progress: bool = True) -> dict[str, dict]:
        """Every model's lm-eval results, once the worker is done (kept: a second call returns them)."""
        if self._results is not None:
            return self._results
        self.proc.wait()
        self._failed()
        results = {}
        for job in self.jobs:
            entry = json.loads(Path(job["out"]).read_text())
            results[job["name"]] = {"lm_eval": entry}
            if progress:
                cells = ", ".join(f"{t}/{m['metric']}={m['value']:.4g}" for t, task in entry["tasks"].items()
                                  for m in task["metrics"] if t in self.tasks and isinstance(m["value"], (int, float)))
                print(f"[eval] {job['name']}: lm-eval {cells} ({entry['seconds']} s)", flush=True)
        self._results = results
        return results

    def stop(self) -> None:
        """End the worker and its child if they still run (evaluation failed elsewhere)."""
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait()


def run_models(models: dict[str, str], lm, *, teacher_dir: str, out_dir: str | Path,
               progress: bool = True) -> dict[str, dict]:
    """LmEvalRun to the end: {name: {"lm_eval": ...}} ({} without tasks or models)."""
    if not lm.tasks or not models:
        return {}
    run = LmEvalRun(models, lm, teacher_dir=teacher_dir, out_dir=out_dir)
    try:
        return run.results(progress)
    finally:
        run.stop()


# ---------------------------------------------------------------- the worker (this module as a script)


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager: over include_path alone when it defines every task (indexing lm-eval's own
    ~15k YAMLs takes about a minute on a busy CPU), else over both. An unknown name: an EvalError."""
    import difflib

    from lm_eval.tasks import TaskManager

    from stages.errors import EvalError

    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    missing = [t for t in tasks if manager is None or t not in manager.all_tasks]
    if missing and not all(t.endswith((".yaml", ".yml")) and Path(t).is_file() for t in missing):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks and not (t.endswith((".yaml", ".yml"))
                                                                       and Path(t).is_file())]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        where = f" or in eval.lm_eval.include_path {include_path!r}" if include_path else ""
        raise EvalError(f"eval.lm_eval.tasks: {unknown[0]!r} is no lm-eval task, group or tag{where}{hint}; "
                        "`lm-eval ls tasks` lists them (a local task needs its YAML under include_path)")
    return manager


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
