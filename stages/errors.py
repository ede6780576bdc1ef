"""Errors the stages raise for problems the user can fix; every one derives from
`storage.errors.AtkdError`, so the CLI prints its message without a traceback.

ConfigError is here too, below every config: each section's `check()` (next to its
dataclass in stages/) raises it, and pipeline/config.py and pipeline/model_config.py
import it from here (pipeline.config re-exports it).

Next to their raisers live DataError (stages/rows.py), ResumeError
(stages/training/checkpoint.py), VocabularyMismatchError (stages/student/model.py)
and DemoMismatchError (stages/demo/teacher.py). Each kind keeps the builtin it
replaced as a second base, so `except ValueError` callers keep working.
"""

from __future__ import annotations

from storage.errors import AtkdError


class ConfigError(AtkdError, ValueError):
    """A problem with pipeline.yaml, an override or a command-line argument; the message names the key path."""


def did_you_mean(word: str, choices: list[str]) -> str:
    """` (did you mean hidden_size?)` when a choice is close to `word`, else '' (for a ConfigError's message)."""
    import difflib

    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_name(name: str, where: str) -> None:
    """Student and run names become directory names: refuse path tricks."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("~"):
        raise ConfigError(f"{where}: {name!r} is not a valid name (no '/', '..' or absolute paths)")


class ModelError(AtkdError, ValueError):
    """A teacher or student model or tokenizer cannot be found or loaded, or the two do not belong together."""


class TeacherError(AtkdError, ValueError):
    """The teacher settings do not fit the teacher model or engine (empty model, top_k, backend, sequence length)."""


class EngineError(AtkdError, RuntimeError):
    """The teacher engine cannot serve this model as it is (an unsupported LM head, another vocabulary size)."""


class EvalError(AtkdError, ValueError):
    """The evaluation settings cannot work here (an unknown backend, or vLLM asked for but not installed)."""


class DemoError(AtkdError, ValueError):
    """The demo settings cannot work (data fields, vocabulary size, attention head counts)."""


class LaunchError(AtkdError, RuntimeError):
    """A training process was started in a way it cannot run (e.g. more ranks per node than visible GPUs)."""


class TrainingError(AtkdError, ValueError):
    """The student's training settings do not fit its cache (e.g. optim.epochs with too few sequences)."""
