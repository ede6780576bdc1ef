"""Runs without a teacher cache (SFT students straight from the rows) and `teacher.finetune`
(the teacher trained on the rows first; stage one caches the fine-tuned weights), through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.support import harness as fh
from pipeline.config import ConfigError, load_config
from tests.support.fixtures import atkd_here

OPTIM = {"lr": 3e-3, "warmup_steps": 1, "max_steps": 4, "batch_size": 4}
HOLDOUT = {"validation": 4, "test": 4, "seed": 0}  # 32 of the 40 rows train
EVAL = {"max_examples": 4, "max_new_tokens": 4, "batch_size": 4, "backend": "transformers"}


def sft_config(root: Path, data: str, model: str, *, name: str = "sft") -> Path:
    """A run with no teacher: one SFT student (a pretrained tiny Llama) trained from the rows."""
    cfg = {"run_dir": str(root / name), "data": {"path": data, "max_seq_len": 64, "holdout": dict(HOLDOUT)},
           "students": [{"name": "sft", "model": model, "loss": {"kind": "sft", "chunk_size": 16},
                         "optim": dict(OPTIM), "checkpoint_every": 2}],
           "eval": dict(EVAL)}  # the test part; no teacher: no validation cache
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_configs_say_which_students_need_a_teacher(tmp_path, train_jsonl):
    base = {"run_dir": str(tmp_path / "r"), "data": {"path": str(train_jsonl)}}

    def load(students, **extra):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({**base, "students": students, **extra}))
        return load_config(path)

    sft = {"name": "a", "model": "m", "loss": {"kind": "sft"}}
    assert load([sft]).students[0].data == "auto"  # no teacher: the rows
    with pytest.raises(ConfigError, match="teacher.model: set"):
        load([sft, {"name": "b", "model": "m", "loss": {"kind": "kd"}}])
    with pytest.raises(ConfigError, match="teacher.model: set"):
        load([{**sft, "data": "cache"}])
    with pytest.raises(ConfigError, match=r"students\[0\].data: 'k' reads the training rows"):
        load([{"name": "k", "model": "m", "loss": {"kind": "atkd"}, "data": "rows"}], teacher={"model": "t"})
    with pytest.raises(ConfigError, match="teacher.model: set"):
        load([sft], teacher={"finetune": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"students\[0\].tokenizer: 'i' is initialised from `init`"):
        load([{"name": "i", "init": {"hidden_size": 64}, "loss": {"kind": "sft"}}])
    with pytest.raises(ConfigError, match="teacher.finetune.optim: batch_size"):
        load([sft], teacher={"model": "t", "finetune": {"enabled": True, "optim": {"max_steps": 0}}})


@pytest.mark.integration
def test_run_with_only_sft_students_and_no_teacher(tmp_path, tiny_llama_dir, train_jsonl, capsys):
    cfg = str(sft_config(tmp_path, str(train_jsonl), str(tiny_llama_dir)))
    run_dir = tmp_path / "sft"
    rc, out = atkd_here(capsys, "run", cfg, "--dry-run")
    assert rc == 0, out
    assert "stage one (training data): skipped, every student trains from the rows" in out
    assert "student sft (sft, from the rows" in out and "would train 4 steps" in out

    rc, out = atkd_here(capsys, "run", cfg)
    assert rc == 0, out
    assert "from the training rows (no teacher cache)" in out and "32/32 rows used" in out  # the train part
    assert "skipped: the run has no teacher" in out
    assert not (run_dir / "cache").exists() and not (run_dir / "cache-val").exists()
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert list(results) == ["sft"]  # no teacher row, no teacher metrics
    assert results["sft"]["rouge_l"] is not None and results["sft"]["kl_to_teacher"] is None
    assert (run_dir / "report" / "report.md").is_file()

    rc, out = atkd_here(capsys, "status", cfg)
    assert "teacher cache: not needed" in out and "student sft (sft, from the rows): done" in out
    assert "evaluation: done" in out
    rc, out = atkd_here(capsys, "run", cfg)
    assert rc == 0 and "nothing to do" in out


@pytest.mark.integration
def test_rows_sft_student_killed_resumes_bit_identical(tmp_path, tiny_llama_dir, train_jsonl):
    """SIGKILL the rows-trained student at steps and inside checkpoint writes; the reruns end
    bit-identical to an uninterrupted run (tests/support/harness.py's kill campaign)."""
    ref = sft_config(tmp_path, str(train_jsonl), str(tiny_llama_dir), name="ref")
    rc, out = fh.run_atkd(["student", str(ref)], tmp_path / "logs" / "ref.log")
    assert rc == 0, out
    want = fh.student_snapshot(tmp_path / "ref" / "students" / "sft")
    assert len(want["log"]) == 4
    cfg = sft_config(tmp_path, str(train_jsonl), str(tiny_llama_dir), name="killed")
    counts = fh.run_campaign(["student", str(cfg)], ["student.step:3", "ckpt.rename:1", "ckpt.optim:1"],
                             tmp_path / "logs" / "killed")
    assert counts.kills == 3, counts
    got = fh.student_snapshot(tmp_path / "killed" / "students" / "sft")
    assert fh.compare_students(got, want) == []


# ---------------------------------------------------------------- teacher.finetune


def finetune_config(root: Path, model: str, data: str, *, name: str, lr: float = 3e-3,
                    cache: str | None = None) -> Path:
    path = fh.write_config(root / f"{name}.yaml", model=model, data=data, run_dir=str(root / name),
                           cache=cache or str(root / name / "cache"), sequences_per_shard=20, max_steps=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["teacher"]["finetune"] = {"enabled": True, "optim": {**OPTIM, "lr": lr}, "checkpoint_every": 2,
                                  "chunk_size": 16}
    cfg["students"][0]["optim"]["max_steps"] = 2
    cfg["data"]["holdout"] = dict(HOLDOUT)
    cfg["eval"] = dict(EVAL)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.integration
def test_finetuned_teacher_is_what_stage_one_caches(tmp_path, tiny_llama_dir, train_jsonl, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from stages.fingerprint import model_fingerprint
    from storage.cache import Cache

    cfg = str(finetune_config(tmp_path, str(tiny_llama_dir), str(train_jsonl), name="ft"))
    run_dir = tmp_path / "ft"
    ft_dir = run_dir / "teacher-finetuned"
    rc, out = atkd_here(capsys, "run", cfg, "--dry-run")
    assert rc == 0, out
    assert f"teacher fine-tune -> {ft_dir}: not started: would fine-tune {tiny_llama_dir} for 4 steps" in out
    assert f"stage one: teacher {ft_dir / 'final'}" in out

    # `atkd finetune` (what torchrun launches for a big teacher) runs the fine-tune only.
    rc, out = atkd_here(capsys, "finetune", cfg)
    assert rc == 0 and (ft_dir / "done.json").is_file() and not (run_dir / "cache").exists(), out
    rc, out = atkd_here(capsys, "run", cfg)
    assert rc == 0, out
    assert "fine-tuning" not in out  # done by `atkd finetune`
    record = json.loads((ft_dir / "final" / "atkd_finetune.json").read_text())
    assert record["settings"]["optim"]["lr"] == 3e-3 and (ft_dir / "done.json").is_file()
    assert record["base_fingerprint"] == model_fingerprint(str(tiny_llama_dir))
    cache = Cache.open(str(run_dir / "cache"))
    identity = cache.manifest.identity
    assert identity["teacher_finetune"] == record
    assert identity["teacher_fingerprint"] == model_fingerprint(str(ft_dir / "final")) != record["base_fingerprint"]

    # The cached gold log-probs are the fine-tuned model's, not the raw teacher's.
    shard = cache.read_shard(0)
    seq = next(shard.sequences())
    ids = torch.tensor(seq.input_ids, dtype=torch.long)[None]
    pos = torch.from_numpy(seq.target_positions.astype("int64"))

    def gold(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
        with torch.no_grad():
            logprobs = model(ids).logits[0].log_softmax(-1)
        return logprobs[pos, ids[0, pos + 1]].float()

    cached = torch.from_numpy(seq.target_logprobs)
    assert torch.allclose(cached, gold(str(ft_dir / "final")), atol=1e-4)
    assert not torch.allclose(cached, gold(str(tiny_llama_dir)), atol=1e-2)

    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["teacher"]["model_dir"] == str(ft_dir / "final")
    rc, out = atkd_here(capsys, "status", cfg)
    assert f"teacher fine-tune {ft_dir}: done" in out and "MISMATCH" not in out
    rc, out = atkd_here(capsys, "run", cfg)
    assert rc == 0 and "nothing to do" in out

    rc, out = atkd_here(capsys, "finetune", cfg, "teacher.finetune.enabled=false")
    assert rc == 2 and "no teacher fine-tune to run" in out
    # The raw teacher's identity differs: with teacher.finetune off, this cache is refused.
    rc, out = atkd_here(capsys, "teacher", cfg, "teacher.finetune.enabled=false")
    assert rc == 1 and "teacher_finetune" in out and "teacher_fingerprint" in out
    # Other fine-tune settings than the finished fine-tune's: refused, nothing retrained or lost.
    rc, out = atkd_here(capsys, "run", cfg, "teacher.finetune.optim.lr=0.002")
    assert rc == 1 and "was made from another config" in out and "settings.optim.lr: 0.003 -> 0.002" in out
    assert json.loads((ft_dir / "final" / "atkd_finetune.json").read_text()) == record

    # Fine-tuned with other settings (another run dir): another identity, so the first cache is refused.
    other = finetune_config(tmp_path, str(tiny_llama_dir), str(train_jsonl), name="ft2", lr=2e-3,
                            cache=str(run_dir / "cache"))
    rc, out = atkd_here(capsys, "teacher", str(other))
    assert rc == 1 and "teacher_finetune" in out, out
    assert json.loads((tmp_path / "ft2" / "teacher-finetuned" / "final" / "atkd_finetune.json").read_text()
                      )["settings"]["optim"]["lr"] == 2e-3


@pytest.mark.integration
def test_killed_teacher_finetune_resumes_and_caches_the_same_teacher(tmp_path, tiny_llama_dir, train_jsonl):
    ref = finetune_config(tmp_path, str(tiny_llama_dir), str(train_jsonl), name="ref")
    rc, out = fh.run_atkd(["teacher", str(ref)], tmp_path / "logs" / "ref.log")
    assert rc == 0, out
    cfg = finetune_config(tmp_path, str(tiny_llama_dir), str(train_jsonl), name="killed")
    counts = fh.run_campaign(["teacher", str(cfg)], ["student.step:3", "ckpt.rename:1"], tmp_path / "logs" / "k")
    assert counts.kills == 2, counts
    want = fh.student_snapshot(tmp_path / "ref" / "teacher-finetuned")
    got = fh.student_snapshot(tmp_path / "killed" / "teacher-finetuned")
    assert fh.compare_students(got, want) == []
    assert fh.compare_caches(fh.cache_snapshot(str(tmp_path / "killed" / "cache")),
                             fh.cache_snapshot(str(tmp_path / "ref" / "cache"))) == []
