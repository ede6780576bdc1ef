"""StudentConfig and LossConfig: one entry of `students:` in pipeline.yaml (stage two).

Loaded by pipeline/config.py, which calls `StudentConfig.check(where)` (the student's own
rules and its loss's and optim's); rules that join sections (a student against the teacher, the
students against each other) stay in pipeline/config.py.

ATKD's weights have one range, `weight_problems`: the config check and
stages.student.losses.atkd_position_weights both ask it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from stages.errors import ConfigError, check_name
from stages.rounds_config import RoundConfig
from stages.training.config import OptimConfig


def weight_problems(*, easy_weight: float, hard_ratio: float, ce_weight: float) -> list[str]:
    """`key: must be ..., got x` for each loss weight outside its range (none: all fine)."""
    problems = []
    for key, value in (("easy_weight", easy_weight), ("hard_ratio", hard_ratio)):
        if not 0.0 <= value <= 1.0:
            problems.append(f"{key}: must be in [0, 1], got {value}")
    if ce_weight < 0.0:
        problems.append(f"ce_weight: must be >= 0, got {ce_weight}")
    return problems


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
    # The top-k entries per position kd/atkd train on: the first top_k of the cache's rows
    # (at most teacher.top_k, what stage one caches). null: all of them, the cache's k.
    top_k: Optional[int] = None

    def check(self, where: str) -> None:
        """`where`: the loss section's key path (students[i].loss)."""
        for problem in weight_problems(easy_weight=self.easy_weight, hard_ratio=self.hard_ratio,
                                       ce_weight=self.ce_weight):
            raise ConfigError(f"{where}.{problem}")
        for key in ("beta", "alpha"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"{where}.{key}: must be in (0, 1), got {getattr(self, key)}")
        if self.chunk_size <= 0:
            raise ConfigError(f"{where}.chunk_size: must be > 0, got {self.chunk_size}")
        if self.top_k is not None and self.top_k <= 0:
            raise ConfigError(f"{where}.top_k: must be > 0 (or null: the cache's top-k), got {self.top_k}")


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

    def check(self, where: str) -> None:
        """`where`: students[i]. The student's own fields, its loss and its optim."""
        if not self.name:
            raise ConfigError(f"{where}.name: every student needs a name")
        check_name(self.name, f"{where}.name")
        sources = [k for k, v in (("model", self.model), ("init", self.init), ("init_from", self.init_from)) if v]
        if len(sources) != 1:
            raise ConfigError(f"{where} ({self.name}): set exactly one of `model` (path or hub name), `init` "
                              f"(a model config) or `init_from` (an earlier student's name); got "
                              f"{', '.join(sources) or 'none'}")
        self.loss.check(f"{where}.loss")
        self.optim.check(f"{where}.optim")
        if self.checkpoint_every <= 0:
            raise ConfigError(f"{where}.checkpoint_every: must be > 0")


def student_data(student: StudentConfig, has_teacher: bool) -> str:
    """"cache" or "rows": where `student` reads its sequences (its `data` setting; auto: the rows
    for an sft student in a run without a teacher, else the cache)."""
    if student.data != "auto":
        return student.data
    return "rows" if student.loss.kind == "sft" and not has_teacher else "cache"
