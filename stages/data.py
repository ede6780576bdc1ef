"""Training data: load rows, template them, tokenise, and mark the trained targets.

Both stages and evaluation call this module, so the teacher cache and the
student see exactly the same tokens (architecture.md, "Conventions").

A sequence's trained targets are `input_ids[t + 1]` for t in
`target_positions`. Which tokens are trained is decided from how the sequence
was *built* (which segment each token came from), never from token ids: pad
may equal EOS, and EOS must stay a target.

Kinds (DataConfig.kind):
- `prompt_response`: [special prefix, e.g. BOS] + template(prompt) + response + EOS.
  Template and response are tokenised separately and concatenated, so the
  boundary is exact; the response tokens and the EOS are the targets.
- `messages`: a chat (list of {role, content}); rendered with the tokenizer's
  chat template, or BUILTIN_CHAT_TEMPLATE when it has none; assistant turns
  (including their end-of-turn tokens) are the targets.
- `text`: [special prefix] + text + EOS; every token after the first is a target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from stages.data_config import DataConfig
from stages.rows import BadRow, DataError, RowSource, open_rows
from stages.template import fill_template

__all__ = ["DataError", "open_source", "load_rows", "tokenize_examples", "tokenize_rows", "load_examples"]

_TOKENIZE_BATCH = 1024
_MAX_REASONS = 20

# Used for `messages` data when the tokenizer has no chat template. Assistant
# turns end with EOS (a target); other turns end with a blank line.
BUILTIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}{{ '### ' + (m['role'] | capitalize) + ':\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)


@dataclass
class TokenizedExample:
    example_id: int  # index of the row in the data source (0-based, before skipping)
    input_ids: list[int]
    target_positions: np.ndarray  # int32, ascending; input_ids[t + 1] is trained

    @property
    def num_targets(self) -> int:
        return int(self.target_positions.shape[0])


@dataclass
class DataStats:
    rows: int = 0
    examples: int = 0
    tokens: int = 0
    targets: int = 0
    truncated: int = 0  # kept, cut to max_seq_len
    skipped_overlong: int = 0  # overlong="skip", or truncation left no target
    skipped_bad: int = 0  # bad_rows="skip"
    reasons: list[str] = field(default_factory=list)  # first few skip reasons

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def dropped(self) -> int:
        return self.skipped_overlong + self.skipped_bad

    def add(self, other: "DataStats") -> None:
        for name in ("rows", "examples", "tokens", "targets", "truncated", "skipped_overlong", "skipped_bad"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.reasons.extend(other.reasons[: max(0, _MAX_REASONS - len(self.reasons))])

    def summary(self) -> str:
        share = f" ({self.dropped / self.rows:.1%} of rows dropped)" if self.dropped and self.rows else ""
        return (
            f"{self.examples:,}/{self.rows:,} rows used{share}, {self.tokens:,} tokens, {self.targets:,} targets; "
            f"truncated {self.truncated:,}, skipped {self.skipped_overlong:,} over-long and {self.skipped_bad:,} bad"
        )


# ---------------------------------------------------------------- loading


def open_source(data_cfg: DataConfig, path: str | None = None, split: str | None = None, *,
                key: str = "data.path") -> RowSource:
    """The data's RowSource (`path`/`split` override data_cfg's: evaluation reads other files
    with the same field settings; `key` then names their setting). Nothing is read beyond one
    indexing pass."""
    columns = [data_cfg.prompt_field, data_cfg.response_field, data_cfg.messages_field, data_cfg.text_field,
               *data_cfg.template_fields]
    return open_rows(path if path is not None else data_cfg.path, fmt=data_cfg.format,
                     split=split if split is not None else data_cfg.split, columns=columns, key=key)


def num_rows(data_cfg: DataConfig, source: RowSource) -> int:
    """Rows the stages use: all of the source's, or the first data.limit."""
    return source.num_rows if data_cfg.limit is None else min(int(data_cfg.limit), source.num_rows)


