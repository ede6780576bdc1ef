"""Local lm-eval tasks over local jsonl (hub datasets are unreachable in tests): one multiple-choice
task scored by log-likelihood and one generation task."""

from __future__ import annotations

import json
import random

import pytest

MC_YAML = """task: atkd_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata:
  version: 1.0
"""

GEN_YAML = """task: atkd_test_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], do_sample: false, max_gen_toks: 8}}
filter_list:
  - name: first_number
    filter:
      - {{function: regex, regex_pattern: "(-?[0-9]+)"}}
      - {{function: take_first}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true}}
metadata:
  version: 2.0
"""


def write_lm_tasks(root, rows: int = 24):
    """<root>/atkd_test_{mc,gen}.yaml over <root>/data/*.jsonl; returns root."""
    rng = random.Random(0)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    mc, gen = [], []
    for _ in range(rows):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        choices = [str(a + b), str(a + b + 1), str(abs(a - b) + 20), str(a * b + 30)]
        gold = rng.randrange(4)
        choices[0], choices[gold] = choices[gold], choices[0]
        mc.append({"question": f"What is {a} plus {b}?", "choices": choices, "label": gold})
        gen.append({"question": f"What is {a} plus {b}?", "answer": str(a + b)})
    for name, items in (("mc", mc), ("gen", gen)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (root / "atkd_test_mc.yaml").write_text(MC_YAML.format(data=json.dumps(str(data / "mc.jsonl"))))
    (root / "atkd_test_gen.yaml").write_text(GEN_YAML.format(data=json.dumps(str(data / "gen.jsonl"))))
    return root


@pytest.fixture
def lm_tasks(tmp_path):
    return write_lm_tasks(tmp_path / "lm_tasks")
