"""RoundConfig and GenerateConfig: a student's `rounds:` list in pipeline.yaml (pipeline/rounds.py runs them).

A round names where its training sequences come from:
  data      the dataset's own responses (teacher forcing, as a single-pass student): the run's training cache
  teacher   the teacher's own generations (sequence-level KD, SeqKD)
  student   the student's generations as it stands at the start of the round (on-policy distillation)
Each round trains `steps` optimiser steps from where the previous round ended. `data_fraction` keeps
that share of the prompts with the dataset's response instead of a generated one (GKD's lambda is
1 - data_fraction), chosen per row by a seeded hash, so the mix is the same in every rerun.
Loaded and validated by pipeline/config.py (`check_rounds`); the stages only read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SOURCES = ("data", "teacher", "student")


@dataclass
class GenerateConfig:
    """How a round's sequences are generated (stages/generate/generation.py)."""

    n: int = 1  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64  # also capped so that prompt + response + EOS fit data.max_seq_len
    seed: int = 0  # with the student's seed, the round and the row: each response's seed (generation.py)
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    rows_per_shard: int = 256  # prompts per shard of the rows file (one lease, one commit)
    batch_size: int = 32  # transformers engine: prompts per generate() call
    lease_seconds: float = 120.0


@dataclass
class RoundConfig:
    source: Literal["data", "teacher", "student"] = "data"
    steps: int = 100  # optimiser steps of this round (the student's optim.max_steps is not used)
    data_fraction: float = 0.0  # share of prompts that keep the dataset's response (teacher / student rounds)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


def check_rounds(rounds: list[RoundConfig], where: str, data_kind: str, has_start: bool = True) -> list[str]:
    """Problems with a student's rounds, each naming its key (`students[2].rounds[1].steps: ...`).
    `has_start`: the student starts from trained weights (model or init_from), not a random `init`."""
    problems = []
    if rounds and rounds[0].source == "student" and not has_start:
        problems.append(f"{where}.rounds[0].source: student generations in the first round need a student that "
                        "already speaks the task: set init_from (or model), or start with a data or teacher round")
    for i, r in enumerate(rounds):
        at = f"{where}.rounds[{i}]"
        g = r.generate
        if r.source not in SOURCES:  # the loader checks the Literal; kept for configs built in code
            problems.append(f"{at}.source: {r.source!r} is not one of {', '.join(SOURCES)}")
        if r.steps <= 0:
            problems.append(f"{at}.steps: must be > 0, got {r.steps}")
        if not 0.0 <= r.data_fraction < 1.0:
            problems.append(f"{at}.data_fraction: must be in [0, 1), got {r.data_fraction}")
        if r.source == "data" and r.data_fraction != 0.0:
            problems.append(f"{at}.data_fraction: a `data` round already trains on the dataset's responses; "
                            "leave it at 0")
        if r.source != "data" and data_kind != "prompt_response":
            problems.append(f"{at}.source: generated rounds need data.kind prompt_response (the response field "
                            f"is replaced by the generation), got {data_kind}")
        if g.n < 1 or g.max_new_tokens < 1 or g.rows_per_shard < 1 or g.batch_size < 1:
            problems.append(f"{at}.generate: n, max_new_tokens, rows_per_shard and batch_size must be >= 1")
        if g.temperature <= 0.0:
            problems.append(f"{at}.generate.temperature: must be > 0 (sampling), got {g.temperature}")
        if not 0.0 < g.top_p <= 1.0:
            problems.append(f"{at}.generate.top_p: must be in (0, 1], got {g.top_p}")
    return problems
