"""DataConfig: the `data:` section of pipeline.yaml (stages/data.py reads it).

Loaded by pipeline/config.py, which calls `check()`: each section checks its own values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from stages.errors import ConfigError, did_you_mean


@dataclass
class HoldoutConfig:
    """`data.holdout`: a deterministic train / validation / test split of the data (stages/split.py)."""

    validation: Union[int, float] = 0  # a row count (int) or a fraction of the rows in [0, 1) (float)
    test: Union[int, float] = 0
    seed: int = 0
    # The part this data section reads. Leave it "train": the pipeline reads validation (the
    # validation cache) and test (evaluation) itself.
    part: Literal["train", "validation", "test"] = "train"

    def check(self) -> None:
        for key in ("validation", "test"):
            value = getattr(self, key)
            if value < 0 or (isinstance(value, float) and value >= 1.0):
                raise ConfigError(f"data.holdout.{key}: a row count (whole number >= 0) or a fraction in [0, 1), "
                                  f"got {value!r}")
        if self.part != "train":
            raise ConfigError(f"data.holdout.part: the pipeline trains on the train part (it reads validation and "
                              f"test itself), got {self.part!r}")


@dataclass
class DataConfig:
    """Where the training data is and how rows become token sequences."""

    path: str = ""  # a .jsonl/.json/.parquet file, a directory of them, or a hub name
    format: Literal["auto", "jsonl", "json", "parquet", "hub"] = "auto"
    split: str = "train"
    kind: Literal["prompt_response", "messages", "text"] = "prompt_response"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    text_field: str = "text"
    # The prompt template; `{prompt}` is replaced by the row's prompt. The
    # response follows it directly and is closed by the tokenizer's EOS.
    template: str = "### Instruction:\n{prompt}\n\n### Response:\n"
    # More row fields the template may name as {field} (Dolly: instruction, context); a part
    # in [[ ... ]] that names a field disappears when the field is empty (stages/template.py).
    template_fields: list[str] = field(default_factory=list)
    max_seq_len: int = 512
    overlong: Literal["truncate", "skip"] = "truncate"
    bad_rows: Literal["error", "skip"] = "error"
    # Stage one fails when a shard drops (skips as over-long or bad) a larger share of its rows.
    max_dropped_fraction: float = 0.1
    limit: Optional[int] = None  # use only the first N rows (quick runs)
    # A held-out split of these rows (absent: every row trains; eval.path/validation_path say where
    # evaluation reads). With it, stage one caches the train part only, the validation cache holds
    # the validation part and evaluation the test part, unless eval.* name other data.
    holdout: Optional[HoldoutConfig] = None

    def check(self) -> None:
        if not self.path:
            raise ConfigError("data.path: set the training data (a .jsonl/.json/.parquet file or a hub name)")
        if self.max_seq_len < 2:
            raise ConfigError(f"data.max_seq_len: must be >= 2, got {self.max_seq_len}")
        if not 0.0 <= self.max_dropped_fraction <= 1.0:
            raise ConfigError(f"data.max_dropped_fraction: must be in [0, 1], got {self.max_dropped_fraction}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit: must be >= 1 (or null for all rows), got {self.limit}")
        if self.holdout is not None:
            self.holdout.check()
        if self.kind == "prompt_response":
            from stages.template import template_names, unknown_placeholders, used_names

            names = template_names(self)
            unknown = unknown_placeholders(self.template, names)
            if unknown:
                known = ", ".join("{" + n + "}" for n in names)
                raise ConfigError(f"data.template: {{{unknown[0]}}} names no field"
                                  f"{did_you_mean(unknown[0], list(names))}; the template can use {known} (add a "
                                  f"row field to data.template_fields to use it; write {{{{{unknown[0]}}}}} for a "
                                  f"literal {{{unknown[0]}}})")
            if not used_names(self.template, names):
                raise ConfigError("data.template: must contain {prompt} or one of data.template_fields as {name}")
