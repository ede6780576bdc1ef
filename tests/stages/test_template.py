"""Prompt templates with named row fields and optional sections (Dolly / Alpaca style)."""

from __future__ import annotations

import pytest

from stages.data import DataError, prompt_ids, tokenize_rows
from stages.data_config import DataConfig
from stages.template import fill_template

DOLLY = "### Instruction:\n{instruction}\n\n[[### Context:\n{context}\n\n]]### Response:\n"


def _field(row, where, name):
    if name not in row or row[name] is None:
        raise DataError(f"{where}: field {name!r} is missing")
    return row[name]


def cfg(**kw) -> DataConfig:
    base = dict(template=DOLLY, template_fields=["instruction", "context"], response_field="response")
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.parametrize("context", [None, "", "   ", "absent"])
def test_an_optional_section_disappears_when_its_field_is_empty(context):
    row = {"instruction": "Name a colour.", "response": "red"}
    if context != "absent":
        row["context"] = context
    assert fill_template(cfg(), row, "row 0", _field) == "### Instruction:\nName a colour.\n\n### Response:\n"


def test_an_optional_section_is_kept_and_filled_when_its_field_has_text():
    row = {"instruction": "Summarise.", "context": "A {json: 1} text", "response": "ok"}
    assert fill_template(cfg(), row, "row 0", _field) == (
        "### Instruction:\nSummarise.\n\n### Context:\nA {json: 1} text\n\n### Response:\n")


def test_a_value_is_never_filled_again_and_other_braces_and_brackets_stay():
    c = cfg(template='[[note]] {"k": [1]} {instruction} [[ctx={context}]]', template_fields=["instruction", "context"])
    row = {"instruction": "say {context}", "context": "C"}
    assert fill_template(c, row, "row 0", _field) == '[[note]] {"k": [1]} say {context} ctx=C'


def test_the_prompt_only_template_is_filled_as_before():
    c = DataConfig(template="Q: {prompt} {prompt} [[{x}]]\nA:")
    assert fill_template(c, {"prompt": "hi"}, "row 0", _field) == "Q: hi hi [[{x}]]\nA:"


def test_a_required_field_missing_is_a_bad_row_naming_where(tiny_tokenizer):
    rows = [{"instruction": "a", "response": "b"}, {"context": "c", "response": "d"}]
    with pytest.raises(DataError, match="row 1: field 'instruction' is missing"):
        tokenize_rows(rows, tiny_tokenizer, cfg())
    examples, stats = tokenize_rows(rows, tiny_tokenizer, cfg(bad_rows="skip"))
    assert [e.example_id for e in examples] == [0] and stats.skipped_bad == 1


def test_an_optional_field_of_another_type_is_an_error():
    with pytest.raises(DataError, match="field 'context' must be a string, got int"):
        fill_template(cfg(), {"instruction": "a", "context": 3}, "row 0", _field)


@pytest.mark.parametrize("row", [{"instruction": "Add 2 and 3.", "context": "Numbers are fun.", "response": "5"},
                                 {"instruction": "Add 2 and 3.", "context": "", "response": "5"}])
def test_generation_prompt_is_the_prompt_part_of_the_training_sequence(tiny_tokenizer, row):
    (example,), _ = tokenize_rows([row], tiny_tokenizer, cfg())
    prompt = prompt_ids(row, tiny_tokenizer, cfg())
    first_target = int(example.target_positions[0]) + 1
    assert example.input_ids[:first_target] == prompt


def test_config_accepts_a_template_of_named_fields_and_refuses_one_without_any(tmp_path):
    from pipeline.config import ConfigError, load_config

    path = tmp_path / "p.yaml"
    path.write_text("data: {path: x.jsonl, template: 'I: {instruction}\\n[[C: {context}]]', "
                    "template_fields: [instruction, context]}\nteacher: {model: t}\n")
    assert load_config(path).data.template_fields == ["instruction", "context"]
    with pytest.raises(ConfigError, match="must contain {prompt} or one of data.template_fields"):
        load_config(path, ['data.template="I: [[C: ]]"'])
    with pytest.raises(ConfigError, match=r"data.template: \{instruction\} names no field; the template can use "
                                          r"\{prompt\} \(add a row field to data.template_fields"):
        load_config(path, ["data.template_fields=[]"])


@pytest.mark.parametrize("template, unknown, close", [
    ("### Instruction:\n{instruction}\n[[### Input:\n{inptu}\n]]### Response:\n", "inptu", "input"),
    ("{instruction} {context}", "context", None),  # a real field, not listed in data.template_fields
    ("{promt}: {input}", "promt", "prompt")])
def test_a_placeholder_that_names_no_field_is_refused_at_load(tmp_path, template, unknown, close):
    from pipeline.config import ConfigError, load_config

    path = tmp_path / "p.yaml"
    path.write_text("data: {path: x.jsonl, template_fields: [instruction, input]}\nteacher: {model: t}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [f"data.template={template!r}"])
    message = str(info.value)
    assert message.startswith(f"data.template: {{{unknown}}} names no field")
    assert ("did you mean" not in message) if close is None else (f"(did you mean {close}?)" in message)
    assert "the template can use {prompt}, {instruction}, {input}" in message
    assert f"write {{{{{unknown}}}}} for a literal {{{unknown}}}" in message


def test_double_braces_are_a_literal_placeholder_everywhere():
    c = cfg(template="{{instruction}} {instruction} [[{{context}} {context}]] {{x}} {x} {{y", template_fields=[
        "instruction", "context"])
    row = {"instruction": "I", "context": "C"}
    assert fill_template(c, row, "row 0", _field) == "{instruction} I {context} C {x} {x} {{y"
    from stages.template import placeholders, unknown_placeholders

    assert placeholders(c.template) == ["instruction", "context", "x"]
    assert unknown_placeholders("{{inptu}} {prompt}", {"prompt": "p"}) == []
