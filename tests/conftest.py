"""Shared pytest fixtures. Builders live in tests/support/fixtures.py (plain functions)."""

from __future__ import annotations

import pytest

from tests.support import fixtures


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A saved BPE tokenizer (BOS added, pad == EOS), vocab 512."""
    path = tmp_path_factory.mktemp("tokenizer")
    fixtures.make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    """A random-weight 2-layer Llama (head_dim 64) with its tokenizer, saved with save_pretrained."""
    return fixtures.make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def other_llama_dir(tmp_path_factory, tiny_tokenizer):
    """Same architecture and tokenizer as tiny_llama_dir, other weights (another teacher)."""
    return fixtures.make_tiny_llama(tmp_path_factory.mktemp("other_llama"), tiny_tokenizer, seed=1)


@pytest.fixture(scope="session")
def train_jsonl(tmp_path_factory):
    """40 prompt/response rows as jsonl."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return fixtures.write_jsonl(path, fixtures.prompt_response_rows(40))


@pytest.fixture(scope="session")
def local_s3():
    """A local S3 server (moto, 127.0.0.1) for the session, with bucket `atkd-test`; this process's
    AWS variables point at it (tests/support/s3.py). Integration tier only: it is a subprocess."""
    import os

    from tests.support.s3 import LocalS3

    saved = dict(os.environ)
    with LocalS3() as s3:
        s3.apply_env()
        s3.make_bucket("atkd-test")
        yield s3
    os.environ.clear()
    os.environ.update(saved)
