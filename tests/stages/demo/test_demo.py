"""The embedded demo: generated task, tokenizer, and a (very short) teacher training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.config import DataConfig, DemoConfig
from stages.demo import task as demo_task
from stages.demo.task import (
    OPENERS,
    PHRASINGS,
    TASKS,
    compute_answer,
    extract_answer,
    generate_splits,
)

REPO = Path(__file__).resolve().parents[3]


def _tiny_demo(**overrides) -> DemoConfig:
    base = {
        "enabled": True, "seed": 3, "train_examples": 200, "validation_examples": 20, "test_examples": 20,
        "vocab_size": 256,
        "teacher": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                    "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 64},
        "teacher_steps": 4, "teacher_batch_size": 8, "teacher_lr": 1e-3,
    }
    base.update(overrides)
    return DemoConfig(**base)


# ---------------------------------------------------------------- task


def test_generation_is_deterministic_per_seed():
    a = generate_splits(0, 100, 20, 20)
    b = generate_splits(0, 100, 20, 20)
    c = generate_splits(1, 100, 20, 20)
    assert a == b
    assert a["train"] != c["train"]
    assert a["validation"] != a["test"]
    assert {len(v) for v in a.values()} == {100, 20} and len(a["test"]) == 20


def test_demo_data_files_are_identical_for_the_same_seed(tmp_path):
    from stages.demo.teacher import write_demo_data

    first = write_demo_data(_tiny_demo(), tmp_path / "a")
    second = write_demo_data(_tiny_demo(), tmp_path / "b")
    other = write_demo_data(_tiny_demo(seed=4), tmp_path / "c")
    for split in ("train", "validation", "test"):
        assert (first / f"{split}.jsonl").read_bytes() == (second / f"{split}.jsonl").read_bytes()
        assert (first / f"{split}.jsonl").read_bytes() != (other / f"{split}.jsonl").read_bytes()
    rows = [json.loads(x) for x in (first / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and set(rows[0]) == {"prompt", "response", "answer", "task"}


def test_answers_are_correct_and_extractable():
    splits = generate_splits(7, 500, 100, 100)
    for rows in splits.values():
        for row in rows:
            assert row["task"] in TASKS
            assert compute_answer(row["prompt"], row["task"]) == row["answer"]
            assert extract_answer(row["response"], row["task"]) == row["answer"]
            assert row["answer"] in row["response"]
    # every task and several phrasings occur
    assert {r["task"] for r in splits["train"]} == set(TASKS)
    assert len({r["response"].replace(r["answer"], "X") for r in splits["train"]}) >= 8


def test_evaluation_rows_are_not_training_rows_at_the_demos_sizes():
    """The shipped pipeline.yaml keeps the overlap refusal on, and the pipeline's own check (content
    fingerprints) finds no evaluation row among the students' training rows; stricter, no evaluation
    prompt is a training or teacher prompt."""
    from pipeline.config import load_config
    from stages.eval.overlap import content_fields, row_fingerprint

    cfg = load_config(REPO / "pipeline.yaml")
    assert cfg.demo.enabled and cfg.eval.allow_train_overlap is False
    demo, data_cfg = cfg.demo, cfg.data
    splits = generate_splits(demo.seed, demo.train_examples, demo.validation_examples, demo.test_examples,
                             demo.teacher_train_examples)
    fields = content_fields(data_cfg)
    train = {row_fingerprint(r, fields) for r in splits["train"]}
    trained_prompts = {r["prompt"] for name in ("train", "teacher") for r in splits[name]}
    for split in ("validation", "test"):
        assert len(splits[split]) == 300
        assert sum(row_fingerprint(r, fields) in train for r in splits[split]) == 0, split
        assert not [r["prompt"] for r in splits[split] if r["prompt"] in trained_prompts], split


def test_facts_recur_in_training_only_in_other_wordings():
    splits = generate_splits(0, 4000, 300, 300)
    wordings = {"add": demo_task.ADD_WORDINGS,
                "lookup": [w for ws in demo_task.LOOKUP_WORDINGS.values() for w in ws]}

    def fact(row):  # ((task, answer, the fact's own words), the wording it is asked in)
        for w in wordings[row["task"]]:
            pattern = re.escape(w)
            for name, group in (("{a}", r"(\d)"), ("{b}", r"(\d)"), ("{key}", "(.+)")):
                pattern = pattern.replace(re.escape(name), group)
            m = re.fullmatch(pattern, row["prompt"])
            if m:
                return (row["task"], row["answer"], m.groups()), w
        raise AssertionError(f"no wording matches {row['prompt']!r}")

    trained: dict = {}
    for row in splits["train"]:
        if row["task"] in demo_task.FACT_TASKS:
            key, wording = fact(row)
            trained.setdefault(key, set()).add(wording)
    assert {w for ws in trained.values() for w in ws} == set(wordings["add"]) | set(wordings["lookup"])
    for split in ("validation", "test"):
        rows = [r for r in splits[split] if r["task"] in demo_task.FACT_TASKS]
        assert len(rows) == 120
        for row in rows:  # the fact was trained, never in this wording
            key, wording = fact(row)
            assert key in trained and wording not in trained[key], row


def test_held_out_wordings_are_balanced_and_seeded():
    for task in demo_task.FACT_TASKS:  # each wording held out for a third of the facts (of each relation)
        held = demo_task.held_out_wording(0, task)
        groups = {fact[0] if task == "lookup" else task for fact in held}
        for group in groups:
            values = [w for fact, w in held.items() if (fact[0] if task == "lookup" else task) == group]
            counts = [values.count(w) for w in range(demo_task.WORDINGS)]
            assert max(counts) - min(counts) <= 1, (task, group, counts)
        assert demo_task.held_out_wording(1, task) != held


def test_addition_answer_is_the_sum():
    for row in generate_splits(5, 200, 0, 0)["train"]:
        if row["task"] == "add":
            a, b = (int(x) for x in re.findall(r"\d+", row["prompt"]))
            assert int(row["answer"]) == a + b


@pytest.mark.parametrize("answer", ["42", "1 2 3", "Paris", "z y x"])
def test_extract_answer_round_trip(answer):
    for opener in OPENERS:
        for phrasing in PHRASINGS:
            text = opener + phrasing.format(answer=answer)
            assert extract_answer(text) == answer
            assert extract_answer("  " + text + "\nmore text", "add") == answer  # first line only


def test_extract_answer_rejects_other_text():
    assert extract_answer("") is None
    assert extract_answer("I do not know") is None
    assert extract_answer("The answer is") is None
    assert extract_answer("The answer is 4. It is 5.") is None
    with pytest.raises(ValueError):
        extract_answer("Answer: 4", "not-a-task")


def test_write_jsonl_round_trip(tmp_path):
    rows = generate_splits(0, 10, 0, 0)["train"]
    demo_task.write_jsonl(rows, tmp_path / "x.jsonl")
    assert demo_task.read_jsonl(tmp_path / "x.jsonl") == rows


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    from stages.data import render_prompt
    from stages.demo.tokenizer import build_demo_tokenizer

    data_cfg = DataConfig()
    rows = generate_splits(0, 300, 0, 0)["train"]
    texts = [render_prompt(r, data_cfg) + r["response"] for r in rows]
    build_demo_tokenizer(texts, 300, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) <= 300
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    for text in texts[:50]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert len(ids) < 60
    with_bos = tok("Add 1 and 2.")["input_ids"]
    assert with_bos[0] == tok.bos_token_id
    # digits are single tokens (with or without their leading space)
    pieces = tok.convert_ids_to_tokens(tok("Add 123 and 45.", add_special_tokens=False)["input_ids"])
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["Ġ1", "2", "3", "Ġ4", "5"]


# ---------------------------------------------------------------- teacher


def test_prepare_demo_trains_a_loadable_teacher_and_reuses_it(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.demo.teacher import DemoMismatchError, prepare_demo

    data_cfg = DataConfig(max_seq_len=96)
    paths = prepare_demo(_tiny_demo(), tmp_path, data_cfg, progress=False)
    model = AutoModelForCausalLM.from_pretrained(paths.teacher_dir)
    tok = AutoTokenizer.from_pretrained(paths.teacher_dir)
    assert model.config.head_dim == 64 and model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    with torch.no_grad():
        out = model(torch.tensor([[tok.bos_token_id, 5, 6]]))
    assert torch.isfinite(out.logits).all()
    m = paths.teacher_metrics
    assert m["steps"] == 4 and len(m["losses"]) == 4 and 0.0 <= m["validation_exact_match"] <= 1.0
    assert not (tmp_path / "teacher.work").exists()

    # A second call reuses every step (no retraining: the weights file is untouched).
    weights = next(p for p in (tmp_path / "teacher").iterdir() if p.suffix == ".safetensors")
    mtime = weights.stat().st_mtime_ns
    again = prepare_demo(_tiny_demo(), tmp_path, data_cfg, progress=False)
    assert again == paths and weights.stat().st_mtime_ns == mtime

    # Other settings over a finished demo: refused, naming what differs.
    with pytest.raises(DemoMismatchError, match="teacher_steps"):
        prepare_demo(_tiny_demo(teacher_steps=5), tmp_path, data_cfg, progress=False)


def test_teacher_training_resumes_from_its_checkpoint(tmp_path):
    from stages.demo import teacher as demo_teacher

    data_cfg = DataConfig(max_seq_len=96)
    cfg = _tiny_demo(teacher_steps=4)
    root = tmp_path / "demo"
    root.mkdir()
    data_dir = demo_teacher.write_demo_data(cfg, root / "data")
    tok = demo_teacher.write_demo_tokenizer(cfg, data_cfg, data_dir / "train.jsonl", root / "tokenizer")
    settings = demo_teacher._teacher_settings(cfg, data_cfg)
    args = (cfg, data_cfg, tok, data_dir / "train.jsonl", data_dir / "validation.jsonl")
    kw = {"progress": False, "check_examples": 2}
    full = demo_teacher.train_demo_teacher(*args, root / "full", settings, **kw)

    # Simulate a kill after step 2 (checkpoint written), then rerun to the end.
    half = demo_teacher.train_demo_teacher(*args, root / "resumed", settings, stop_after=2, **kw)
    from stages.training.checkpoint import latest_valid_checkpoint

    assert half is None and latest_valid_checkpoint(root / "resumed.work").step == 2
    resumed = demo_teacher.train_demo_teacher(*args, root / "resumed", settings, **kw)
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-4, abs=1e-5)
    # The trainer's checkpoints keep weights and optimiser state exactly: the same teacher, bit for bit.
    assert (root / "resumed" / "model.safetensors").read_bytes() == (root / "full" / "model.safetensors").read_bytes()


def test_prepare_demo_refuses_non_prompt_response_data(tmp_path):
    from stages.demo.teacher import prepare_demo

    with pytest.raises(ValueError, match="prompt_response"):
        prepare_demo(_tiny_demo(), tmp_path, DataConfig(kind="text"), progress=False)


# ---------------------------------------------------------------- the teacher's own pool


def test_teacher_pool_is_disjoint_and_leaves_the_students_splits_unchanged():
    without = generate_splits(0, 300, 60, 60)
    splits = generate_splits(0, 300, 60, 60, teacher=2000)
    assert generate_splits(0, 300, 60, 60, teacher=2000) == splits  # deterministic
    assert generate_splits(1, 300, 60, 60, teacher=2000)["teacher"] != splits["teacher"]
    assert {k: v for k, v in splits.items() if k != "teacher"} == without
    assert len(splits["teacher"]) == 2000 and {r["task"] for r in splits["teacher"]} == set(TASKS)
    held_out = {r["prompt"] for name in ("validation", "test") for r in splits[name]}
    assert not any(r["prompt"] in held_out for r in splits["teacher"])
    train = {r["prompt"] for r in splits["train"]}
    computed = [r for r in splits["teacher"] if r["task"] not in demo_task.FACT_TASKS]
    assert computed and not any(r["prompt"] in train for r in computed)
    assert all(compute_answer(r["prompt"], r["task"]) == r["answer"] for r in splits["teacher"])


def test_prepare_demo_trains_the_teacher_on_its_own_pool(tmp_path):
    from stages.demo.teacher import prepare_demo, write_demo_data

    data_cfg = DataConfig(max_seq_len=96)
    assert not (write_demo_data(_tiny_demo(), tmp_path / "plain") / "teacher.jsonl").exists()
    paths = prepare_demo(_tiny_demo(teacher_train_examples=500), tmp_path / "run", data_cfg, progress=False)
    data = tmp_path / "run" / "data"
    pool = demo_task.read_jsonl(data / "teacher.jsonl")
    assert len(pool) == 500 and len(demo_task.read_jsonl(paths.train_path)) == 200
    assert paths.teacher_metrics["train_examples"] == 500  # trained on the pool, not on train.jsonl
    assert json.loads((data / "done.json").read_text())["counts"]["teacher"] == 500