def training_rows(data_cfg: DataConfig) -> tuple[RowSource, int]:
    """(source, n): the rows stage two reads without a cache (plain SFT, the teacher fine-tune)
    are the train part (stages.split.read_part, part "train") of source rows [0, n). The one
    place stages.training.rows_dataset opens them."""
    source = open_source(data_cfg)
    return source, num_rows(data_cfg, source)


def rows_identity(data_cfg: DataConfig, source: RowSource, rows: int) -> dict:
    """What the training rows are: the source's content fingerprint, the row count and every
    data setting that shapes the sequences (not where the file lives, nor the drop limit)."""
    settings = {k: v for k, v in asdict(data_cfg).items() if k not in ("path", "max_dropped_fraction")}
    return {"source": source.fingerprint, "rows": int(rows), "settings": settings}


def load_rows(data_cfg: DataConfig, path: str | None = None, split: str | None = None) -> list[dict]:
    """All used rows as Python objects: for small sets only (evaluation, tests).
    Stage one reads row ranges through `open_source` instead."""
    source = open_source(data_cfg, path, split)
    return source.read(0, num_rows(data_cfg, source))


# ---------------------------------------------------------------- tokenizer helpers


def special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer adds in front of a text (e.g. [BOS]); [] if none."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(plain)
    for start in range(len(with_special) - n + 1):
        if with_special[start : start + n] == plain:
            return list(with_special[:start])
    return []


def _require_eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token: responses must be closed by EOS (set eos_token)")
    return int(tokenizer.eos_token_id)


def _encode_many(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), _TOKENIZE_BATCH):
        batch = list(texts[i : i + _TOKENIZE_BATCH])
        out.extend(list(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
    return out


def _chat_template(tokenizer) -> str:
    return tokenizer.chat_template if getattr(tokenizer, "chat_template", None) else BUILTIN_CHAT_TEMPLATE


def chat_template_for(data_cfg: DataConfig, tokenizer) -> str | None:
    """The chat template `messages` data is rendered with (None for the other kinds)."""
    return _chat_template(tokenizer) if data_cfg.kind == "messages" else None


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=_chat_template(tokenizer), tokenize=False, add_generation_prompt=add_generation_prompt
    )


# ---------------------------------------------------------------- row validation


class UnreadableRowError(DataError):
    """A row that is not a JSON object at all (a broken line): no field setting can fix it."""


def _field(row: Any, where: str, name: str, kind: str = "string"):
    if isinstance(row, BadRow):
        raise UnreadableRowError(f"{where}: {row.reason}")
    if not isinstance(row, dict):
        raise UnreadableRowError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if name not in row or row[name] is None:
        present = sorted(k for k, v in row.items() if v is not None)  # Arrow fills absent columns with None
        raise DataError(f"{where}: field {name!r} is missing (expected a {kind}); the row has {present}")
    value = row[name]
    if kind == "string" and not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def _messages(row: Any, where: str, name: str, need_assistant: bool = True) -> list[dict]:
    msgs = _field(row, where, name, kind="list of {role, content}")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of {{role, content}}, got {msgs!r:.60}")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field {name!r}[{j}] must be {{'role': str, 'content': str}}, got {m!r:.80}")
    if need_assistant and not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: field {name!r} has no assistant turn, so nothing would be trained")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


# ---------------------------------------------------------------- segment building
# Each kind turns a row into segments: (token ids, trained?). Trained segments
# are predicted from the token before them, so position t is a target when
# token t+1 belongs to a trained segment.


def _segments_prompt_response(rows, tokenizer, data_cfg: DataConfig, indices, where):
    prefix, eos = special_prefix(tokenizer), _require_eos(tokenizer)
    prompts = [fill_template(data_cfg, rows[i], where(i), _field) for i in indices]
    responses = [_field(rows[i], where(i), data_cfg.response_field) for i in indices]
    p_ids, r_ids = _encode_many(tokenizer, prompts), _encode_many(tokenizer, responses)
    out = {}
    for i, p, r in zip(indices, p_ids, r_ids):
        if not r:
            raise DataError(f"{where(i)}: field {data_cfg.response_field!r} tokenises to nothing (empty response)")
        out[i] = [(prefix + p, False), (r + [eos], True)]
    return out


