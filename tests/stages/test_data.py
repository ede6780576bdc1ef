"""stages.data: loading, templating, loss-mask boundaries, bad and over-long rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import DataConfig
from stages.data import (
    DataError,
    load_rows,
    prompt_ids,
    reference_response,
    render_prompt,
    special_prefix,
    tokenize_examples,
)
from tests.support.fixtures import write_jsonl

ROWS = [
    {"prompt": "what is two plus two", "response": " four"},
    {"prompt": "tell me a cat", "response": " the big red cat runs fast"},
]


def cfg(**kw) -> DataConfig:
    return DataConfig(path=kw.pop("path", "unused.jsonl"), **kw)


def trained_tokens(ex) -> list[int]:
    return [ex.input_ids[t + 1] for t in ex.target_positions]


# ---------------------------------------------------------------- prompt_response


def test_mask_boundaries_prompt_response(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the pitfall this guards against
    examples, stats = tokenize_examples(ROWS, tok, cfg())
    assert stats.examples == 2 and stats.skipped_bad == 0
    for row, ex in zip(ROWS, examples):
        prefix = special_prefix(tok)
        assert prefix == [tok.bos_token_id] and ex.input_ids[0] == tok.bos_token_id
        prompt = prefix + tok(cfg().template.replace("{prompt}", row["prompt"]), add_special_tokens=False)["input_ids"]
        response = tok(row["response"], add_special_tokens=False)["input_ids"]
        assert ex.input_ids == prompt + response + [tok.eos_token_id]
        # first target predicts the first response token from the last prompt token
        assert ex.target_positions[0] == len(prompt) - 1
        assert ex.input_ids[ex.target_positions[0] + 1] == response[0]
        # EOS is a target (even though pad == EOS), and it is the last one
        assert ex.target_positions[-1] == len(ex.input_ids) - 2
        assert ex.input_ids[-1] == tok.eos_token_id
        # no prompt token is a target; targets are contiguous
        assert trained_tokens(ex) == response + [tok.eos_token_id]
        assert ex.target_positions.dtype == np.int32
        assert np.all(np.diff(ex.target_positions) == 1)
        # generation prompt = the training prompt, token for token
        assert prompt_ids(row, tok, cfg()) == prompt
        assert render_prompt(row, cfg()) == cfg().template.replace("{prompt}", row["prompt"])
        assert reference_response(row, cfg()) == row["response"]


def test_template_with_braces_and_example_ids(tiny_tokenizer):
    c = cfg(template='{"q": "{prompt}"} ->')
    examples, _ = tokenize_examples(ROWS, tiny_tokenizer, c)
    assert [e.example_id for e in examples] == [0, 1]
    assert render_prompt(ROWS[0], c) == '{"q": "what is two plus two"} ->'


# ---------------------------------------------------------------- over-long


def test_overlong_truncate_keeps_prefix_and_counts(tiny_tokenizer):
    full, _ = tokenize_examples(ROWS, tiny_tokenizer, cfg())
    n1 = len(full[1].input_ids)
    limit = full[1].target_positions[0] + 3  # two response tokens fit
    examples, stats = tokenize_examples(ROWS, tiny_tokenizer, cfg(max_seq_len=int(limit), overlong="truncate"))
    cut = [e for e in examples if e.example_id == 1][0]
    assert n1 > limit and len(cut.input_ids) == limit
    assert cut.input_ids == full[1].input_ids[:limit]
    assert cut.target_positions.tolist() == full[1].target_positions[:2].tolist()
    assert stats.truncated >= 1


def test_overlong_truncate_without_targets_is_skipped(tiny_tokenizer):
    full, _ = tokenize_examples(ROWS, tiny_tokenizer, cfg())
    limit = int(full[1].target_positions[0]) + 1  # prompt only: nothing left to train
    short = {"prompt": "a", "response": " b"}
    examples, stats = tokenize_examples([ROWS[1], short], tiny_tokenizer, cfg(max_seq_len=limit))
    assert [e.example_id for e in examples] == [1]
    assert stats.skipped_overlong == 1 and "no trained target" in stats.reasons[0]


def test_overlong_skip_counts(tiny_tokenizer):
    full, _ = tokenize_examples(ROWS, tiny_tokenizer, cfg())
    limit = len(full[0].input_ids)
    examples, stats = tokenize_examples(ROWS, tiny_tokenizer, cfg(max_seq_len=limit, overlong="skip"))
    assert [e.example_id for e in examples] == [0]
    assert stats.skipped_overlong == 1 and stats.truncated == 0


# ---------------------------------------------------------------- bad rows / empty


@pytest.mark.parametrize(
    "bad, field, words",
    [
        ({"prompt": "x"}, "response", "missing"),
        ({"prompt": "x", "response": None}, "response", "missing"),
        ({"prompt": 7, "response": "y"}, "prompt", "must be a string"),
        ({"prompt": "x", "response": ""}, "response", "tokenises to nothing"),
    ],
)
def test_bad_row_error_names_row_and_field(tiny_tokenizer, bad, field, words):
    rows = [ROWS[0], ROWS[1], bad]
    with pytest.raises(DataError) as e:
        tokenize_examples(rows, tiny_tokenizer, cfg())
    assert "row 2" in str(e.value) and repr(field) in str(e.value) and words in str(e.value)


def test_bad_rows_skip_counts(tiny_tokenizer):
    rows = [ROWS[0], {"prompt": "x"}, ROWS[1], {"prompt": 3, "response": "y"}]
    examples, stats = tokenize_examples(rows, tiny_tokenizer, cfg(bad_rows="skip"))
    assert [e.example_id for e in examples] == [0, 2]
    assert stats.skipped_bad == 2 and stats.rows == 4
    assert "row 1" in stats.reasons[0] and "row 3" in stats.reasons[1]


def test_empty_dataset_and_nothing_left_are_errors(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match="no rows"):
        tokenize_examples([], tiny_tokenizer, cfg())
    with pytest.raises(DataError, match="no usable examples"):
        tokenize_examples([{"prompt": "x"}], tiny_tokenizer, cfg(bad_rows="skip"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError):
        tokenize_examples(load_rows(cfg(path=str(empty))), tiny_tokenizer, cfg(path=str(empty)))


# ---------------------------------------------------------------- loading


def test_load_jsonl_json_parquet_and_limit(tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "response": f" r{i}"} for i in range(5)]
    jl = write_jsonl(tmp_path / "a.jsonl", rows)
    js = tmp_path / "b.json"
    js.write_text(json.dumps(rows))
    pq = tmp_path / "c.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    for path in (jl, js, pq):
        assert load_rows(cfg(path=str(path))) == rows
    assert load_rows(cfg(path=str(jl), limit=2)) == rows[:2]
    assert load_rows(cfg(path="other.jsonl"), path=str(pq)) == rows
    pq_dir = tmp_path / "dir"
    pq_dir.mkdir()
    datasets.Dataset.from_list(rows[:2]).to_parquet(str(pq_dir / "0.parquet"))
    datasets.Dataset.from_list(rows[2:]).to_parquet(str(pq_dir / "1.parquet"))
    assert load_rows(cfg(path=str(pq_dir))) == rows


def test_load_mixed_types_still_reaches_row_validation(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "a", "response": " b"}, {"prompt": 5, "response": " c"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    loaded = load_rows(cfg(path=str(path)))
    with pytest.raises(DataError, match=r"row 1: field 'prompt' must be a string"):
        tokenize_examples(loaded, tiny_tokenizer, cfg())


def test_missing_file_is_clear():
    with pytest.raises(DataError, match="not found"):
        load_rows(cfg(path="/nonexistent/train.jsonl"))


# ---------------------------------------------------------------- messages / text

CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is red"},
        {"role": "assistant", "content": "a colour"},
        {"role": "user", "content": "and blue"},
        {"role": "assistant", "content": "also one"},
    ]
}


def test_messages_builtin_template_trains_assistant_turns(tiny_tokenizer):
    tok = tiny_tokenizer
    c = cfg(kind="messages")
    (ex,), _ = tokenize_examples([CHAT], tok, c)
    assert ex.input_ids[0] == tok.bos_token_id
    # trained tokens = the two assistant turns, each closed by EOS
    trained = tok.decode(trained_tokens(ex))
    assert trained == "a colour</s>also one</s>"
    # the token before each assistant turn (end of "### Assistant:\n") is a target position, nothing of the user turns
    text = tok.decode(ex.input_ids)
    assert text.count("### Assistant:\n") == 2 and "be brief" in text
    # eval prompt = training sequence up to the last assistant turn
    p = prompt_ids(CHAT, tok, c)
    last_turn_start = [t for t in ex.target_positions if t + 1 < len(ex.input_ids)][0]
    assert ex.input_ids[: len(p)] == p
    assert tok.decode(ex.input_ids[len(p) :]) == "also one</s>"
    assert render_prompt(CHAT, c, tok).endswith("### Assistant:\n")
    assert reference_response(CHAT, c) == "also one"
    assert last_turn_start >= 0


def test_messages_with_tokenizer_chat_template(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ '<s>' + m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}"
    )
    (ex,), _ = tokenize_examples([CHAT], tok, cfg(kind="messages"))
    assert tok.decode(trained_tokens(ex)) == "a colour</s>also one</s>"


def test_messages_bad_rows(tiny_tokenizer):
    c = cfg(kind="messages")
    with pytest.raises(DataError, match=r"row 0: field 'messages' has no assistant turn"):
        tokenize_examples([{"messages": [{"role": "user", "content": "hi"}]}], tiny_tokenizer, c)
    with pytest.raises(DataError, match=r"row 0: field 'messages'\[0\]"):
        tokenize_examples([{"messages": [{"role": "user"}]}], tiny_tokenizer, c)


def test_text_kind_trains_everything_after_first(tiny_tokenizer):
    tok = tiny_tokenizer
    (ex,), _ = tokenize_examples([{"text": "the cat runs"}], tok, cfg(kind="text"))
    body = tok("the cat runs", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == [tok.bos_token_id] + body + [tok.eos_token_id]
    assert ex.target_positions.tolist() == list(range(len(ex.input_ids) - 1))
    with pytest.raises(DataError, match="row 0: field 'text'"):
        tokenize_examples([{"text": 3}], tok, cfg(kind="text"))
