"""Evaluation: generation metrics, perplexity, and KL / top-1 against a real validation cache."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from pipeline.config import CacheConfig, DataConfig, EvalConfig, TeacherConfig
from stages.eval import evaluate
from stages.demo.evaluation import DemoAnswer
from stages.demo.task import generate_splits, write_jsonl
from stages.errors import EvalError
from tests.support import fixtures


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
                          max_new_tokens=12, batch_size=4, backend="transformers")  # refusal on: no overlap
    return {"root": root, "data_cfg": data_cfg, "eval_cfg": eval_cfg, "teacher": str(teacher),
            "other": str(other), "cache": str(cache), "rows": splits["test"]}


def test_evaluate_models_returns_finite_metrics(demo_setup):
    s = demo_setup
    out = s["root"] / "eval_out"
    results = evaluate.evaluate_models(
        {"teacher": s["teacher"], "other": s["other"]}, eval_cfg=s["eval_cfg"], data_cfg=s["data_cfg"],
        teacher_dir=s["teacher"], val_cache_url=s["cache"], out_dir=str(out), answer_rule=DemoAnswer(),
        progress=False,
    )
    assert list(results) == ["teacher", "other"]
    for res in results.values():
        for key in evaluate.METRICS:
            assert res[key] is not None and math.isfinite(res[key]), key
        assert 0.0 <= res["exact_match"] <= 1.0 and 0.0 <= res["rouge_l"] <= 1.0
        assert res["perplexity"] > 1.0 and res["num_examples"] == 10
        assert set(res["exact_match_by_task"]) <= {"add", "sort", "count", "reverse", "lookup"}
        assert res["generation_backend"] == "transformers"
        assert 0.0 <= res["ece"] <= 1.0 and res["answer_rule"] == DemoAnswer.description
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
    demo, exact = DemoAnswer(), evaluate.ExactResponse(DataConfig())
    demo_row = {"prompt": "Add 1 and 2.", "response": "Answer: 3", "answer": "3", "task": "add"}
    assert demo.score(demo_row, "Sure! 3 is the answer.") and demo.group(demo_row) == "add"
    assert not demo.score(demo_row, "Answer: 4")
    assert not demo.score(demo_row, "3")  # not a valid phrasing
    assert not exact.score(demo_row, "Sure! 3 is the answer.")  # the default rule knows no phrasing
    generic = {"prompt": "hi", "response": " hello there "}
    assert exact.score(generic, "hello there\n")
    assert not exact.score(generic, "hello")
    with pytest.raises(EvalError, match="answer_rule=exact"):
        demo.score(generic, "hello there")
    assert isinstance(demo, evaluate.AnswerRule) and isinstance(exact, evaluate.AnswerRule)


def test_breakdown_only_when_every_row_has_a_group():
    class ByFirstWord:
        description = "first word"

        def score(self, row, text):
            return text == row["response"]

        def group(self, row):
            return row["prompt"].split()[0] if row["prompt"] else None

    rows = [{"prompt": "a x", "response": "1"}, {"prompt": "b y", "response": "2"}, {"prompt": "a z", "response": "3"}]
    rule = ByFirstWord()
    assert evaluate.exact_match_by_group(rule, rows, [True, False, False]) == {"a": 0.5, "b": 0.0}
    assert evaluate.exact_match_by_group(rule, rows + [{"prompt": "", "response": ""}], [True] * 4) is None
    assert evaluate.exact_match_by_group(evaluate.ExactResponse(DataConfig()), rows, [True] * 3) is None


# ---------------------------------------------------------------- calibration


def reference_ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE by the textbook loop, float64: bins (lo, hi], sum over bins of |B|/n |acc(B) - conf(B)|."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return ece


def _ece(confidence, correct) -> float:
    sums = evaluate.calibration_bins(torch.tensor(confidence, dtype=torch.float64), torch.tensor(correct))
    return evaluate.expected_calibration_error(sums)


def test_ece_hand_computed():
    # Perfectly calibrated: 80% sure and right 8 times in 10, 30% sure and right 3 in 10.
    conf = [0.8] * 10 + [0.3] * 10
    hit = [True] * 8 + [False] * 2 + [True] * 3 + [False] * 7
    assert _ece(conf, hit) == pytest.approx(0.0, abs=1e-12)
    assert reference_ece(conf, hit) == pytest.approx(0.0, abs=1e-12)
    # Over-confident: 95% sure, right half the time -> |0.5 - 0.95| = 0.45.
    conf, hit = [0.95] * 8, [True, False] * 4
    assert _ece(conf, hit) == pytest.approx(0.45) == reference_ece(conf, hit)
    # Two bins by hand: 4 at 0.9 (3 right: gap 0.15), 2 at 0.5 (both right: gap 0.5) -> 4/6*.15 + 2/6*.5.
    conf, hit = [0.9] * 4 + [0.5] * 2, [True, True, True, False, True, True]
    assert _ece(conf, hit) == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.5)
    # Edges: 1/15 and 2/15 fall in bins 0 and 1 (upper edge inclusive), so no pooling into one bin.
    conf, hit = [1 / 15, 2 / 15], [True, False]
    assert _ece(conf, hit) == pytest.approx(reference_ece(conf, hit)) == pytest.approx((1 - 1 / 15 + 2 / 15) / 2)
    assert evaluate.expected_calibration_error(torch.zeros(15, 3, dtype=torch.float64)) is None


def test_ece_matches_reference_and_adds_over_batches():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.01, 1.0, 1000)
    hit = rng.uniform(size=1000) < conf ** 2  # over-confident
    whole = _ece(conf, hit)
    assert whole == pytest.approx(reference_ece(conf, hit), rel=1e-12) and whole > 0.1
    halves = sum(evaluate.calibration_bins(torch.tensor(c), torch.tensor(h))
                 for c, h in ((conf[:300], hit[:300]), (conf[300:], hit[300:])))
    assert evaluate.expected_calibration_error(halves) == pytest.approx(whole, rel=1e-12)


def test_teacher_agreement_ece_is_the_models_own_calibration(demo_setup):
    """ECE from teacher_agreement equals the textbook ECE of the model's softmax on the cache positions."""
    from stages.lm import pad_id, target_logits
    from storage.dataset import collate_sequences

    s = demo_setup
    model = evaluate.load_model(s["other"])
    tok = evaluate.load_tokenizer(s["other"], s["teacher"])
    records = evaluate.read_cache_records(s["cache"])
    got = evaluate.teacher_agreement(model, records, pad_id(tok), batch_size=3)
    batch = collate_sequences(records, pad_id(tok))
    with torch.no_grad():
        logits = target_logits(model, batch["input_ids"], batch["attention_mask"], batch["row_batch"],
                               batch["row_pos"]).double()
    probs = torch.softmax(logits, dim=-1).numpy()
    conf, top1 = probs.max(axis=1), probs.argmax(axis=1)
    assert got["kl_positions"] == len(conf)
    assert got["ece"] == pytest.approx(reference_ece(conf, top1 == batch["target_ids"].numpy()), abs=1e-5)