def _segments_text(rows, tokenizer, data_cfg: DataConfig, indices, where):
    prefix = special_prefix(tokenizer)
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    texts = [_field(rows[i], where(i), data_cfg.text_field) for i in indices]
    out = {}
    for i, ids in zip(indices, _encode_many(tokenizer, texts)):
        seq = prefix + ids + eos
        if not ids or len(seq) < 2:
            raise DataError(f"{where(i)}: field {data_cfg.text_field!r} tokenises to nothing (empty text)")
        out[i] = [(seq[:1], False), (seq[1:], True)]
    return out


def _chat_pieces(tokenizer, msgs: list[dict], where: str) -> list[tuple[str, bool]]:
    """Split the rendered chat into text pieces at assistant-turn boundaries."""
    full = _render_chat(tokenizer, msgs)
    pieces, pos = [], 0
    for j, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _render_chat(tokenizer, msgs[:j], add_generation_prompt=True)
        through = _render_chat(tokenizer, msgs[: j + 1])
        if not (full.startswith(through) and through.startswith(before) and len(before) >= pos):
            raise DataError(
                f"{where}: the chat template does not render turn {j} as a prefix of the whole chat, "
                "so the assistant tokens cannot be located; use a prefix-stable template"
            )
        pieces += [(full[pos : len(before)], False), (full[len(before) : len(through)], True)]
        pos = len(through)
    pieces.append((full[pos:], False))
    return [(text, trained) for text, trained in pieces if text]


def _segments_messages(rows, tokenizer, data_cfg: DataConfig, indices, where):
    out = {}
    for i in indices:
        pieces = _chat_pieces(tokenizer, _messages(rows[i], where(i), data_cfg.messages_field), where(i))
        ids = _encode_many(tokenizer, [text for text, _ in pieces])
        segs = [(piece_ids, trained) for piece_ids, (_, trained) in zip(ids, pieces)]
        if not any(trained and s for s, trained in segs):
            raise DataError(f"{where(i)}: field {data_cfg.messages_field!r}: assistant turns tokenise to nothing")
        out[i] = segs
    return out


_BUILDERS = {"prompt_response": _segments_prompt_response, "messages": _segments_messages, "text": _segments_text}


def _build_segments(rows, tokenizer, data_cfg: DataConfig, indices, where):
    """Segments for every row in `indices`; bad rows raise or are reported per row."""
    build = _BUILDERS.get(data_cfg.kind)
    if build is None:
        raise DataError(f"data.kind {data_cfg.kind!r}: expected one of {sorted(_BUILDERS)}")
    try:
        return build(rows, tokenizer, data_cfg, indices, where), {}
    except DataError as e:
        if data_cfg.bad_rows != "skip":
            fix = ("Fix that line (one JSON object per line)" if isinstance(e, UnreadableRowError)
                   else "Fix that row, point the data.*_field settings at the right fields")
            raise DataError(f"{e}. {fix}, or set data.bad_rows=skip to skip and count bad rows") from None
    # Slow path (only when some row is bad and bad_rows=skip): row by row.
    good, bad = {}, {}
    for i in indices:
        try:
            good.update(build(rows, tokenizer, data_cfg, [i], where))
        except DataError as e:
            bad[i] = str(e)
    return good, bad


def _assemble(segments: list[tuple[list[int], bool]]) -> tuple[list[int], np.ndarray]:
    ids: list[int] = []
    targets: list[int] = []
    for seg, trained in segments:
        if trained:
            start = max(len(ids), 1)  # token 0 has no predecessor
            ids.extend(seg)
            targets.extend(range(start - 1, len(ids) - 1))
        else:
            ids.extend(seg)
    return ids, np.asarray(targets, dtype=np.int32)


# ---------------------------------------------------------------- public


