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
process of its own per model (`python -m stages.eval.lm_harness_worker REQUEST.json`), so
the model's memory is returned when it ends: one worker imports lm-eval once (about
15 s on a busy CPU) and forks a child per model. The worker resolves the task names
and the first child loads the tasks' data before its model: an unknown name, a task
whose data cannot be read or a prompt template naming no field stop the evaluation
before any model runs. At load (pipeline/eval_checks.py), without importing lm-eval:
it must be installed, and every YAML under include_path must parse.

Per model, `results[model]["lm_eval"]`: lm-eval's version, the model arguments and
per task its version, n-shot, sample count and each metric's value and standard
error (`metrics: [{metric, filter, value, stderr}]`, lm-eval's "acc,none" split
in two). Devices and dtypes are evaluation's own (stages.evaluate.load_model):
float32 on CPU, bfloat16 on a GPU.
"""

from __future__ import annotations

import hashlib
import json
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

    One worker (`python -m stages.eval.lm_harness_worker REQUEST`) imports lm-eval once and resolves the task
    names, then forks a child per model, in turn, which loads the tasks' data (the first one then writes
    READY_FILE), then its model, evaluates and exits (its memory goes with it). Output: the stage log.

        run = LmEvalRun(models, cfg.eval.lm_eval, teacher_dir=..., out_dir=...)
        run.wait_ready()    # an EvalError naming the task when one cannot be resolved or loaded
        run.results()       # {name: {"lm_eval": {...}}}, once every model is done
    """

    def __init__(self, models: dict[str, str], lm, *, teacher_dir: str, out_dir: str | Path):
        import contextlib
        import subprocess

        from stages.eval.evaluate import has_tokenizer
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
            self.proc = subprocess.Popen([sys.executable, "-m", "stages.eval.lm_harness_worker", str(request_path)],
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
