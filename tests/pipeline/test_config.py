"""Typed config: defaults, errors that name the key path, overrides."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, PipelineConfig, load_config, save_resolved

REPO = Path(__file__).resolve().parents[2]

MINIMAL = {
    "run_dir": "runs/x",
    "data": {"path": "train.jsonl"},
    "teacher": {"model": "t", "top_k": 8},
    "students": [
        {"name": "kd", "model": "s", "loss": {"kind": "kd"}},
        {"name": "atkd", "init": {"model_type": "llama", "hidden_size": 64}, "optim": {"lr": 1e-3}},
    ],
}


def write(tmp_path, data) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_minimal_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert isinstance(cfg, PipelineConfig)
    assert cfg.teacher.top_k == 8 and cfg.teacher.backend == "auto"
    assert cfg.student("atkd").optim.lr == 1e-3
    assert cfg.student("atkd").loss.kind == "atkd" and cfg.student("atkd").loss.easy_weight == 0.2
    assert cfg.student("kd").loss.kind == "kd"


def test_repo_pipeline_yaml_is_valid():
    cfg = load_config(REPO / "pipeline.yaml")
    assert cfg.students, "the embedded default must list students"
    kinds = {s.loss.kind for s in cfg.students}
    assert {"sft", "kd", "atkd"} <= kinds
    # the demo's teacher knows more than the students' distillation data (its own, larger pool)
    assert cfg.demo.teacher_train_examples > cfg.demo.train_examples


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["teacher"].update(topk=3), "teacher: unknown key(s) 'topk'"),
        (lambda d: d["teacher"].update(top_k="many"), "teacher.top_k: expected an integer"),
        (lambda d: d["teacher"].update(top_k=0), "teacher.top_k: must be > 0"),
        (lambda d: d["students"][1]["optim"].update(lr="fast"), "students[1].optim.lr: expected a number"),
        (lambda d: d["students"][0]["loss"].update(kind="magic"), "students[0].loss.kind: 'magic' is not one of"),
        (lambda d: d["students"][0].pop("model"), "students[0] (kd): set exactly one of `model`"),
        (lambda d: d["students"][1].update(init_from="kd"), "students[1] (atkd): set exactly one of"),
        (lambda d: d["students"][0].update(init_from="atkd", model=""),
         "students[0].init_from: 'atkd' is not a student listed before"),
        (lambda d: d["students"][0].update(name="../evil"), "students[0].name: '../evil' is not a valid name"),
        (lambda d: d["students"][1].update(name="kd"), "duplicate student name 'kd'"),
        (lambda d: d.update(extra=1), "top level: unknown key(s) 'extra'"),
        (lambda d: d["data"].update(max_seq_len=True), "data.max_seq_len: expected an integer"),
        (lambda d: d.update(demo={"teacher_train_examples": -1}), "demo.teacher_train_examples: must be >= 0"),
        (lambda d: d.update(students={"kd": {}}), "students: expected a list"),
        (lambda d: d["students"][1]["init"].update(hiden_size=64),
         "students[1].init.hiden_size: not a field of LlamaConfig (did you mean hidden_size?)"),
        (lambda d: d["students"][1]["init"].update(num_attention_heads=3),
         "students[1].init: invalid LlamaConfig: The hidden size (64) is not a multiple of the number of "
         "attention heads (3)."),
        (lambda d: d["students"][1]["init"].update(hidden_size="big"),
         "students[1].init.hidden_size: invalid LlamaConfig: Field 'hidden_size' expected int"),
        (lambda d: d["students"][1]["init"].update(model_type="lama"),
         "students[1].init.model_type: 'lama' is not a transformers model type (did you mean llama?)"),
        (lambda d: d["students"][1]["init"].update(model_type="vit"),
         "students[1].init.model_type: 'vit' has no causal language model in transformers"),
    ],
)
def test_bad_config_names_the_key(tmp_path, mutate, expected):
    import copy

    data = copy.deepcopy(MINIMAL)
    mutate(data)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, data))
    assert expected in str(e.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "teacher:\n  model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"pipeline.yaml line 3, column 1: YAML syntax error: expected ',' or ']'"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_by_path_name_and_index(tmp_path):
    p = write(tmp_path, MINIMAL)
    cfg = load_config(p, ["teacher.top_k=32", "students.atkd.optim.lr=3e-4", "students.0.loss.kind=sft",
                          "data.limit=10", "teacher.backend=transformers"])
    assert cfg.teacher.top_k == 32
    assert cfg.student("atkd").optim.lr == 3e-4
    assert cfg.students[0].loss.kind == "sft"
    assert cfg.data.limit == 10 and cfg.teacher.backend == "transformers"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("teacher.top_k", "expected key.path=value"),
        ("=3", "empty key path"),
        ("teacher..top_k=3", "empty key path"),
        ("students.nobody.optim.lr=1", "no list item with index or name 'nobody'"),
        ("teacher.top_k=[1", "not valid YAML"),
        ("teacher.top_k=abc", "teacher.top_k: expected an integer"),
        ("teacher.bogus=1", "teacher: unknown key(s) 'bogus'"),
    ],
)
def test_bad_overrides(tmp_path, override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, MINIMAL), [override])
    assert expected in str(e.value)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["teacher.top_k=16"])
    out = tmp_path / "run" / "config.yaml"
    save_resolved(cfg, out)
    again = load_config(out)
    assert again == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.teacher.model and cfg.students


def test_paths_derive_from_run_dir(tmp_path):
    cfg = load_config(REPO / "pipeline.yaml", ["run_dir=elsewhere/run1"])
    assert cfg.cache.path == "elsewhere/run1/cache"
    assert cfg.data.path == "elsewhere/run1/data/train.jsonl"
    assert cfg.teacher.model == "elsewhere/run1/teacher"
    assert cfg.eval.validation_path == "elsewhere/run1/data/validation.jsonl"
    mine = load_config(REPO / "pipeline.yaml", ["data.path=my.jsonl", "cache.path=s3://b/c"])
    assert mine.data.path == "my.jsonl" and mine.cache.path == "s3://b/c"


def test_answer_rule_follows_the_demo_unless_set(tmp_path):
    """eval.answer_rule auto: the demo's answer check with demo.enabled, the whole response otherwise."""
    from pipeline.evaluation import answer_rule, report_sections

    demo = load_config(REPO / "pipeline.yaml", [f"run_dir={tmp_path}"])
    assert demo.demo.enabled and demo.eval.answer_rule == "demo"
    assert type(answer_rule(demo)).__name__ == "DemoAnswer"
    assert report_sections(demo) == [""]  # the demo teacher is not trained in tmp_path
    plain = load_config(write(tmp_path, MINIMAL))
    assert plain.eval.answer_rule == "exact" and answer_rule(plain) is None and report_sections(plain) == []
    assert load_config(REPO / "pipeline.yaml", ["eval.answer_rule=exact"]).eval.answer_rule == "exact"
    assert load_config(write(tmp_path, MINIMAL), ["eval.answer_rule=demo"]).eval.answer_rule == "demo"
    with pytest.raises(ConfigError, match="eval.answer_rule: 'fuzzy' is not one of"):
        load_config(write(tmp_path, MINIMAL), ["eval.answer_rule=fuzzy"])


