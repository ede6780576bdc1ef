"""`atkd student` as a user meets it (issue 10): a SIGTERM keeps the steps done so far and
the rerun continues them exactly; the exported files have the usual permissions; a
student trained on `messages` data exports the chat template it was trained with.

Stage one runs in this process (tiny teacher, transformers engine); students run as
real `python -m pipeline` subprocesses or the warm forked ones of tests/support/harness.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import cli
from stages.training import checkpoint as ckpt
from tests.support import harness as fh
from tests.support import fixtures

pytestmark = pytest.mark.integration  # every test runs students as processes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_llama_dir, train_jsonl):
    """A complete teacher cache built by `atkd teacher` in this process."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("student_cli")
    ws = {"root": root, "model": str(tiny_llama_dir), "data": str(train_jsonl)}
    assert cli.main(["teacher", str(config(ws, "ref"))]) == 0
    ws["cache"] = str(root / "ref" / "cache")
    return ws


def config(ws, name: str, **kw) -> Path:
    root = ws["root"]
    return fh.write_config(root / f"{name}.yaml", model=ws["model"], data=kw.pop("data", ws["data"]),
                           run_dir=str(root / name), cache=kw.pop("cache", ws.get("cache", str(root / name / "cache"))),
                           **kw)


def atkd(*args: str, log: Path) -> subprocess.Popen:
    """`python -m pipeline ARGS`, stdout and stderr into `log`."""
    env = {**os.environ, **fh.BASE_ENV, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def logged_steps(out: Path) -> int:
    log = out / "log.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


# ---------------------------------------------------------------- signals


def test_sigterm_checkpoints_the_current_step_and_the_rerun_matches(ws, tmp_path):
    steps = dict(max_steps=40, checkpoint_every=15)
    ref_cfg, cfg = config(ws, "term-ref", **steps), config(ws, "term", **steps)
    assert atkd("student", str(ref_cfg), log=tmp_path / "ref.log").wait(300) == 0, (tmp_path / "ref.log").read_text()

    out = ws["root"] / "term" / "students" / "s1"
    proc = atkd("student", str(cfg), log=tmp_path / "term.log")
    deadline = time.monotonic() + 300
    while logged_steps(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(300)
    text = (tmp_path / "term.log").read_text()
    assert rc == 130, text  # the CLI's "interrupted" exit, not a kill
    stopped = logged_steps(out)
    assert 3 <= stopped < 40, text
    assert [s for s, _ in ckpt.list_checkpoints(out)][-1] == stopped  # the steps since checkpoint 15k are kept
    assert f"[student] s1: stopped by SIGTERM after step {stopped}; checkpoint {ckpt.step_dir(out, stopped)}" in text
    assert "rerun the same command to continue where it stopped" in text
    assert "Traceback" not in text

    assert atkd("student", str(cfg), log=tmp_path / "rerun.log").wait(300) == 0
    text = (tmp_path / "rerun.log").read_text()
    assert f"[student] resuming s1 from step {stopped} (checkpoint {ckpt.step_dir(out, stopped)})" in text
    ref = fh.student_snapshot(ws["root"] / "term-ref" / "students" / "s1")
    assert fh.compare_students(fh.student_snapshot(out), ref) == []  # losses and weights, bit for bit


# ---------------------------------------------------------------- exported files


def test_every_student_file_has_the_usual_permissions(ws, tmp_path):
    rc, out = fh.run_atkd(["student", str(config(ws, "perms", max_steps=4))], tmp_path / "perms.log")
    assert rc == 0, out
    umask = os.umask(0o022)
    os.umask(umask)
    student = ws["root"] / "perms" / "students" / "s1"
    modes = {p.relative_to(student).as_posix(): oct(p.stat().st_mode & 0o777) for p in student.rglob("*")
             if p.is_file()}
    assert "final/model.safetensors" in modes and "checkpoints/step_000004/model.safetensors" in modes
    assert {name: mode for name, mode in modes.items() if mode != oct(0o666 & ~umask)} == {}


def chat_rows(n: int) -> list[dict]:
    prompts, answers = fixtures.generated_text(n, seed=5), fixtures.generated_text(n, seed=6)
    return [{"messages": [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": p},
                          {"role": "assistant", "content": a}]} for p, a in zip(prompts, answers)]


def test_messages_student_exports_the_chat_template_it_was_trained_with(ws, tmp_path):
    from transformers import AutoTokenizer

    from storage.cache import Cache

    rows = chat_rows(12)
    data = fixtures.write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = config(ws, "chat", data=str(data), cache=str(ws["root"] / "chat" / "cache"), max_steps=2,
                 extra={"data": {"path": str(data), "kind": "messages", "max_seq_len": 128}})
    assert cli.main(["teacher", str(cfg)]) == 0
    rc, out = fh.run_atkd(["student", str(cfg)], tmp_path / "chat.log")
    assert rc == 0, out

    exported = AutoTokenizer.from_pretrained(ws["root"] / "chat" / "students" / "s1" / "final")
    assert AutoTokenizer.from_pretrained(ws["model"]).chat_template is None  # training used the built-in one
    cache = Cache.open(str(ws["root"] / "chat" / "cache"))
    assert exported.chat_template == cache.manifest.identity["chat_template"]
    for record in cache.read_shard(0).sequences():  # the token ids the student was trained on
        trained_text = exported.decode(record.input_ids.tolist())
        assert exported.apply_chat_template(rows[record.example_id]["messages"], tokenize=False) == trained_text
