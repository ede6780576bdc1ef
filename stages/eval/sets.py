"""Several evaluation sets (`eval.sets`): each a held-out file with its own fields and template.

    eval:
      sets:
        dolly:         {path: data/dolly-test.jsonl, template_fields: ..., max_examples: 500}
        self_instruct: {path: data/self-inst.jsonl, fields: {prompt: instruction, response: output}}

`eval.path` stays the one-set shorthand (its metrics are the top level of each model's
results). Every set here gets the generation metrics of stages.evaluate (exact match,
ROUGE-L, perplexity of the references) per model, under `results[model]["sets"][name]`,
its generations in `<out_dir>/sets/<name>/<model>.generations.jsonl`; its rows are
compared with the training rows like eval.path's (stages.overlap, label `eval.sets.<name>`).

A set's settings default to the data section's: `fields` maps this set's rows onto the
names the template uses (`prompt`, `response`, `messages` or a template field: `{prompt:
instruction, response: output}`), so other data is read with the students' own template
(or the set's `template`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

ROLE_FIELDS = {"prompt": "prompt_field", "response": "response_field", "messages": "messages_field"}


@dataclass
class EvalSetConfig:
    """One entry of `eval.sets` (empty / None: the data section's or eval's value)."""

    path: str = ""  # a .jsonl/.json/.parquet file, a directory of them, or a hub name
    split: str = "test"
    format: Literal["auto", "jsonl", "json", "parquet", "hub"] = "auto"
    kind: Literal["", "prompt_response", "messages"] = ""  # "": data.kind
    # The name the template (or the response / messages) uses -> this set's row field.
    fields: dict[str, str] = field(default_factory=dict)
    template: str = ""  # "": data.template
    answer_rule: Literal["auto", "exact", "demo"] = "auto"  # auto: eval.answer_rule
    max_examples: Optional[int] = None  # None: eval.max_examples


def set_label(name: str) -> str:
    """How a set is named in messages and the overlap record."""
    return f"eval.sets.{name}"


def set_data_config(data_cfg, set_cfg: EvalSetConfig):
    """The DataConfig that reads this set: the data section's with the set's file, kind, fields and template."""
    names = {k: v for k, v in set_cfg.fields.items() if k not in ROLE_FIELDS}
    out = dataclasses.replace(data_cfg, path=set_cfg.path, format=set_cfg.format, split=set_cfg.split,
                              kind=set_cfg.kind or data_cfg.kind, template=set_cfg.template or data_cfg.template,
                              template_fields=list(dict.fromkeys([*data_cfg.template_fields, *names])),
                              holdout=None, limit=None)
    for role, attr in ROLE_FIELDS.items():
        if role in set_cfg.fields:
            out = dataclasses.replace(out, **{attr: set_cfg.fields[role]})
    return out


def renamed_row(row, set_cfg: EvalSetConfig):
    """A template field that `fields` maps to another row field, copied under the template's name."""
    names = {k: v for k, v in set_cfg.fields.items() if k not in ROLE_FIELDS and k != v}
    if not names or not isinstance(row, dict):
        return row
    return {**row, **{k: row.get(v) for k, v in names.items()}}


def resolve_paths(cfg) -> None:
    """`{demo.dir}` in a set's path: the demo's build directory (so a sweep's runs read their own)."""
    for set_cfg in cfg.eval.sets.values():
        if "{demo.dir}" in set_cfg.path:
            set_cfg.path = set_cfg.path.replace("{demo.dir}", cfg.demo.dir or cfg.run_dir)
        if set_cfg.answer_rule == "auto":
            set_cfg.answer_rule = cfg.eval.answer_rule


# ---------------------------------------------------------------- rows


@dataclass
class EvalSet:
    """A set's rows (first max_examples), the DataConfig that renders them and its answer rule."""

    name: str
    config: EvalSetConfig
    data_cfg: object
    rows: list
    indices: list[int]
    locate: object

    def eval_rows(self):
        """For the overlap check: the set's rows with the fields that shape them (stages.overlap)."""
        from stages.eval.overlap import EvalRows, content_fields

        return EvalRows(set_label(self.name), self.rows, self.indices, self.locate,
                        fields=content_fields(self.data_cfg))


def load_set(name: str, set_cfg: EvalSetConfig, data_cfg, eval_cfg) -> EvalSet:
    """The set's first max_examples rows, each checked for the fields its template and response need.
    A DataError naming the set (and the row), like eval.path's data: `atkd teacher` and `student`
    leave data they cannot read yet to the evaluation."""
    from stages.data import num_rows, open_source, reference_response, render_prompt
    from stages.rows import DataError

    where = set_label(name)
    data = set_data_config(data_cfg, set_cfg)
    try:
        source = open_source(data, key=f"{where}.path")
        end = min(num_rows(data, source), set_cfg.max_examples or eval_cfg.max_examples)
        rows = [renamed_row(r, set_cfg) for r in source.read(0, end)]
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    if not rows:
        raise DataError(f"{where}: {set_cfg.path!r} has no rows (split {set_cfg.split!r})")
    for i, row in enumerate(rows):
        try:
            reference_response(row, data, i)
            if data.kind == "prompt_response":
                render_prompt(row, data, None, i)
        except DataError as e:
            mapped = ", ".join(f"{k}: {v}" for k, v in set_cfg.fields.items()) or "nothing"
            raise DataError(f"{where}: {source.location(i)}: {e}. Map the template's names and `response` onto "
                            f"this set's fields with {where}.fields (it maps {mapped})") from None
    return EvalSet(name, set_cfg, data, rows, list(range(len(rows))), source.location)


def load_sets(data_cfg, eval_cfg) -> list[EvalSet]:
    return [load_set(name, set_cfg, data_cfg, eval_cfg) for name, set_cfg in eval_cfg.sets.items()]


def set_fingerprints(data_cfg, eval_cfg) -> dict:
    """Each set's rows' content fingerprint (None while unreadable: evaluating says why)."""
    from stages.data import open_source
    from storage.errors import AtkdError

    out = {}
    for name, set_cfg in eval_cfg.sets.items():
        try:
            out[name] = open_source(set_data_config(data_cfg, set_cfg), key=f"{set_label(name)}.path").fingerprint
        except AtkdError:
            out[name] = None
    return out


def answer_rule_for(eval_set: EvalSet, named_rules: dict | None = None):
    """The set's exact-match rule: one the caller names (`named_rules`, e.g. "demo": the demo's answer
    check, which evaluation does not import), or the whole response."""
    rule = eval_set.config.answer_rule
    if rule != "exact" and rule in (named_rules or {}):
        return named_rules[rule]
    if rule not in ("exact", "auto"):
        from stages.errors import EvalError

        raise EvalError(f"{set_label(eval_set.name)}.answer_rule: {rule!r} needs the rule from its caller "
                        "(atkd eval passes the demo's)")
    from stages.eval.evaluate import ExactResponse

    return ExactResponse(eval_set.data_cfg)