def test_batched_generation_matches_one_at_a_time(demo_setup):
    from transformers import AutoTokenizer

    s = demo_setup
    model = evaluate.load_model(s["teacher"])
    tok = AutoTokenizer.from_pretrained(s["teacher"])
    rows = s["rows"][:6]
    batched = evaluate.generate_greedy(model, tok, rows, s["data_cfg"], max_new_tokens=8, batch_size=6)
    single = evaluate.generate_greedy(model, tok, rows, s["data_cfg"], max_new_tokens=8, batch_size=1)
    assert batched == single


def test_generic_data_needs_no_demo(tmp_path, tiny_llama_dir, train_jsonl, monkeypatch):
    """Non-demo prompt/response data: every metric, with no demo module importable."""
    from stages.teacher.capture import run_capture

    data_cfg = DataConfig(path=str(train_jsonl), max_seq_len=64)
    cache = tmp_path / "val_cache"
    run_capture(data_cfg, TeacherConfig(model=str(tiny_llama_dir), backend="transformers", top_k=8),
                CacheConfig(path=str(cache), sequences_per_shard=8), progress=False)
    for name in [m for m in sys.modules if m == "stages.demo" or m.startswith("stages.demo.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import stages.demo...` now raises ImportError
    monkeypatch.setitem(sys.modules, "stages.demo", None)
    with pytest.raises(ImportError):
        import stages.demo.task  # noqa: F401
    # Evaluating on the training rows is refused unless allowed (tests/stages/eval/test_overlap.py); here it is.
    cfg = EvalConfig(path=str(train_jsonl), max_examples=6, max_new_tokens=6, batch_size=3, allow_train_overlap=True)
    res = evaluate.evaluate_models({"m": str(tiny_llama_dir)}, eval_cfg=cfg, data_cfg=data_cfg,
                                   teacher_dir=str(tiny_llama_dir), val_cache_url=str(cache), progress=False)["m"]
    assert res["num_examples"] == 6 and res["exact_match"] == 0.0 and res["train_overlap"] == 6
    assert res["answer_rule"] == evaluate.ExactResponse.description
    for key in evaluate.METRICS:
        assert res[key] is not None and math.isfinite(res[key]), key
    assert 0.0 <= res["rouge_l"] <= 1.0 and 0.0 <= res["ece"] <= 1.0
    assert res["kl_to_teacher"] < 1e-2 and res["top1_agreement"] > 0.95  # the teacher against its own cache
    assert "exact_match_by_task" not in res


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
