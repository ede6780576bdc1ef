"""Tiny, hub-free models, tokenizers and data files for tests: the builders live in
bench/_harness.py (the benchmarks use them too, and bench/ does not import tests/).
Functions only; the session-scoped pytest fixtures that call them live in tests/conftest.py."""

from bench._harness import generated_text, make_tiny_llama, make_tokenizer, prompt_response_rows, write_jsonl

__all__ = ["generated_text", "make_tiny_llama", "make_tokenizer", "prompt_response_rows", "write_jsonl"]
