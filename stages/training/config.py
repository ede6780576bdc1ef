"""OptimConfig: the optimiser and schedule settings of every training run (a student's `optim`,
`teacher.finetune.optim`; the demo teacher builds one from its `demo.teacher_*` settings).

Loaded by pipeline/config.py, which calls `check(where)` (`where`: the section's key path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from stages.errors import ConfigError


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 10
    # Instead of warmup_steps: a fraction of the run's steps (the official ATKD scripts use
    # 0.03), resolved with max_steps (or epochs) when training starts.
    warmup_ratio: Optional[float] = None
    max_steps: int = 100
    # Instead of max_steps: passes over the cache's sequences, resolved to steps when training
    # starts (full global batches of batch_size x grad_accum x ranks per epoch) and logged.
    epochs: Optional[float] = None
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1
    clip_grad_norm: float = 1.0

    def check(self, where: str) -> None:
        if self.batch_size <= 0 or self.grad_accum <= 0 or self.max_steps <= 0:
            raise ConfigError(f"{where}: batch_size, grad_accum and max_steps must be > 0")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{where}.warmup_ratio: must be in [0, 1) (or null to use warmup_steps), "
                              f"got {self.warmup_ratio}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"{where}.epochs: must be > 0 (or null to use max_steps), got {self.epochs}")
