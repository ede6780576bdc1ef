"""Where engine and library output goes: `<run_dir>/logs/<stage>.log`, and the console only with -v.

The console shows the project's own lines (`[atkd]`, `[teacher]`, warnings of
`pipeline`/`stages`/`storage` loggers) and one progress bar per stage. Inside
`stage_log(dir, stage)`:
- Python logging of every library (vLLM, transformers, datasets, torch, ...)
  and Python warnings go to the stage's log file; with -v the libraries keep
  their console handlers as well;
- transformers / datasets / huggingface_hub progress bars are off (not with -v);
- vLLM, which configures its logger when imported and runs its engine core in
  child processes, reads VLLM_LOGGING_CONFIG_PATH (a dictConfig written next to
  the log) in every process; `engine_output()` additionally points file
  descriptors 1 and 2 at the log file while an engine starts, so whatever its
  child processes print (tracebacks, bars, C++ output) lands there too: the
  children inherit those descriptors.
Everything is restored on exit, so in-process callers (tests) are unaffected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from storage.files import atomic_write

ENV_FILE = "ATKD_LOG_FILE"
ENV_VERBOSE = "ATKD_VERBOSE"
PROJECT_LOGGERS = ("pipeline", "stages", "storage")
LIBRARY_LOGGERS = ("vllm", "transformers", "datasets", "huggingface_hub", "torch", "accelerate")
_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_announced: set[str] = set()


def set_verbose(flag: bool) -> None:
    os.environ[ENV_VERBOSE] = "1" if flag else "0"


def verbose() -> bool:
    return os.environ.get(ENV_VERBOSE) == "1"


def current_log() -> str | None:
    return os.environ.get(ENV_FILE) or None


class _Stderr(logging.StreamHandler):
    """A console handler that writes to whatever sys.stderr is at the time (pytest swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


@contextlib.contextmanager
def stage_log(log_dir: str | os.PathLike, stage: str):
    """Route library output of one stage to `<log_dir>/<stage>.log` (see the module doc); yields the path."""
    path = Path(log_dir) / f"{stage}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    routing = _Routing(path, verbose())
    routing.install()
    if str(path) not in _announced and not routing.verbose:
        _announced.add(str(path))
        print(f"[atkd] {stage}: engine and library logs go to {path} (-v shows them here)", file=sys.stderr,
              flush=True)
    try:
        yield path
    finally:
        routing.restore()


@contextlib.contextmanager
def engine_output():
    """While an engine starts: file descriptors 1 and 2 -> the current stage log (not with -v)."""
    path = current_log()
    if path is None or verbose():
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    saved = (os.dup(1), os.dup(2))
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


class _StageFormatter(logging.Formatter):
    """The project's log lines on the console: `[student] WARNING: ...`, like its printed lines."""

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return message if message.startswith("[") else f"[{self.stage}] {level}{message}"


class _Routing:
    """Install / undo the routing of one stage (every change remembered for restore)."""

    def __init__(self, path: Path, verbose_: bool) -> None:
        self.path, self.verbose = path, verbose_
        self._env: dict[str, str | None] = {}
        self._loggers: dict[str, tuple] = {}
        self._undo: list = []
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.setFormatter(logging.Formatter(_FORMAT))
        self.console = _Stderr()
        self.console.setFormatter(_StageFormatter(path.stem))
        self.library_console = _Stderr()
        self.library_console.setFormatter(logging.Formatter("[%(name)s] %(levelname)s %(message)s"))

    def install(self) -> None:
        self._set_env(ENV_FILE, str(self.path))
        self._set_env("VLLM_CONFIGURE_LOGGING", "1")
        self._set_env("VLLM_LOGGING_CONFIG_PATH", str(self._write_vllm_config()))
        root = logging.getLogger()
        self._save_logger("", root)
        root.addHandler(self.file)
        root.setLevel(logging.INFO)
        for name in PROJECT_LOGGERS:
            logger = self._save_logger(name, logging.getLogger(name))
            logger.addHandler(self.console)
            logger.setLevel(logging.INFO)
            logger.propagate = True
        self._import_libraries()
        for name in LIBRARY_LOGGERS:
            logger = self._save_logger(name, logging.getLogger(name))
            logger.handlers = [self.library_console] if self.verbose else []
            logger.propagate = True  # -> the root logger's file handler
        if not self.verbose:
            logging.captureWarnings(True)
            self._undo.append(lambda: logging.captureWarnings(False))
            self._quiet_progress_bars()

    def restore(self) -> None:
        for undo in reversed(self._undo):
            with contextlib.suppress(Exception):
                undo()
        for name, (handlers, level, propagate) in self._loggers.items():
            logger = logging.getLogger(name) if name else logging.getLogger()
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        for key, value in self._env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.file.close()

    # ---- helpers
    def _set_env(self, key: str, value: str) -> None:
        self._env.setdefault(key, os.environ.get(key))
        os.environ[key] = value

    def _save_logger(self, name: str, logger: logging.Logger) -> logging.Logger:
        self._loggers.setdefault(name, (list(logger.handlers), logger.level, logger.propagate))
        return logger

    def _write_vllm_config(self) -> Path:
        handlers = {"atkd_file": {"class": "logging.FileHandler", "filename": str(self.path), "mode": "a",
                                  "formatter": "atkd", "level": "INFO"}}
        if self.verbose:
            handlers["atkd_console"] = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                        "formatter": "atkd", "level": "INFO"}
        config = {"version": 1, "disable_existing_loggers": False,
                  "formatters": {"atkd": {"format": "%(asctime)s vllm[%(process)d] %(levelname)s %(message)s"}},
                  "handlers": handlers,
                  "loggers": {"vllm": {"handlers": sorted(handlers), "level": "INFO", "propagate": False}}}
        out = self.path.with_name(f".{self.path.stem}-vllm-logging.json")
        atomic_write(out, json.dumps(config, indent=1))  # several teacher workers may write it at once
        return out

    def _import_libraries(self) -> None:
        """transformers and datasets configure their loggers on import: do it now, then reroute."""
        for name in ("transformers", "datasets"):
            with contextlib.suppress(Exception):
                __import__(name)

    def _quiet_progress_bars(self) -> None:
        with contextlib.suppress(Exception):
            from transformers.utils import logging as tlog

            if tlog.is_progress_bar_enabled():
                tlog.disable_progress_bar()
                self._undo.append(tlog.enable_progress_bar)
        with contextlib.suppress(Exception):
            from datasets.utils import tqdm as dtqdm

            if not dtqdm.are_progress_bars_disabled():
                dtqdm.disable_progress_bars()
                self._undo.append(dtqdm.enable_progress_bars)