class _Where:
    """A row's place for messages, looked up only when a message is written: naming a jsonl row
    means re-reading its file from the nearest indexed offset, two thirds of the time
    tokenize_rows took when it was looked up for every row."""

    __slots__ = ("_locate", "_index")

    def __init__(self, locate: Callable[[int], str], index: int) -> None:
        self._locate, self._index = locate, index

    def __str__(self) -> str:
        return self._locate(self._index)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def tokenize_rows(rows: Sequence[Any], tokenizer, data_cfg: DataConfig, *, start: int = 0,
                  locate: Callable[[int], str] | None = None,
                  indices: Sequence[int] | None = None) -> tuple[list[TokenizedExample], DataStats]:
    """Rows start, start+1, ... of a source (or the rows at `indices`: a part of a held-out split,
    stages/split.py) -> TokenizedExamples (example_id = row index) and counts of what was dropped
    and why. `locate(row_index)` names a row in messages ('train.jsonl:88'); no rows, or none
    usable, is not an error here (the caller decides)."""
    stats = DataStats(rows=len(rows))
    named = locate or (lambda index: f"row {index}")
    row_ids = [start + i for i in range(len(rows))] if indices is None else [int(i) for i in indices]
    locate = lambda k: named(row_ids[k - start])  # noqa: E731 - k = start + position in rows
    max_len = int(data_cfg.max_seq_len)
    examples: list[TokenizedExample] = []
    segments, bad = _build_segments(rows, tokenizer, data_cfg, list(range(len(rows))),
                                    lambda i: _Where(locate, start + i))
    for i in range(len(rows)):
        if i in bad:
            stats.skipped_bad += 1
            if len(stats.reasons) < _MAX_REASONS:
                stats.reasons.append(bad[i])
            continue
        ids, targets = _assemble(segments[i])
        if len(ids) > max_len:
            if data_cfg.overlong == "skip":
                _skip_overlong(stats, f"{locate(start + i)}: {len(ids)} tokens > data.max_seq_len={max_len} "
                                      "(overlong=skip)")
                continue
            ids = ids[:max_len]
            targets = targets[targets < max_len - 1]
            if targets.size == 0:
                _skip_overlong(stats, f"{locate(start + i)}: truncated to data.max_seq_len={max_len} tokens, "
                                      "no trained target is left (the prompt alone fills it)")
                continue
            stats.truncated += 1
        examples.append(TokenizedExample(example_id=row_ids[i], input_ids=ids, target_positions=targets))
        stats.tokens += len(ids)
        stats.targets += int(targets.size)
    stats.examples = len(examples)
    return examples, stats


def drop_fix(data_cfg: DataConfig, stats: DataStats | None = None) -> str:
    """What to do about the rows `stats` dropped (over-long and/or bad), as the settings stand."""
    fixes = []
    if stats is None or stats.skipped_overlong:
        if data_cfg.overlong == "skip":
            fixes.append("raise data.max_seq_len or set data.overlong=truncate")
        else:
            fixes.append("raise data.max_seq_len (prompts alone fill it)")
    if stats is None or stats.skipped_bad:
        unreadable = stats is not None and all(": not valid JSON" in r or ": expected a JSON object" in r
                                               for r in stats.reasons if "data.max_seq_len" not in r)
        fixes.append("fix the broken lines (one JSON object per line)" if unreadable else
                     "fix the bad rows (see the reasons) or point the data.*_field settings at the right fields")
    return "; ".join(fixes)


def check_dropped(stats: DataStats, data_cfg: DataConfig, where: str) -> None:
    """Fail when more than data.max_dropped_fraction of `where`'s rows were dropped (skipped
    as over-long or bad): a silent loss of most of the data is never what a user wants."""
    limit = float(data_cfg.max_dropped_fraction)
    if not stats.rows or stats.dropped / stats.rows <= limit:
        return
    why = "; ".join(stats.reasons[:3])
    raise DataError(
        f"{where}: {stats.dropped} of {stats.rows} rows ({stats.dropped / stats.rows:.0%}) were dropped "
        f"({stats.skipped_overlong} over-long, {stats.skipped_bad} bad), more than data.max_dropped_fraction="
        f"{limit:g}. First reasons: {why}. To keep them, {drop_fix(data_cfg, stats)}; to accept the loss, set "
        f"data.max_dropped_fraction to a larger share (1.0 allows any)")


