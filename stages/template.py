"""Prompt templates: named row fields and optional sections (for `prompt_response` data).

    data.template: "### Instruction:\n{instruction}\n\n[[### Context:\n{context}\n\n]]### Response:\n"
    data.template_fields: [instruction, context]

`{prompt}` is the row's `data.prompt_field`; every name in `data.template_fields`
may appear as `{name}` too. A part of the template in `[[ ... ]]` that names a
field is optional: it disappears (brackets and all) when one of its fields is
missing, null or blank in the row, as Dolly's `context` or Alpaca's `input` often
are. A field outside such a part is required (a bad row without it). Text in
`[[ ... ]]` that names no field, and any other brace, is kept as written, so
templates may contain JSON or code. Filling is plain text replacement, the same
in stage one, the students' data and evaluation's prompts.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from stages.data_config import DataConfig
from stages.rows import DataError

_SECTION = re.compile(r"\[\[(.*?)\]\]", re.S)


def template_names(data_cfg: DataConfig) -> dict[str, str]:
    """Placeholder name -> row field: `prompt` -> data.prompt_field, and each template field."""
    names = {"prompt": data_cfg.prompt_field}
    names.update({f: f for f in data_cfg.template_fields})
    return names


def used_names(template: str, names: dict[str, str]) -> list[str]:
    """The placeholders of `names` that the template uses, in order of first use."""
    return [n for n in sorted(names, key=lambda n: template.find("{" + n + "}")) if "{" + n + "}" in template]


def fill_template(data_cfg: DataConfig, row: Any, where: str,
                  field: Callable[[Any, str, str], str]) -> str:
    """The prompt text of `row` (see the module doc). `field(row, where, name)` reads a required
    string field and raises the data error naming `where` when it is missing or not a string."""
    names = template_names(data_cfg)

    def optional_part(m: re.Match) -> str:
        part = m.group(1)
        inside = used_names(part, names)
        if not inside:
            return m.group(0)  # no field: plain text, kept with its brackets
        values = {}
        for name in inside:
            value = row.get(names[name]) if isinstance(row, dict) else None
            if value is None or (isinstance(value, str) and not value.strip()):
                return ""
            if not isinstance(value, str):
                raise DataError(f"{where}: field {names[name]!r} must be a string, got "
                                f"{type(value).__name__} {value!r:.60}")
            values[name] = value
        return _replace(part, values)

    text = _SECTION.sub(optional_part, data_cfg.template)
    required = {name: field(row, where, names[name]) for name in used_names(text, names)}
    return _replace(text, required)


def _replace(text: str, values: dict[str, str]) -> str:
    """Replace each {name} in one pass, so a value containing '{other}' is never filled again."""
    if not values:
        return text
    pattern = re.compile("|".join(re.escape("{" + n + "}") for n in values))
    return pattern.sub(lambda m: values[m.group(0)[1:-1]], text)
