"""Prompt templates: named row fields and optional sections (for `prompt_response` data).

    data.template: "### Instruction:\n{instruction}\n\n[[### Context:\n{context}\n\n]]### Response:\n"
    data.template_fields: [instruction, context]

`{prompt}` is the row's `data.prompt_field`; every name in `data.template_fields`
may appear as `{name}` too. Any other `{name}` (a name of letters, digits and
`_`) is an error when the config is loaded (`unknown_placeholders`: a typo such
as `{inptu}` would otherwise be cached as literal text); write `{{name}}` for a
literal `{name}`. Other braces (JSON, code: `{"k": 1}`) are kept as written.
A part of the template in `[[ ... ]]` that names a field is optional: it
disappears (brackets and all) when one of its fields is missing, null or blank
in the row, as Dolly's `context` or Alpaca's `input` often are. A field outside
such a part is required (a bad row without it). Text in `[[ ... ]]` that names
no field is kept as written. Filling is plain text replacement in one pass (a
value is never filled again), the same in stage one, the students' data and
evaluation's prompts.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from stages.data_config import DataConfig
from stages.rows import DataError

_SECTION = re.compile(r"\[\[(.*?)\]\]", re.S)
# `{{name}}` (a literal `{name}`) or `{name}` (a placeholder).
_SLOT = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def template_names(data_cfg: DataConfig) -> dict[str, str]:
    """Placeholder name -> row field: `prompt` -> data.prompt_field, and each template field."""
    names = {"prompt": data_cfg.prompt_field}
    names.update({f: f for f in data_cfg.template_fields})
    return names


def placeholders(template: str) -> list[str]:
    """Every `{name}` of the template (not the `{{name}}` escapes), in order of first use."""
    found = [m.group(2) for m in _SLOT.finditer(template) if m.group(2)]
    return list(dict.fromkeys(found))


def used_names(template: str, names: dict[str, str]) -> list[str]:
    """The placeholders of `names` that the template uses, in order of first use."""
    return [n for n in placeholders(template) if n in names]


def unknown_placeholders(template: str, names: dict[str, str]) -> list[str]:
    """Placeholders that name no field: typos, or a field missing from data.template_fields."""
    return [n for n in placeholders(template) if n not in names]


def _fill(text: str, values: dict[str, str]) -> str:
    """Each `{name}` of `values` replaced and each `{{name}}` unescaped, in one pass (anything else kept)."""
    def one(m: re.Match) -> str:
        if m.group(1):
            return "{" + m.group(1) + "}"
        return values.get(m.group(2), m.group(0))

    return _SLOT.sub(one, text)


def fill_template(data_cfg: DataConfig, row: Any, where: str,
                  field: Callable[[Any, str, str], str]) -> str:
    """The prompt text of `row` (see the module doc). `field(row, where, name)` reads a required
    string field and raises the data error naming `where` when it is missing or not a string."""
    names = template_names(data_cfg)
    template = data_cfg.template
    sections = list(_SECTION.finditer(template))
    filled_sections = [_optional_part(m, row, names, where) for m in sections]
    outside = _SECTION.sub("", template)
    required = {name: field(row, where, names[name]) for name in used_names(outside, names)}
    out, pos = [], 0
    for m, filled in zip(sections, filled_sections):
        out += [_fill(template[pos:m.start()], required), filled]
        pos = m.end()
    out.append(_fill(template[pos:], required))
    return "".join(out)


def _optional_part(m: re.Match, row: Any, names: dict[str, str], where: str) -> str:
    """A `[[ ... ]]` part filled; "" when one of its fields is empty; as written when it names none."""
    part = m.group(1)
    inside = used_names(part, names)
    if not inside:
        return "[[" + _fill(part, {}) + "]]"  # no field: plain text, kept with its brackets
    values = {}
    for name in inside:
        value = row.get(names[name]) if isinstance(row, dict) else None
        if value is None or (isinstance(value, str) and not value.strip()):
            return ""
        if not isinstance(value, str):
            raise DataError(f"{where}: field {names[name]!r} must be a string, got "
                            f"{type(value).__name__} {value!r:.60}")
        values[name] = value
    return _fill(part, values)
