"""Load-time checks of the `eval:` section's sets and lm-eval settings (stages/eval/sets.py,
stages/eval/lm_harness.py): a ConfigError naming the key, before anything runs. pipeline/config.py's
validate() calls them; what needs the data or lm-eval itself is checked when evaluation starts."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.config import ConfigError, check_name


def check_sets(cfg) -> None:
    """`eval.sets` as far as the config alone tells (a ConfigError naming the set); rows are checked
    when they are read (load_set), before any model runs."""
    from stages.eval.sets import set_data_config, set_label
    from stages.template import template_names, unknown_placeholders, used_names

    for name, set_cfg in cfg.eval.sets.items():
        where = set_label(name)
        check_name(name, where)
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ConfigError(f"{where}: a set name is letters, digits, '_' and '-' (it names files), got {name!r}")
        if not set_cfg.path:
            raise ConfigError(f"{where}.path: missing; set the file (or hub name) of the set's rows")
        if set_cfg.max_examples is not None and set_cfg.max_examples < 1:
            raise ConfigError(f"{where}.max_examples: must be >= 1 (or null for eval.max_examples), "
                              f"got {set_cfg.max_examples}")
        kind = set_cfg.kind or cfg.data.kind
        if kind == "text":
            raise ConfigError(f"{where}.kind: data.kind is text, which has no prompt and reference response; "
                              "set the set's kind to prompt_response or messages")
        bad = [k for k in set_cfg.fields if not k or not set_cfg.fields[k]]
        if bad:
            raise ConfigError(f"{where}.fields: empty name or field in {bad[0]!r}")
        data = set_data_config(cfg.data, set_cfg)
        if kind == "prompt_response":
            names = template_names(data)
            unknown = unknown_placeholders(data.template, names)
            if unknown:
                raise ConfigError(f"{where}.template: {{{unknown[0]}}} names no field; map it to a row field "
                                  f"with {where}.fields ({unknown[0]}: <row field>)")
            if not used_names(data.template, names):
                raise ConfigError(f"{where}.template: must contain {{prompt}} or a field of {where}.fields")


def check_lm_eval(cfg) -> None:
    """At load: lm-eval installed, include_path a directory whose YAMLs parse (a ConfigError saying which).

    The demo's include_path is built with its data (later): checked when the demo is built."""
    from stages.errors import EvalError
    from stages.eval.lm_harness import INSTALL, demo_include_path, installed, local_tasks

    lm = cfg.eval.lm_eval
    if not lm.tasks:
        return
    if not installed():
        raise ConfigError(f"eval.lm_eval.tasks ({', '.join(lm.tasks)}) needs lm-evaluation-harness, which is not "
                          f"installed: {INSTALL}")
    if lm.batch_size < 1:
        raise ConfigError(f"eval.lm_eval.batch_size: must be >= 1, got {lm.batch_size}")
    if lm.num_fewshot is not None and lm.num_fewshot < 0:
        raise ConfigError(f"eval.lm_eval.num_fewshot: must be >= 0 (or null for each task's own), got {lm.num_fewshot}")
    if lm.limit is not None and lm.limit <= 0:
        raise ConfigError(f"eval.lm_eval.limit: examples per task (>= 1) or a fraction (< 1), got {lm.limit}")
    if not lm.include_path or (demo_include_path(cfg) == lm.include_path and not Path(lm.include_path).is_dir()):
        return
    if not Path(lm.include_path).expanduser().is_dir():
        raise ConfigError(f"eval.lm_eval.include_path: {lm.include_path!r} is not a directory (of task YAMLs)")
    try:
        local_tasks(lm.include_path)
    except EvalError as e:
        raise ConfigError(str(e)) from None
