"""Evaluation rows that are training rows: found by content fingerprints, refused by default.

A row's fingerprint is a hash of the fields that shape its sequence (the
template's fields and the response; or the messages; or the text), each string
whitespace-normalised, so the same example is found at another index, in
another file, or in the same file: a duplicate row that the split put in both
train and test is caught like an eval file that is the training file.

Cost: one pass over the training rows (the train part, stages.split.train_rows),
read by range, parsed and hashed, O(training rows) once per evaluation (about 60k rows/s
on one busy CPU core for short jsonl rows: Dolly's 15k in a quarter second, 10M in ~3 min); the evaluation
rows' hashes are a small set in memory. The outcome is recorded in
`<out_dir>/overlap.json` keyed by both sides' fingerprints, so a rerun with the
same data does not rescan.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from stages import split
from stages.data import num_rows, open_source
from stages.data_config import DataConfig
from stages.errors import EvalError
from stages.rows import RowSource
from stages.template import template_names, used_names
from storage.files import atomic_write, read_json

RECORD_FILE = "overlap.json"
_SHOW = 3  # row numbers shown per side in messages


def content_fields(data_cfg: DataConfig) -> list[str]:
    """The row fields whose content shapes the sequence."""
    if data_cfg.kind == "prompt_response":
        names = template_names(data_cfg)
        return [names[n] for n in used_names(data_cfg.template, names)] + [data_cfg.response_field]
    return [data_cfg.messages_field if data_cfg.kind == "messages" else data_cfg.text_field]


def _normalise(value: Any) -> Any:
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in sorted(value.items()) if k in ("role", "content")} \
            if {"role", "content"} <= set(value) else {k: _normalise(v) for k, v in sorted(value.items())}
    return value


def row_fingerprint(row: Any, fields: Sequence[str]) -> str | None:
    """Hash of the row's content fields (None for a row that is not an object)."""
    if not isinstance(row, dict):
        return None
    payload = json.dumps([_normalise(row.get(f)) for f in fields], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass
class EvalRows:
    """Rows evaluation uses: `label` ('test', 'validation', 'eval.sets.<name>'), row numbers in their
    source, a namer, and the fields that shape them (None: the training data's, content_fields)."""

    label: str
    rows: list[Any]
    indices: list[int]
    locate: Callable[[int], str] = field(default=lambda i: f"row {i}")
    fields: list[str] | None = None


def _key(train: dict, hashes: dict[str, list]) -> str:
    """The scan's identity: the training rows and the evaluation rows' hashes with their sets' labels
    (a renamed set is rescanned: the record counts rows per set)."""
    labelled = sorted([fp, sorted({label for label, _ in refs})] for fp, refs in hashes.items())
    blob = json.dumps({"train": train, "eval": labelled}, sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def scan(data_cfg: DataConfig, hashes: dict[str, list], source: RowSource) -> dict:
    """Stream the training rows once; which of `hashes` they contain (count + a few row pairs)."""
    fields = content_fields(data_cfg)
    matched: dict[str, list[int]] = {}
    t0, scanned = time.perf_counter(), 0
    for indices, rows in split.train_rows(data_cfg, source):
        scanned += len(rows)
        for i, row in zip(indices.tolist(), rows):
            fp = row_fingerprint(row, fields)
            if fp in hashes:
                seen = matched.setdefault(fp, [])
                if len(seen) < _SHOW:
                    seen.append(i)
    overlap = [ref for fp in matched for ref in hashes[fp]]
    pairs = [{"eval": label, "eval_row": i, "train_row": matched[fp][0]}
             for fp in list(matched)[:_SHOW] for label, i in hashes[fp][:1]]
    by_set: dict[str, int] = {}
    for label, _ in overlap:
        by_set[label] = by_set.get(label, 0) + 1
    return {"overlap": len(overlap), "by_set": by_set, "examples": pairs, "train_rows_scanned": scanned,
            "scan_seconds": round(time.perf_counter() - t0, 2)}


def check_train_overlap(data_cfg: DataConfig, sets: list[EvalRows], *, allow: bool,
                        out_dir: str | Path | None = None, source: RowSource | None = None) -> dict:
    """Refuse (EvalError) evaluation rows whose content is a training row's; with `allow`, warn loudly.

    Returns the record (overlap count, per set, a few row pairs, rows scanned)."""
    fields = content_fields(data_cfg)
    hashes: dict[str, list] = {}
    for s in sets:
        for i, row in zip(s.indices, s.rows):
            fp = row_fingerprint(row, s.fields or fields)  # a set with other field names: compared in order
            if fp is not None:
                hashes.setdefault(fp, []).append((s.label, int(i)))
    if not hashes:
        return {"overlap": 0, "by_set": {}, "examples": [], "train_rows_scanned": 0}
    source = source if source is not None else open_source(data_cfg)
    n = num_rows(data_cfg, source)
    train = {"source": source.fingerprint, "rows": n, "holdout": split.identity_key(data_cfg, n), "fields": fields}
    key = _key(train, hashes)
    path = Path(out_dir) / RECORD_FILE if out_dir else None
    record = _recorded(path, key)
    if record is None:
        record = {"key": key, **scan(data_cfg, hashes, source)}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(record, indent=1))
    if record["overlap"]:
        _complain(record, sets, data_cfg, source, allow)
    return record


def _recorded(path: Path | None, key: str) -> dict | None:
    record = read_json(path) if path is not None else None
    return record if record is not None and record.get("key") == key else None


def _complain(record: dict, sets: list[EvalRows], data_cfg: DataConfig, source: RowSource, allow: bool) -> None:
    locate = {s.label: s.locate for s in sets}
    sizes = {s.label: len(s.rows) for s in sets}
    counts = ", ".join(f"{n} of the {sizes.get(label, '?')} {label} rows" for label, n in record["by_set"].items())
    shown = "; ".join(f"{e['eval']} {locate[e['eval']](e['eval_row']) if e['eval'] in locate else e['eval_row']} "
                      f"= training {source.location(e['train_row'])}" for e in record["examples"])
    fields = ", ".join(content_fields(data_cfg))
    what = (f"evaluation rows are training rows: {counts} have the same content ({fields}) as a row "
            f"the students train on (e.g. {shown}), so their scores would measure memorisation")
    if allow:
        print(f"[eval] WARNING: {what}. eval.allow_train_overlap is true: evaluating anyway; the count is in "
              "results.json (train_overlap)", file=sys.stderr, flush=True)
        return
    if data_cfg.holdout is None:
        fix = ("set data.holdout (a train/validation/test split of data.path; evaluation then uses its test "
               "part), or point eval.path / eval.validation_path / eval.sets at data without these rows")
    else:  # the split is by row number: repeated rows of data.path can land on both sides
        fix = ("data.holdout splits data.path by row number, not content, so a row that data.path repeats can "
               "land in train and in a held-out part: remove the repeated rows from data.path (or these rows "
               "from eval.path / eval.validation_path / eval.sets where they name other data)")
    raise EvalError(f"{what}. Evaluate on held-out rows: {fix}. To evaluate on them anyway, set "
                    "eval.allow_train_overlap=true")


# ---------------------------------------------------------------- the rows evaluation uses


def eval_rows(data_cfg: DataConfig, eval_cfg, train_source=None, *, quiet: bool = False) -> EvalRows:
    """The first eval.max_examples rows evaluation generates from: those of eval.path, or, when
    eval.path is the training source and data.holdout is set, of its test part."""
    source = open_source(data_cfg, eval_cfg.path, eval_cfg.split, key="eval.path")
    n = num_rows(data_cfg, source)
    if data_cfg.holdout is not None and train_source is not None and source.fingerprint == train_source.fingerprint:
        indices = split.members(data_cfg, n, "test")[: eval_cfg.max_examples]
        if not len(indices):
            raise EvalError(f"eval.path {eval_cfg.path!r} is the training data and its held-out test part is "
                            "empty: set data.holdout.test, or point eval.path at other held-out data")
        if not quiet:
            print(f"[eval] generation metrics on {len(indices)} rows of the held-out test part "
                  f"({split.part_size(data_cfg, n, 'test')} rows) of {eval_cfg.path}", flush=True)
        return EvalRows("test", split.read_indices(source, indices), indices.tolist(), source.location)
    end = min(n, eval_cfg.max_examples)
    return EvalRows("test", source.read(0, end), list(range(end)), source.location)


def validation_rows(val_data_cfg: DataConfig, limit: int) -> EvalRows:
    """The first `limit` rows of the data the validation cache was built from (its part, with a split):
    the rows KL, top-1 agreement and ECE are measured on (eval.max_examples caps them too)."""
    key = "eval.validation_path" if val_data_cfg.holdout is None else "data.path"
    source = open_source(val_data_cfg, key=key)
    for idx, chunk in split.iter_part(val_data_cfg, split.part_name(val_data_cfg), source, chunk_rows=limit):
        return EvalRows("validation", chunk[:limit], idx[:limit].tolist(), source.location)
    return EvalRows("validation", [], [], source.location)


def evaluation_sets(data_cfg: DataConfig, eval_cfg, val_data_cfg: DataConfig | None = None, *,
                    quiet: bool = False, named: bool = False) -> tuple:
    """(the evaluation rows: eval.path's, the validation cache's data and eval.sets' rows, the training
    source): what check_train_overlap compares, before training (the pipeline) and before evaluating.
    `named`: the eval.sets (stages.eval.sets.EvalSet) come back too, as a third item."""
    from stages.eval.sets import load_sets

    train_source = open_source(data_cfg) if data_cfg.path else None
    sets = [eval_rows(data_cfg, eval_cfg, train_source, quiet=quiet)] if eval_cfg.path else []
    if val_data_cfg is not None:
        sets.append(validation_rows(val_data_cfg, eval_cfg.max_examples))
    named_sets = load_sets(data_cfg, eval_cfg)
    sets += [s.eval_rows() for s in named_sets]
    return (sets, train_source, named_sets) if named else (sets, train_source)
