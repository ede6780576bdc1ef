"""DataConfig: the `data:` section of pipeline.yaml (stages/data.py reads it).

Loaded and validated by pipeline/config.py; the stages only read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


@dataclass
class HoldoutConfig:
    """`data.holdout`: a deterministic train / validation / test split of the data (stages/split.py)."""

    validation: Union[int, float] = 0  # a row count (int) or a fraction of the rows in [0, 1) (float)
    test: Union[int, float] = 0
    seed: int = 0
    # The part this data section reads. Leave it "train": the pipeline reads validation (the
    # validation cache) and test (evaluation) itself.
    part: Literal["train", "validation", "test"] = "train"


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
