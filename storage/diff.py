"""What differs between two records (a cache identity, a fine-tune record, a student's training
record), as one short `key: old -> new` line per differing key.

Nested mappings are flattened to dotted keys (`holdout.seed: 1 -> 2`), so a
refusal names the one setting that changed instead of printing two whole
dicts. Values are shown as JSON, cut to a few dozen characters; when two long
strings share a beginning (hashes, templates), both are shown from a little
before their first differing character.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

ABSENT = "<absent>"
WIDTH = 48  # characters shown per value


def flatten(record: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": 0.001, ...}: nested dicts become dotted keys; lists and scalars are leaves."""
    if not isinstance(record, dict) or (prefix and not record):
        return {prefix: record}
    out: dict[str, Any] = {}
    for key, value in record.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _text(value: Any) -> str:
    return value if value is ABSENT else json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


def _cut(text: str, start: int) -> str:
    piece = text[start:start + WIDTH]
    return ("…" if start else "") + piece + ("…" if start + WIDTH < len(text) else "")


def show_change(old: Any, new: Any) -> str:
    """`old -> new`, each cut to WIDTH characters around where they start to differ."""
    a, b = _text(old), _text(new)
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, first - 12) if first > WIDTH - 12 else 0
    return f"{_cut(a, start)} -> {_cut(b, start)}"


def changes(old: Any, new: Any, *, prefix: str = "", skip: Iterable[str] = ()) -> list[str]:
    """One `key: old -> new` line per key whose value differs (keys in `skip`, and below them, left out)."""
    a, b = flatten(old), flatten(new)
    skipped = tuple(skip)
    lines = []
    for key in sorted(set(a) | set(b)):
        if any(key == s or key.startswith(s + ".") for s in skipped):
            continue
        x, y = a.get(key, ABSENT), b.get(key, ABSENT)
        if x != y:
            lines.append(f"{prefix}{key}: {show_change(x, y)}")
    return lines
