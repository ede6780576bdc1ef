"""A student's rounds through the real CLI: data -> SeqKD (teacher generations) -> on-policy (the
student's generations), each round generated, cached by stage one and trained by stage two; status,
--dry-run, bad config, and a SIGKILL in generation that reruns to the same student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.fixtures import atkd_here
from tests.support.ending_model import rounds_list, rounds_workspace, write_rounds_config

ROUNDS = rounds_list(2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return rounds_workspace(tmp_path_factory.mktemp("rounds"))


def _config(tmp_path: Path, models, run: str = "run", rounds=ROUNDS) -> str:
    return write_rounds_config(tmp_path / f"{run}.yaml", tmp_path / run, models, rounds)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(out.glob("rows/*.jsonl")) for line in f.read_text().splitlines()]


def test_rounds_run_resume_and_status(models, tmp_path, capsys):
    cfg = _config(tmp_path, models)
    rc, out = atkd_here(capsys, "run", cfg, "--dry-run")
    assert rc == 0, out
    assert "would train 3 round(s), 6 steps in all" in out
    assert "round 1: SeqKD: the teacher's generations" in out and "generation not started" in out
    rc, out = atkd_here(capsys, "teacher", cfg)
    assert rc == 0, out
    rc, out = atkd_here(capsys, "student", cfg)
    assert rc == 0, out
    run = tmp_path / "run"
    assert (run / "students" / "op" / "final").is_dir() and (run / "rounds/op/round-0/student/final").is_dir()
    assert not (run / "rounds/op/round-0/generated").exists()  # a data round reads the training cache
    seqkd, onpolicy = _rows(run / "rounds/op/round-1/generated"), _rows(run / "rounds/op/round-2/generated")
    assert seqkd and {r["_atkd"]["source"] for r in seqkd} == {"teacher"}
    assert {r["_atkd"]["source"] for r in onpolicy} == {"student", "data"}
    for r in (1, 2):
        from storage.cache import Cache

        cache = Cache.open(str(run / f"rounds/op/round-{r}/cache"))
        assert cache.is_complete() and cache.manifest.identity["num_rows"] == len(_rows(
            run / f"rounds/op/round-{r}/generated"))
    # prompt tokens are never targets: a generated row's targets are its response and the closing EOS
    from stages.data import prompt_ids
    from stages.data_config import DataConfig
    from stages.teacher.identity import load_tokenizer

    tok = load_tokenizer(models["teacher"])
    for seq in list(cache.read_shard(0).sequences())[:5]:
        row = onpolicy[seq.example_id]
        start = len(prompt_ids(row, tok, DataConfig(max_seq_len=64))) - 1
        assert list(seq.target_positions) == list(range(start, len(seq.input_ids) - 1))
        assert seq.input_ids[-1] == tok.eos_token_id and tok.decode(seq.input_ids[start + 1:-1]) == row["response"]
    done = json.loads((run / "students/op/done.json").read_text())
    assert done["steps"] == 2 and [x["source"] for x in done["trained_from"]["rounds"]] == ["data", "teacher",
                                                                                             "student"]
    rc, out = atkd_here(capsys, "status", cfg)
    assert rc == 0 and "student op (atkd): done" in out, out
    assert "round 2: on-policy: the student's generations (n=2" in out and "generation 3/3 shards" in out
    # a rerun does nothing; a changed round makes the student stale, named
    rc, out = atkd_here(capsys, "student", cfg)
    assert rc == 0 and "already trained (3 rounds" in out, out
    rc, out = atkd_here(capsys, "student", cfg, "students.op.rounds.2.steps=3")
    assert rc != 0 and "rounds" in out and "--retrain op" in out, out


def test_round_config_errors(models, tmp_path, capsys):
    bad = [dict(ROUNDS[1], source="teachr")]
    rc, out = atkd_here(capsys, "status", _config(tmp_path, models, rounds=bad))
    assert rc != 0 and "students[0].rounds[0].source: 'teachr' is not one of 'data', 'teacher', 'student'" in out
    rc, out = atkd_here(capsys, "status", _config(tmp_path, models, rounds=[dict(ROUNDS[0], steps=0)]))
    assert rc != 0 and "students[0].rounds[0].steps: must be > 0" in out
    rc, out = atkd_here(capsys, "status", _config(tmp_path, models, rounds=[ROUNDS[2]]), "students.op.model=",
                        "students.op.init={model_type: llama, hidden_size: 64, num_hidden_layers: 1}")
    assert rc != 0 and "students[0].rounds[0].source: student generations in the first round need" in out, out


@pytest.mark.integration
def test_sigkill_in_a_round_reruns_to_the_same_student(models, tmp_path):
    """Killed in the on-policy round's generation (after and before a commit), its stage one and its stage two,
    then rerun: the same rows and the same final weights as an uninterrupted run."""
    from tests.support.harness import KILLED, run_atkd

    ref = _config(tmp_path, models, "ref")
    for cmd in ("teacher", "student"):
        rc, out = run_atkd([cmd, ref], tmp_path / f"ref-{cmd}.log")
        assert rc == 0, out
    cfg = _config(tmp_path, models, "run")
    rc, out = run_atkd(["teacher", cfg], tmp_path / "teacher.log")
    assert rc == 0, out
    # round 1 has 3 shards, so the 4th commit is round 2's first; then its stage one and its stage two
    for i, point in enumerate(("generate.committed:4", "generate.scored:2", "shard.commit:1", "student.step:2")):
        rc, out = run_atkd(["student", cfg], tmp_path / f"kill{i}.log", env={"ATKD_FAULT_POINT": point})
        assert rc in KILLED, out
    rc, out = run_atkd(["student", cfg], tmp_path / "rerun.log")
    assert rc == 0, out
    a, b = tmp_path / "ref", tmp_path / "run"
    assert _rows(a / "rounds/op/round-2/generated") == _rows(b / "rounds/op/round-2/generated")
    from safetensors.numpy import load_file

    wa, wb = (load_file(str(d / "students/op/final/model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
