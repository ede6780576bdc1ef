"""One error family: the CLI prints a one-line message for AtkdError only; any other
exception is a bug and leaves cli.main with its traceback."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli
from storage.errors import AtkdError, StorageIOError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg_path(tmp_path) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\ndata: {{path: {tmp_path / 'train.jsonl'}}}\n"
                    f"teacher: {{model: {tmp_path / 'teacher'}}}\n")
    return path


def _raise_from_stage(monkeypatch, error: BaseException) -> None:
    """Stage one's entry point raises `error` (the orchestrator imports it at call time)."""
    from stages.teacher import capture

    def run_capture(*args, **kwargs):
        raise error

    monkeypatch.setattr(capture, "run_capture", run_capture)


def test_an_unexpected_exception_propagates_with_its_traceback(cfg_path, monkeypatch, capsys):
    monkeypatch.delenv("ATKD_DEBUG", raising=False)
    _raise_from_stage(monkeypatch, RuntimeError("a bug inside a stage"))
    with pytest.raises(RuntimeError, match="a bug inside a stage"):
        cli.main(["teacher", str(cfg_path)])
    assert "atkd: RuntimeError" not in capsys.readouterr().err  # not dressed up as a user error


def test_an_unexpected_exception_exits_1_with_a_traceback_end_to_end(cfg_path):
    code = ("import sys\n"
            "from stages.teacher import capture\n"
            "def run_capture(*a, **k):\n"
            "    raise RuntimeError('a bug inside a stage')\n"
            "capture.run_capture = run_capture\n"
            "from pipeline.cli import main\n"
            f"sys.exit(main(['teacher', {str(cfg_path)!r}]))\n")
    env = {k: v for k, v in os.environ.items() if k != "ATKD_DEBUG"}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert "Traceback (most recent call last)" in p.stderr and "RuntimeError: a bug inside a stage" in p.stderr
    assert "atkd: RuntimeError" not in p.stderr


def test_an_atkd_error_is_one_line_without_traceback(cfg_path, monkeypatch, capsys):
    from stages.errors import TeacherError

    monkeypatch.delenv("ATKD_DEBUG", raising=False)
    _raise_from_stage(monkeypatch, TeacherError("teacher.top_k=9 exceeds the vocabulary"))
    assert cli.main(["teacher", str(cfg_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "atkd: TeacherError: teacher.top_k=9 exceeds the vocabulary"
    assert "Traceback" not in err


def test_atkd_debug_shows_the_traceback_of_an_atkd_error(cfg_path, monkeypatch):
    from stages.errors import TeacherError

    monkeypatch.setenv("ATKD_DEBUG", "1")
    _raise_from_stage(monkeypatch, TeacherError("teacher.top_k=9 exceeds the vocabulary"))
    with pytest.raises(TeacherError):
        cli.main(["teacher", str(cfg_path)])


def test_a_disk_error_keeps_errno_and_the_hint(cfg_path, monkeypatch, capsys):
    monkeypatch.delenv("ATKD_DEBUG", raising=False)
    error = StorageIOError(errno.ENOSPC, "writing shard 3 to /c/shards/shard-00003.zarr failed (No space left on "
                                         "device); nothing of this shard was committed", "/c/shards/x")
    _raise_from_stage(monkeypatch, error)
    assert cli.main(["teacher", str(cfg_path)]) == 1
    err = capsys.readouterr().err
    assert "atkd: StorageIOError: [Errno 28] writing shard 3 to /c/shards/shard-00003.zarr failed" in err
    assert "atkd: the disk (or quota) is full: free space" in err


def test_a_config_error_keeps_its_own_line_and_exit_code(tmp_path, capsys):
    assert cli.main(["status", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("atkd: config error: config file")


def test_every_user_facing_error_is_an_atkd_error_and_keeps_the_builtin_it_replaced():
    from pipeline.config import ConfigError
    from pipeline.workers import WorkerCountError, WorkerError
    from stages.demo.teacher import DemoMismatchError
    from stages.errors import DemoError, EngineError, EvalError, LaunchError, ModelError, TeacherError
    from stages.rows import DataError
    from stages.training.checkpoint import ResumeError
    from stages.student.model import VocabularyMismatchError
    from storage.errors import (CacheMismatchError, CacheNotReadyError, CorruptShardError, LeaseLostError,
                                ManifestError, ReaderStateError, ShardExistsError, StorageArgumentError, StorageError)

    builtins = {ConfigError: ValueError, DataError: ValueError, ModelError: ValueError, TeacherError: ValueError,
                EngineError: RuntimeError, EvalError: ValueError, DemoError: ValueError,
                DemoMismatchError: RuntimeError, LaunchError: RuntimeError, ResumeError: RuntimeError,
                VocabularyMismatchError: ValueError, WorkerError: RuntimeError, WorkerCountError: ValueError,
                StorageIOError: OSError, ReaderStateError: ValueError, CacheNotReadyError: RuntimeError,
                StorageArgumentError: ValueError}
    for cls, builtin in builtins.items():
        assert issubclass(cls, AtkdError) and issubclass(cls, builtin), cls
    for cls in (ManifestError, CacheMismatchError, CorruptShardError, ShardExistsError, LeaseLostError):
        assert issubclass(cls, StorageError) and issubclass(cls, AtkdError), cls
    assert StorageIOError(errno.ENOSPC, "m", "f").errno == errno.ENOSPC


def test_stages_and_storage_never_import_pipeline():
    for package in ("stages", "storage"):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            assert "from pipeline" not in text and "import pipeline" not in text, path


@pytest.mark.parametrize("override, message", [
    ("students.a.loss.ce_weight=-1", "students[0].loss.ce_weight: must be >= 0, got -1.0"),
    ("students.a.loss.beta=1.5", "students[0].loss.beta: must be in (0, 1), got 1.5"),
    ("students.a.loss.alpha=0", "students[0].loss.alpha: must be in (0, 1), got 0.0"),
])
def test_loss_settings_the_loss_functions_refuse_fail_at_load(cfg_path, override, message):
    from pipeline.config import ConfigError, load_config

    cfg_path.write_text(cfg_path.read_text() + "students: [{name: a, model: m}]\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg_path, [override])
    assert str(e.value) == message


def test_an_unknown_teacher_device_fails_at_load(cfg_path, capsys):
    assert cli.main(["teacher", str(cfg_path), "teacher.device=gpu"]) == 2
    assert "teacher.device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'" in capsys.readouterr().err


def test_a_vllm_start_up_failure_is_an_engine_error_saying_what_to_do(monkeypatch):
    from stages.errors import EngineError
    from stages.teacher import engines
    from stages.teacher.config import TeacherConfig

    def fail(*args, **kwargs):
        raise RuntimeError("Engine core initialization failed. See root cause above.")

    monkeypatch.setattr(engines, "make_vllm_engine", fail)
    monkeypatch.setattr("stages.teacher.engine_vllm.unsupported_reason", lambda model: None)
    with pytest.raises(EngineError, match=r"vLLM failed to start .*Engine core initialization failed.*"
                                          r"teacher.backend=auto"):
        engines.make_engine(TeacherConfig(model="m", backend="vllm"))


def test_help_of_the_cli_and_every_subcommand_prints(capsys):
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - the subcommands argparse knows
    for argv in (["--help"], *([name, "--help"] for name in commands)):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0, argv
        assert "usage: atkd" in capsys.readouterr().out
