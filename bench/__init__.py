"""Benchmarks (run as scripts) and bench/_harness.py, the builders and kill harness that tests/ import too."""
