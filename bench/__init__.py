"""Benchmarks, run as scripts. What they share with the tests (tiny models, synthetic caches, the kill
harness, the local S3 server) is tests/support/, which they import; tests/support imports no bench."""