def tokenize_examples(rows: list[dict], tokenizer,
                      data_cfg: DataConfig) -> tuple[list[TokenizedExample], DataStats]:
    """All rows -> TokenizedExamples; an error when none is usable (small sets: evaluation, tests)."""
    if not rows:
        raise DataError(f"the dataset {data_cfg.path!r} has no rows; check data.path, data.split and data.limit")
    examples, stats = tokenize_rows(rows, tokenizer, data_cfg)
    if not examples:
        why = "; ".join(stats.reasons[:3])
        raise DataError(f"{data_cfg.path}: no usable examples left out of {len(rows)} rows "
                        f"({stats.summary()}): {why}. To use them, {drop_fix(data_cfg, stats)}")
    return examples, stats


def _skip_overlong(stats: DataStats, reason: str) -> None:
    stats.skipped_overlong += 1
    if len(stats.reasons) < _MAX_REASONS:
        stats.reasons.append(reason)


def _prompt_pieces(row: dict, tokenizer, data_cfg: DataConfig, index: int) -> list[str]:
    """Text pieces of the generation prompt, split exactly as training splits them."""
    where = f"row {index}"
    if data_cfg.kind == "prompt_response":
        return [fill_template(data_cfg, row, where, _field)]
    if data_cfg.kind == "messages":
        if tokenizer is None:
            raise ValueError("a prompt for messages data needs the tokenizer (its chat template)")
        msgs = _messages(row, where, data_cfg.messages_field, need_assistant=False)
        if not any(m["role"] == "assistant" for m in msgs):
            return [_render_chat(tokenizer, msgs, add_generation_prompt=True)]
        pieces = _chat_pieces(tokenizer, msgs, where)
        last = max(j for j, (_, trained) in enumerate(pieces) if trained)
        return [text for text, _ in pieces[:last]]
    raise DataError(f"data.kind {data_cfg.kind!r} has no prompt to generate from (use prompt_response or messages)")


def render_prompt(row: dict, data_cfg: DataConfig, tokenizer=None, index: int = 0) -> str:
    """The text a model is given at generation time (same template as training).

    For messages data: the chat up to its last assistant turn, with the
    generation prompt (or the whole chat plus the generation prompt when it
    has no assistant turn).
    """
    return "".join(_prompt_pieces(row, tokenizer, data_cfg, index))


def prompt_ids(row: dict, tokenizer, data_cfg: DataConfig, index: int = 0) -> list[int]:
    """Token ids of the generation prompt, identical to the prompt part of the training sequence."""
    pieces = _prompt_pieces(row, tokenizer, data_cfg, index)
    prefix = special_prefix(tokenizer) if data_cfg.kind == "prompt_response" else []
    return prefix + [t for ids in _encode_many(tokenizer, pieces) for t in ids]


def reference_response(row: dict, data_cfg: DataConfig, index: int = 0) -> str:
    """The gold response text (for exact match / ROUGE at evaluation)."""
    if data_cfg.kind == "prompt_response":
        return _field(row, f"row {index}", data_cfg.response_field)
    if data_cfg.kind == "messages":
        msgs = _messages(row, f"row {index}", data_cfg.messages_field)
        return [m for m in msgs if m["role"] == "assistant"][-1]["content"]
    raise DataError(f"data.kind {data_cfg.kind!r} has no reference response")


def load_examples(data_cfg: DataConfig, tokenizer, path: str | None = None, split: str | None = None):
    """load_rows + tokenize_examples for small sets (evaluation, tests); stage one reads and
    tokenises shard by shard (stages.teacher.capture)."""
    return tokenize_examples(load_rows(data_cfg, path, split), tokenizer, data_cfg)
