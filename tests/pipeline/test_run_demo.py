"""`atkd run` end to end through the real CLI on a reduced demo config.

Same code path as the README's demo command: the demo data, tokenizer and
teacher are built, stage one caches the teacher (transformers engine here to
keep CI short; the vLLM engine has its own integration test), a base student
and two distilled students (kd, atkd) train from the cache, evaluation and the
report run, and a rerun does nothing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration  # `python -m pipeline` end to end

REPO = Path(__file__).resolve().parents[2]

STUDENT = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1,
           "num_key_value_heads": 1, "head_dim": 64, "intermediate_size": 128, "tie_word_embeddings": True}


def reduced_config(run_dir: Path) -> dict:
    cfg = yaml.safe_load((REPO / "pipeline.yaml").read_text())
    cfg["run_dir"] = str(run_dir)
    cfg["demo"].update(train_examples=240, teacher_train_examples=480, validation_examples=40, test_examples=40,
                       teacher_steps=12, teacher_batch_size=8, teacher={"hidden_size": 128, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "num_key_value_heads": 2,
                                                      "intermediate_size": 256})
    cfg["teacher"].update(backend="transformers", top_k=8)
    cfg["cache"]["sequences_per_shard"] = 100
    optim = {"lr": 0.002, "warmup_steps": 1, "max_steps": 4, "batch_size": 8}
    cfg["students"] = [
        {"name": "base", "init": STUDENT, "loss": {"kind": "sft"}, "optim": optim, "checkpoint_every": 2},
        {"name": "kd", "init_from": "base", "loss": {"kind": "kd"}, "optim": optim, "checkpoint_every": 2},
        {"name": "atkd", "init_from": "base", "loss": {"kind": "atkd"}, "optim": optim, "checkpoint_every": 2},
    ]
    cfg["eval"].update(max_examples=16, max_new_tokens=12, batch_size=16)
    return cfg


def atkd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_atkd_run_end_to_end_then_nothing_to_do(tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(reduced_config(run_dir)))

    first = atkd("run", str(config), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    table = first.stdout
    for name in ("base", "kd", "atkd", "teacher"):
        assert f"| {name} |" in table
    report = run_dir / "report"
    assert (report / "report.md").is_file()
    for png in ("loss_curves.png", "teacher_uncertainty.png", "topk_coverage.png"):
        assert (report / png).stat().st_size > 1000, png
    text = (report / "report.md").read_text()  # the demo's own parts, passed in by the orchestrator
    assert "## Demo teacher" in text and "### Exact match per task" in text and "ECE (↓)" in text
    # the shipped config's second set and lm-eval task (stages/eval, stages/demo/lm_eval_task.py)
    assert "| model | eval.path | validation | average |" in text and "atkd_demo_mc acc" in text
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert all(r["ece"] is not None and set(r["exact_match_by_task"]) == {"add", "sort", "count", "reverse",
                                                                          "lookup"} for r in results.values())
    # the demo evaluates with the overlap refusal on, on rows that are not training rows
    assert all(r["train_overlap"] == 0 for r in results.values())
    assert "evaluation rows are training rows" not in first.stderr

    from transformers import AutoModelForCausalLM

    for name in ("kd", "atkd"):
        model = AutoModelForCausalLM.from_pretrained(run_dir / "students" / name / "final")
        assert model.config.hidden_size == 64

    status = atkd("status", str(config), cwd=tmp_path)
    assert status.returncode == 0 and "shards done 3/3" in status.stdout  # 240 rows, 100 per shard
    assert "student atkd (atkd): done" in status.stdout

    again = atkd("run", str(config), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "nothing to do" in again.stdout
    assert "stage two: training" not in again.stdout

    verify = atkd("verify", str(run_dir / "cache"), cwd=tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.parametrize("args, expected", [
    (["run", "nope.yaml"], "config file 'nope.yaml' not found"),
    (["student", "{cfg}", "--student", "ghost"], "no student named 'ghost'"),
])
def test_cli_errors_are_short_and_clear(tmp_path, args, expected):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(reduced_config(tmp_path / "run")))
    res = atkd(*[a.replace("{cfg}", str(config)) for a in args], cwd=tmp_path)
    assert res.returncode != 0
    assert expected in res.stderr
    assert "Traceback" not in res.stderr
