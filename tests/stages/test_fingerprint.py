"""stages.fingerprint: equal inputs agree, any change is seen and described."""

from __future__ import annotations

import copy

import numpy as np

from stages.data import TokenizedExample
from stages.fingerprint import (
    data_fingerprint,
    describe_tokenizer_difference,
    model_fingerprint,
    tokenizer_fingerprint,
    tokenizer_info,
    tokenizer_summary,
)


def test_tokenizer_fingerprint_identical_and_changed(tiny_tokenizer, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert tokenizer_fingerprint(tiny_tokenizer) == tokenizer_fingerprint(again)
    a = tokenizer_info(tiny_tokenizer)
    b = copy.deepcopy(a)
    tok = next(t for t, i in b["vocab"].items() if i == 100)
    other = next(t for t, i in b["vocab"].items() if i == 101)
    b["vocab"][tok], b["vocab"][other] = 101, 100  # swap two ids
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    msg = describe_tokenizer_difference(a, b)
    assert "other ids" in msg and (repr(tok) in msg or repr(other) in msg)
    c = copy.deepcopy(a)
    c["special_ids"]["eos"] = 7
    assert "eos token id 1 vs 7" in describe_tokenizer_difference(a, c)
    assert describe_tokenizer_difference(a, copy.deepcopy(a)) == ""
    # a compact summary (what a cache stores) still explains differences
    assert "token -> id mappings differ" in describe_tokenizer_difference(tokenizer_summary(a), b)
    assert describe_tokenizer_difference(tokenizer_summary(a), a) == ""


def test_data_fingerprint_sees_ids_and_targets():
    ex = [TokenizedExample(0, [1, 2, 3, 4], np.array([1, 2], np.int32))]
    same = [TokenizedExample(0, [1, 2, 3, 4], np.array([1, 2], np.int32))]
    moved = [TokenizedExample(0, [1, 2, 3, 4], np.array([0, 1, 2], np.int32))]
    other_id = [TokenizedExample(0, [1, 2, 3, 5], np.array([1, 2], np.int32))]
    fp = data_fingerprint(ex)
    assert fp == data_fingerprint(same)
    assert fp != data_fingerprint(moved) and fp != data_fingerprint(other_id)


def test_model_fingerprint_sees_weights(tiny_llama_dir, other_llama_dir):
    assert model_fingerprint(str(tiny_llama_dir)) == model_fingerprint(str(tiny_llama_dir))
    assert model_fingerprint(str(tiny_llama_dir)) != model_fingerprint(str(other_llama_dir))
    assert model_fingerprint("org/name-on-hub").startswith("sha256:")
