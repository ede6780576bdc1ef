"""StudentConfig, LossConfig and OptimConfig: one entry of `students:` in pipeline.yaml (stage two).

Loaded and validated by pipeline/config.py; the stages only read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from stages.generate.config import RoundConfig


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


@dataclass
class LossConfig:
    kind: Literal["sft", "kd", "atkd"] = "atkd"
    divergence: Literal["forward_kl", "reverse_kl", "tvd", "js", "skew_kl", "skew_rkl"] = "forward_kl"
    base: Literal["forward_kl", "reverse_kl"] = "forward_kl"  # atkd only
    easy_weight: float = 0.2
    hard_ratio: float = 0.5
    group: Literal["sequence", "batch"] = "sequence"  # atkd split group
    ce_weight: float = 0.0  # mix of cross-entropy on the gold tokens
    renormalize_topk: bool = False
    # Which teacher targets kd/atkd train on: auto = sampled when the cache holds draws
    # (teacher.targets sampled or topk+sampled), else top-k. Sampled: forward KL only.
    targets: Literal["auto", "topk", "sampled"] = "auto"
    # atkd on sampled targets: divide each position's DKD estimate by P(a non-gold draw) =
    # 1 - p_g^n (exactly unbiased, but up to ~1e6x on confident positions: huge gradient
    # variance). Off: E = (1 - p_g^n) DKD, less DKD on near-certain positions (docs/method.md).
    unbiased_dkd: bool = False
    beta: float = 0.5  # js
    alpha: float = 0.1  # skew_kl / skew_rkl
    # Positions per LM-head chunk: peak memory ~ chunk_size x vocab x a few float32
    # temporaries. 256 kept an ATKD step within 0.73x the memory of plain
    # fine-tuning at vocab 32k (bench/student_bench.py); use ~128 for 150k vocabularies.
    chunk_size: int = 256


@dataclass
class StudentConfig:
    name: str = ""
    model: str = ""  # path/hub name of a pretrained student ...
    init: Optional[dict[str, Any]] = None  # ... or a transformers config dict to initialise from
    # Start from another student's final model (trained first, same run): the
    # usual "SFT, then distil" recipe; MiniLLM/DistiLLM-style students start SFT'd.
    init_from: str = ""
    # Where the sequences come from: cache (the teacher cache of stage one), rows (the training
    # rows, tokenised as the reader goes: plain SFT without a teacher; loss.kind sft only), auto
    # (rows for an sft student when the run has no teacher, else cache). See student_data().
    data: Literal["auto", "cache", "rows"] = "auto"
    tokenizer: str = ""  # default: the student's own (model) or the teacher's (init)
    trust_remote_code: bool = False
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on GPU
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    num_workers: int = 0  # DataLoader workers
    fsdp: bool = False
    # Distillation rounds (generate -> cache -> train; pipeline/rounds.py). Empty: one pass over the cache.
    rounds: list[RoundConfig] = field(default_factory=list)


def student_data(student: StudentConfig, has_teacher: bool) -> str:
    """"cache" or "rows": where `student` reads its sequences (its `data` setting; auto: the rows
    for an sft student in a run without a teacher, else the cache)."""
    if student.data != "auto":
        return student.data
    return "rows" if student.loss.kind == "sft" and not has_teacher else "cache"
