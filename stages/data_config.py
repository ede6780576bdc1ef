"""DataConfig: the `data:` section of pipeline.yaml (stages/data.py reads it).

Loaded and validated by pipeline/config.py; the stages only read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


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
