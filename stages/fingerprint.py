"""Fingerprints that tie a cache to its teacher, tokenizer and data.

A fingerprint is "sha256:" + hex digest of a canonical encoding. Equal inputs
give equal fingerprints on every machine; any change of a token id, a target
position, a special token or a weight file gives a different one. The
`*_info` functions return the readable facts behind a fingerprint, so a
mismatch can be explained (`describe_tokenizer_difference`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_SAMPLE_BYTES = 1 << 20  # bytes hashed at the head, middle and tail of each weight file


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def hash_bytes(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return "sha256:" + h.hexdigest()


def fingerprint_json(obj: Any) -> str:
    return hash_bytes(canonical_json(obj))


# ---------------------------------------------------------------- tokenizer

_SPECIAL_NAMES = ("bos", "eos", "pad", "unk", "sep", "cls", "mask")


def tokenizer_info(tokenizer) -> dict:
    """The facts that decide which ids a text becomes and which ids are special."""
    vocab = tokenizer.get_vocab()
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in _SPECIAL_NAMES}
    added = sorted(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {})
    # Which ids the tokenizer puts around a text (e.g. BOS): part of the sequences.
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return {
        "vocab_size": len(tokenizer),
        "vocab": {tok: int(i) for tok, i in vocab.items()},
        "special_ids": special,
        "added_token_ids": added,
        "wraps_text": [list(map(int, with_special)), list(map(int, plain))],
    }


def tokenizer_fingerprint(tokenizer_or_info) -> str:
    """Fingerprint of a tokenizer or of its full `tokenizer_info` (not of a summary)."""
    info = tokenizer_or_info if isinstance(tokenizer_or_info, dict) else tokenizer_info(tokenizer_or_info)
    return fingerprint_json(info)


def tokenizer_summary(info: dict) -> dict:
    """A small stand-in for `tokenizer_info` to store in a cache manifest: the
    vocab is replaced by its fingerprint. describe_tokenizer_difference accepts it."""
    out = {k: v for k, v in info.items() if k != "vocab"}
    out["vocab_fingerprint"] = fingerprint_json(info["vocab"]) if "vocab" in info else info.get("vocab_fingerprint")
    return out


def describe_tokenizer_difference(a: dict, b: dict) -> str:
    """Say what differs between two `tokenizer_info` dicts or summaries ('' when nothing does)."""
    diffs = []
    if "vocab" not in a or "vocab" not in b:  # at least one summary: vocab known by fingerprint only
        fa, fb = tokenizer_summary(a)["vocab_fingerprint"], tokenizer_summary(b)["vocab_fingerprint"]
        a = {k: v for k, v in a.items() if k != "vocab"}
        b = {k: v for k, v in b.items() if k != "vocab"}
        a["vocab"], b["vocab"] = {}, {}
        if fa != fb:
            diffs.append("the token -> id mappings differ")
    if a["vocab_size"] != b["vocab_size"]:
        diffs.append(f"vocab size {a['vocab_size']} vs {b['vocab_size']}")
    for name in _SPECIAL_NAMES:
        x, y = a["special_ids"].get(name), b["special_ids"].get(name)
        if x != y:
            diffs.append(f"{name} token id {x} vs {y}")
    va, vb = a["vocab"], b["vocab"]
    if va != vb:
        only_a = sorted(set(va) - set(vb), key=va.get)
        only_b = sorted(set(vb) - set(va), key=vb.get)
        if only_a or only_b:
            diffs.append(
                f"{len(only_a)} token(s) only in the first (e.g. {only_a[:3]!r}), "
                f"{len(only_b)} only in the second (e.g. {only_b[:3]!r})"
            )
        moved = sorted((va[t], t, vb[t]) for t in set(va) & set(vb) if va[t] != vb[t])
        if moved:
            i, tok, j = moved[0]
            diffs.append(f"{len(moved)} token(s) have other ids, first: {tok!r} is {i} vs {j}")
    if a.get("added_token_ids") != b.get("added_token_ids"):
        diffs.append("the added/special token sets differ")
    if a.get("wraps_text") != b.get("wraps_text"):
        diffs.append(f"special tokens around a text: the first adds {_wrapping(a.get('wraps_text'))}, the second "
                     f"{_wrapping(b.get('wraps_text'))}")
    return "; ".join(diffs)


def _wrapping(wraps) -> str:
    """`wraps_text` ([ids of "a" with special tokens, without]) in words: "id(s) [1] before it", "nothing"."""
    try:
        with_special, plain = [list(x) for x in wraps]
    except (TypeError, ValueError):
        return repr(wraps)
    n = len(plain)
    at = next((i for i in range(len(with_special) - n + 1) if with_special[i:i + n] == plain), None)
    if at is None:
        return f"{with_special} for the plain {plain}"
    before, after = with_special[:at], with_special[at + n:]
    if before and after:
        return f"id(s) {before} before and {after} after it"
    return f"id(s) {before} before it" if before else (f"id(s) {after} after it" if after else "nothing")


# ---------------------------------------------------------------- data


def data_fingerprint(examples: Iterable) -> str:
    """Hash of every example's id, token ids and target positions, in order."""
    h = hashlib.sha256()
    n = 0
    for ex in examples:
        ids = np.asarray(ex.input_ids, dtype=np.int32)
        targets = np.asarray(ex.target_positions, dtype=np.int32)
        h.update(np.array([ex.example_id, ids.size, targets.size], dtype=np.int64).tobytes())
        h.update(ids.tobytes())
        h.update(targets.tobytes())
        n += 1
    h.update(n.to_bytes(8, "little"))
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------- model


def _sample_file(path: Path) -> bytes:
    """Head, middle and tail bytes: cheap, yet differs between two trainings."""
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= 3 * _SAMPLE_BYTES:
            return f.read()
        parts = []
        for offset in (0, size // 2, size - _SAMPLE_BYTES):
            f.seek(offset)
            parts.append(f.read(_SAMPLE_BYTES))
        return b"".join(parts)


def model_info(path: str) -> dict:
    """config.json plus each weight file's name, size and a sampled hash.

    A hub name that is not a local directory is identified by the name alone.
    """
    p = Path(os.path.expanduser(path))
    if not p.is_dir():
        return {"name": path}
    config_file = p / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else None
    if isinstance(config, dict):
        # Bookkeeping fields that change on re-save without changing the model.
        for key in ("_name_or_path", "transformers_version", "_commit_hash"):
            config.pop(key, None)
    weights = {}
    for f in sorted(p.rglob("*")):
        if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES):
            rel = str(f.relative_to(p))
            weights[rel] = {"size": f.stat().st_size, "sample": hash_bytes(_sample_file(f))}
    return {"config": config, "weights": weights}


def model_fingerprint(path: str) -> str:
    return fingerprint_json(model_info(path))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): the counter-based hash
    behind the held-out split's permutation (stages.split) and the teacher draws
    (stages.teacher.sampling)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
