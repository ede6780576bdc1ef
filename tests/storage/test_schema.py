"""ShardData packing and the format v1 validation rules."""

from __future__ import annotations

import numpy as np
import pytest

from storage.schema import ARRAY_DTYPES, ShardData
from tests.support.synthetic import VOCAB, random_sequence, random_shard


def test_from_sequences_round_trip():
    rng = np.random.default_rng(0)
    records = [random_sequence(rng, i) for i in range(6)]
    data = ShardData.from_sequences(records)
    assert data.validate(vocab_size=VOCAB) == []
    assert {n: str(a.dtype) for n, a in data.arrays().items()} == ARRAY_DTYPES
    for a, b in zip(records, data.sequences()):
        assert a.example_id == b.example_id
        for name in ("input_ids", "target_positions", "topk_ids", "topk_logprobs", "target_logprobs"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert ShardData.from_sequences(list(data.sequences())).equals(data)


def test_empty_shard_is_valid():
    data = ShardData.from_sequences([], top_k=4)
    assert data.validate() == [] and data.num_sequences == 0 and data.top_k == 4
    with pytest.raises(ValueError, match="top_k"):
        ShardData.from_sequences([])


def _break(data: ShardData, how: str) -> None:
    if how == "dtype":
        data.topk_logprobs = data.topk_logprobs.astype(np.float32)
    elif how == "offsets":
        data.seq_offsets[1], data.seq_offsets[2] = data.seq_offsets[2], data.seq_offsets[1]
    elif how == "shape":
        data.target_logprobs = data.target_logprobs[:-1]
    elif how == "nan":
        data.topk_logprobs[0, 0] = np.nan
    elif how == "positive":
        data.target_logprobs[0] = 0.5
    elif how == "ascending":
        data.topk_logprobs[0] = np.sort(data.topk_logprobs[0])  # ascending
    elif how == "vocab":
        data.topk_ids[0, 0] = VOCAB
    elif how == "position":
        data.target_positions[data.target_offsets[1] - 1] = 999
    elif how == "repeat":
        data.topk_ids[0, 1] = data.topk_ids[0, 0]
    elif how == "gold":
        gold = data.input_ids[data.target_positions[0] + 1]
        data.topk_ids[0, 0] = gold
        data.topk_ids[0, 1:][data.topk_ids[0, 1:] == gold] = (gold + 1) % VOCAB
        data.target_logprobs[0] = data.topk_logprobs[0, 0] - 3.0


@pytest.mark.parametrize("how, words", [
    ("dtype", "float16"), ("offsets", "seq_offsets"), ("shape", "target_logprobs: shape"),
    ("nan", "non-finite"), ("positive", "<= 0"), ("ascending", "descending"), ("vocab", "ids must be in"),
    ("position", "target_positions"), ("repeat", "repeat a token"), ("gold", "gold token"),
])
def test_validate_names_the_problem(how, words):
    rng = np.random.default_rng(1)
    while True:  # need a first sequence with several targets
        data = random_shard(rng, 4)
        if data.target_offsets[1] >= 2:
            break
    _break(data, how)
    problems = data.validate(vocab_size=VOCAB)
    assert any(words in p for p in problems), problems
