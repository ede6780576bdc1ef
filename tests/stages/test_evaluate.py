"""Evaluation: generation metrics, perplexity, and KL / top-1 against a real validation cache."""

from __future__ import annotations

import math

import pytest

from pipeline.config import CacheConfig, DataConfig, EvalConfig, TeacherConfig
from stages import evaluate
from stages.demo.task import generate_splits, write_jsonl
from tests import fixtures


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory):
    """Demo rows, the demo tokenizer, two random tiny models and a validation cache of the first."""
    from stages.data import render_prompt
    from stages.demo.tokenizer import build_demo_tokenizer
    from stages.teacher.capture import run_capture

    root = tmp_path_factory.mktemp("eval")
    splits = generate_splits(0, 200, 12, 10)
    for name, rows in splits.items():
        write_jsonl(rows, root / f"{name}.jsonl")
    data_cfg = DataConfig(path=str(root / "train.jsonl"), max_seq_len=96)
    tok = build_demo_tokenizer([render_prompt(r, data_cfg) + r["response"] for r in splits["train"]], 256,
                               root / "tok")
    teacher = fixtures.make_tiny_llama(root / "teacher", tok, hidden=64, layers=1, heads=1, seed=0)
    other = fixtures.make_tiny_llama(root / "other", tok, hidden=64, layers=1, heads=1, seed=1)
    val_cfg = DataConfig(path=str(root / "validation.jsonl"), max_seq_len=96)
    cache = root / "val_cache"
    run_capture(val_cfg, TeacherConfig(model=str(teacher), backend="transformers", top_k=8),
                CacheConfig(path=str(cache), sequences_per_shard=5), progress=False)
    eval_cfg = EvalConfig(path=str(root / "test.jsonl"), validation_path=str(root / "validation.jsonl"),
                          max_new_tokens=12, batch_size=4, backend="transformers")
    return {"root": root, "data_cfg": data_cfg, "eval_cfg": eval_cfg, "teacher": str(teacher),
            "other": str(other), "cache": str(cache), "rows": splits["test"]}


def test_evaluate_models_returns_finite_metrics(demo_setup):
    s = demo_setup
    out = s["root"] / "eval_out"
    results = evaluate.evaluate_models(
        {"teacher": s["teacher"], "other": s["other"]}, eval_cfg=s["eval_cfg"], data_cfg=s["data_cfg"],
        teacher_dir=s["teacher"], val_cache_url=s["cache"], out_dir=str(out), progress=False,
    )
    assert list(results) == ["teacher", "other"]
    for res in results.values():
        for key in evaluate.METRICS:
            assert res[key] is not None and math.isfinite(res[key]), key
        assert 0.0 <= res["exact_match"] <= 1.0 and 0.0 <= res["rouge_l"] <= 1.0
        assert res["perplexity"] > 1.0 and res["num_examples"] == 10
        assert set(res["exact_match_by_task"]) <= {"add", "sort", "count", "reverse", "lookup"}
        assert res["generation_backend"] == "transformers"
    # The teacher against its own cache: KL ~ 0 (fp16 top-k log-probs), same top-1.
    assert results["teacher"]["kl_to_teacher"] < 1e-2
    assert results["teacher"]["top1_agreement"] > 0.95
    assert results["other"]["kl_to_teacher"] > 10 * results["teacher"]["kl_to_teacher"]
    assert (out / "results.json").is_file() and (out / "teacher.generations.jsonl").is_file()


def test_a_model_that_says_the_reference_scores_one(demo_setup, monkeypatch):
    s = demo_setup

    def say_reference(model, tokenizer, rows, data_cfg, **kwargs):
        return [row["response"] for row in rows]

    monkeypatch.setattr(evaluate, "generate_greedy", say_reference)
    cfg = EvalConfig(path=s["eval_cfg"].path, max_new_tokens=4, batch_size=4)
    res = evaluate.evaluate_models({"ref": s["teacher"]}, eval_cfg=cfg, data_cfg=s["data_cfg"],
                                   teacher_dir=s["teacher"], progress=False)["ref"]
    assert res["exact_match"] == 1.0 and res["rouge_l"] == pytest.approx(1.0)
    assert res["kl_to_teacher"] is None and res["top1_agreement"] is None  # no cache given


def test_exact_match_rules():
    cfg = DataConfig()
    demo_row = {"prompt": "Add 1 and 2.", "response": "Answer: 3", "answer": "3", "task": "add"}
    assert evaluate.is_exact_match("Sure! 3 is the answer.", demo_row, cfg)
    assert not evaluate.is_exact_match("Answer: 4", demo_row, cfg)
    assert not evaluate.is_exact_match("3", demo_row, cfg)  # not a valid phrasing
    generic = {"prompt": "hi", "response": " hello there "}
    assert evaluate.is_exact_match("hello there\n", generic, cfg)
    assert not evaluate.is_exact_match("hello", generic, cfg)


def test_batched_generation_matches_one_at_a_time(demo_setup):
    from transformers import AutoTokenizer

    s = demo_setup
    model = evaluate.load_model(s["teacher"])
    tok = AutoTokenizer.from_pretrained(s["teacher"])
    rows = s["rows"][:6]
    batched = evaluate.generate_greedy(model, tok, rows, s["data_cfg"], max_new_tokens=8, batch_size=6)
    single = evaluate.generate_greedy(model, tok, rows, s["data_cfg"], max_new_tokens=8, batch_size=1)
    assert batched == single


def test_generic_data_without_answers(tmp_path, tiny_llama_dir, train_jsonl):
    """Non-demo prompt/response data (pad == EOS tokenizer): whole-response exact match."""
    data_cfg = DataConfig(path=str(train_jsonl), max_seq_len=64)
    cfg = EvalConfig(path=str(train_jsonl), max_examples=6, max_new_tokens=6, batch_size=3)
    res = evaluate.evaluate_models({"m": str(tiny_llama_dir)}, eval_cfg=cfg, data_cfg=data_cfg,
                                   teacher_dir=str(tiny_llama_dir), progress=False)["m"]
    assert res["num_examples"] == 6 and res["exact_match"] == 0.0
    assert math.isfinite(res["perplexity"]) and "exact_match_by_task" not in res


def test_backend_choice():
    assert evaluate.resolve_backend("transformers") == "transformers"
    with pytest.raises(ValueError):
        evaluate.resolve_backend("tensorrt")


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_generation_matches_transformers(demo_setup):
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    s = demo_setup
    tok = AutoTokenizer.from_pretrained(s["teacher"])
    rows = s["rows"][:6]
    via_vllm = evaluate.generate_vllm(s["teacher"], tok, rows, s["data_cfg"], max_new_tokens=8)
    via_hf = evaluate.generate_greedy(evaluate.load_model(s["teacher"]), tok, rows, s["data_cfg"], max_new_tokens=8)
    assert via_vllm == via_hf
