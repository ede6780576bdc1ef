"""Tiny, hub-free models, tokenizers and data files for tests: the builders live in
tests/support/harness.py (the benchmarks use them too). Functions only; the session-scoped
pytest fixtures that call them live in tests/conftest.py."""

from tests.support.harness import generated_text, make_tiny_llama, make_tokenizer, prompt_response_rows, write_jsonl

__all__ = ["atkd_here", "generated_text", "make_tiny_llama", "make_tokenizer", "prompt_response_rows", "write_jsonl"]


def atkd_here(capsys, *args: str) -> tuple[int, str]:
    """The CLI (cli.main) in this process: (exit code, stderr + stdout; `verify` reports on stdout)."""
    from pipeline import cli

    capsys.readouterr()
    rc = cli.main(list(args))
    captured = capsys.readouterr()
    return rc, captured.err + captured.out
