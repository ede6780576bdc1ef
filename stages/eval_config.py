"""EvalConfig: the `eval:` section of pipeline.yaml (stages/evaluate.py reads it).

Loaded and validated by pipeline/config.py; the stages only read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class EvalConfig:
    path: str = ""  # held-out data (same fields as `data`); empty: skip generation metrics
    split: str = "test"
    validation_path: str = ""  # data to cache for KL / top-1 agreement; empty: use a slice of `path`
    max_examples: int = 200
    max_new_tokens: int = 64
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    batch_size: int = 32
    # What counts as an exact match: "exact" = the whole response after strip (any data), "demo" =
    # the demo's answer inside any phrasing, per task (stages.demo.evaluation). "auto" (the default)
    # is resolved when the config is loaded: "demo" with demo.enabled, else "exact".
    answer_rule: Literal["auto", "exact", "demo"] = "auto"
