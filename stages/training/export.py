"""A trained model as others load it (a student, the teacher fine-tune): `final/` (save_pretrained +
tokenizer) and done.json.

The exported tokenizer carries the chat template the training data was
rendered with (for `messages` data), so `tokenizer.apply_chat_template` on
the exported model produces the same text the student learned from. Every
file gets the usual umask-respecting mode (safetensors writes 0600).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from stages.training import checkpoint as ckpt
from storage.files import atomic_write

log = logging.getLogger(__name__)


def training_chat_template(identity: dict) -> str | None:
    """The chat template stage one rendered `messages` data with (recorded in the cache identity)."""
    if identity.get("data_kind") != "messages":
        return None
    return identity.get("chat_template") or None


def save_final(out: Path, student, tokenizer, state: dict[str, torch.Tensor], *,
               chat_template: str | None = None) -> Path:
    """save_pretrained (safetensors) + tokenizer into final/, via a temporary directory."""
    final = out / "final"
    tmp = out / f".final.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    if chat_template is not None:
        own = getattr(tokenizer, "chat_template", None)
        if own and own != chat_template:
            log.warning("the student's tokenizer has another chat template than the one its training data was "
                        "rendered with; the exported tokenizer gets the training one")
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(tmp)
    ckpt.usual_permissions(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True))
