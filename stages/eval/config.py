"""EvalConfig: the `eval:` section of pipeline.yaml (stages/eval/evaluate.py reads it).

Loaded by pipeline/config.py, which calls `check()`: each section checks its own values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stages.errors import ConfigError
from stages.eval.lm_harness import LmEvalConfig
from stages.eval.sets import EvalSetConfig


@dataclass
class EvalConfig:
    # Held-out data (same fields as `data`); empty: skip generation metrics, or with data.holdout
    # its test part (eval.path naming the training data also means the test part).
    path: str = ""
    split: str = "test"
    # Data to cache for KL / top-1 agreement / ECE; empty: none, or with data.holdout its validation part.
    validation_path: str = ""
    validation_cache: str = ""  # where stage one caches the validation data; empty: <run_dir>/cache-val
    max_examples: int = 200
    max_new_tokens: int = 64
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    batch_size: int = 32
    # What counts as an exact match: "exact" = the whole response after strip (any data), "demo" =
    # the demo's answer inside any phrasing, per task (stages.demo.evaluation). "auto" (the default)
    # is resolved when the config is loaded: "demo" with demo.enabled, else "exact".
    answer_rule: Literal["auto", "exact", "demo"] = "auto"
    # Evaluation rows with the same content as a training row (stages/eval/overlap.py) are refused; true:
    # evaluate anyway with a loud warning, the count in results.json (train_overlap). The demo's
    # evaluation rows are disjoint from its training rows by construction (stages/demo/task.py).
    allow_train_overlap: bool = False
    # More held-out sets, each with its own generation metrics and report table (stages/eval/sets.py).
    sets: dict[str, EvalSetConfig] = field(default_factory=dict)
    # Benchmarks through lm-evaluation-harness, per model (stages/eval/lm_harness.py).
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)

    def check(self) -> None:
        for key in ("max_new_tokens", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"eval.{key}: must be > 0, got {getattr(self, key)}")
