"""DemoConfig: the `demo:` section of pipeline.yaml (stages/demo/teacher.py reads it).

Loaded by pipeline/config.py, which calls `check()`: each section checks its own values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stages.errors import ConfigError


@dataclass
class DemoConfig:
    """The embedded demo task (issue: `atkd run` works with no download)."""

    enabled: bool = False
    # Where data/, tokenizer/ and teacher/ are built; empty: run_dir. Many runs (`atkd sweep`'s
    # seeds) can point at one build.
    dir: str = ""
    seed: int = 0
    train_examples: int = 4000
    validation_examples: int = 300
    test_examples: int = 300
    vocab_size: int = 512
    teacher: dict[str, Any] = field(default_factory=dict)  # LlamaConfig overrides
    teacher_steps: int = 600
    teacher_batch_size: int = 32
    teacher_lr: float = 1e-3  # 3e-3 stalled at loss ~1.0 on the demo task
    # The teacher's own training pool (data/teacher.jsonl), prompts disjoint from the
    # students' three splits; 0 = the teacher trains on the students' train split.
    teacher_train_examples: int = 0

    def check(self) -> None:
        if self.teacher_train_examples < 0:
            raise ConfigError(f"demo.teacher_train_examples: must be >= 0 (0 = the teacher trains on the "
                              f"students' train split), got {self.teacher_train_examples}")