def test_missing_data_path_and_teacher_are_named(tmp_path):
    data = {k: v for k, v in MINIMAL.items() if k != "data"}
    with pytest.raises(ConfigError, match="data.path: set the training data"):
        load_config(write(tmp_path, data))
    data = dict(MINIMAL, teacher={"top_k": 8})
    with pytest.raises(ConfigError, match="teacher.model: set"):
        load_config(write(tmp_path, data))


def test_valid_inits_of_other_model_types_load(tmp_path):
    data = dict(MINIMAL, students=[
        {"name": "gpt2", "init": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2}},
        {"name": "alias", "init": {"model_type": "gpt2", "hidden_size": 64, "num_attention_heads": 2}},
        {"name": "llama", "init": {"hidden_size": 64, "num_attention_heads": 2, "tie_word_embeddings": True}},
    ])
    cfg = load_config(write(tmp_path, data))
    assert [s.name for s in cfg.students] == ["gpt2", "alias", "llama"]


def test_config_without_init_students_does_not_import_transformers(tmp_path):
    """Checking `init` needs transformers (seconds to import); other configs load without it."""
    import subprocess
    import sys

    data = dict(MINIMAL, students=[MINIMAL["students"][0]])
    code = ("import sys; from pipeline.config import load_config; load_config(sys.argv[1]); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(write(tmp_path, data))], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_optim_checks_are_the_same_for_students_and_the_teacher_fine_tune(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"students\[0\].optim.warmup_ratio: must be in \[0, 1\)"):
        load_config(path, ["students.0.optim.warmup_ratio=1.5"])
    with pytest.raises(ConfigError, match="teacher.finetune.optim.epochs: must be > 0"):
        load_config(path, ["teacher.finetune.enabled=true", "teacher.finetune.optim.epochs=0"])
    assert load_config(path, ["students.0.optim.warmup_ratio=0.03"]).students[0].optim.warmup_ratio == 0.03


def test_an_override_changes_one_student_where_yaml_anchors_share_a_setting(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("data: {path: x.jsonl}\nteacher: {model: t}\nstudents:\n"
                    "  - {name: a, init: {hidden_size: 64}, optim: &o {lr: 0.001}}\n"
                    "  - {name: b, init: {hidden_size: 64}, optim: *o}\n")
    cfg = load_config(path, ["students.b.optim.lr=0.01"])
    assert [s.optim.lr for s in cfg.students] == [0.001, 0.01]


def test_each_section_checks_itself():
    """Every section's dataclass has its own check(); pipeline/config.py calls them (and keeps the
    rules that join sections), so a section checked in code raises the same error as from YAML."""
    from pipeline.config import CacheConfig, DataConfig, DemoConfig, EvalConfig, LossConfig, OptimConfig, TeacherConfig

    for section in (DataConfig(path="x"), TeacherConfig(), CacheConfig(), EvalConfig(), DemoConfig()):
        section.check()
    with pytest.raises(ConfigError, match=r"^teacher\.top_k: must be > 0, got 0$"):
        TeacherConfig(top_k=0).check()
    with pytest.raises(ConfigError, match=r"^eval\.batch_size: must be > 0, got 0$"):
        EvalConfig(batch_size=0).check()
    with pytest.raises(ConfigError, match=r"^s\.optim: batch_size, grad_accum and max_steps must be > 0$"):
        OptimConfig(max_steps=0).check("s.optim")
    with pytest.raises(ConfigError, match=r"^s\.loss\.top_k: must be > 0"):
        LossConfig(top_k=0).check("s.loss")


@pytest.mark.parametrize("hard_ratio", [0.0, 1.0, 1.5, -0.1])
def test_hard_ratio_has_one_range_for_the_config_and_the_loss(tmp_path, hard_ratio):
    """loss.hard_ratio: the config and stages.student.losses accept and refuse the same values."""
    import torch

    from stages.student.losses import atkd_position_weights

    data = {**MINIMAL, "students": [{"name": "a", "model": "s", "loss": {"hard_ratio": hard_ratio}}]}
    ok = 0.0 <= hard_ratio <= 1.0
    args = (torch.log(torch.rand(6)), torch.ones(6, dtype=torch.bool))
    if ok:
        assert load_config(write(tmp_path, data)).student("a").loss.hard_ratio == hard_ratio
        atkd_position_weights(*args, hard_ratio=hard_ratio)
        return
    message = f"hard_ratio: must be in [0, 1], got {hard_ratio}"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data))
    assert str(info.value) == f"students[0].loss.{message}"
    with pytest.raises(ValueError) as info:
        atkd_position_weights(*args, hard_ratio=hard_ratio)
    assert str(info.value) == message


def test_a_students_top_k_is_at_most_what_stage_one_caches(tmp_path):
    data = {**MINIMAL, "students": [{"name": "a", "model": "s", "loss": {"kind": "kd", "top_k": 4}}]}
    assert load_config(write(tmp_path, data)).student("a").loss.top_k == 4
    data["students"][0]["loss"]["top_k"] = 9
    with pytest.raises(ConfigError, match=r"students\[0\]\.loss\.top_k: 9 is more than stage one caches "
                                          r"\(teacher\.top_k=8\)"):
        load_config(write(tmp_path, data))


def test_config_modules_import_each_other_in_one_direction():
    """The former circle pipeline.config <-> pipeline.model_config: model_config now takes ConfigError
    from stages.errors, below both."""
    import ast

    tree = ast.parse((REPO / "pipeline" / "model_config.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "pipeline.config" not in imported and "stages.errors" in imported
