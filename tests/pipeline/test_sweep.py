"""`atkd sweep`: the sweep file's checks, the plan (one cache per teacher, one demo build per demo
setting), and a reduced sweep end to end through the CLI, killed and continued."""

import json
import re
import signal
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.sweep import load_sweep, plan

CONFIG = {
    "run_dir": "unused",
    "demo": {"enabled": True, "teacher": {"hidden_size": 128}},
    "students": [
        {"name": "base", "model": "some/base"},
        {"name": "kd", "init_from": "base", "loss": {"kind": "kd"}},
        {"name": "atkd", "init_from": "base", "loss": {"kind": "atkd"}},
    ],
}


def write_sweep(tmp_path: Path, **sweep) -> Path:
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(CONFIG))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"config": "pipeline.yaml", "out_dir": str(tmp_path / "out"), "seeds": [0, 1],
                                    **sweep}))
    return path


@pytest.mark.parametrize("sweep, message", [
    ({"students": ["kd", "atdk"]}, r"students: no student named 'atdk' in .*pipeline.yaml .*students: base, kd, atkd"),
    ({"teachers": [{"name": "t", "students": ["nope"]}]}, r"teachers\[0\].students: no student named 'nope'"),
    ({"baseline": "sft"}, r"baseline: no student named 'sft'"),
    ({"variants": [{"name": "v", "from": "akd"}]}, r"variants\[0\].from: 'akd' is not a student of"),
    ({"variants": [{"name": "kd", "from": "atkd"}]}, r"variants\[0\].name: 'kd' is already a student"),
    ({"variants": [{"name": "v", "from": "atkd", "sett": {}}]}, r"variants\[0\]: unknown key\(s\) 'sett'"),
    ({"teachers": [{"name": "a"}, {"name": "a"}]}, r"teachers\[1\].name: duplicate teacher name 'a'"),
    ({"teachers": [{"name": "../x"}]}, r"teachers\[0\].name: '../x' is not a valid name"),
    ({"seeds": [0, 0]}, r"seeds: expected a list of distinct integers"),
    ({"seed": [1]}, r"unknown key\(s\) 'seed'"),
])
def test_bad_sweep_files_say_what_and_where(tmp_path, sweep, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_sweep(tmp_path, **sweep))


def test_cli_says_what_is_wrong(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["sweep"]) == 2
    assert "give the sweep file" in capsys.readouterr().err
    assert main(["sweep", str(write_sweep(tmp_path, students=["atdk"])), "--dry-run"]) == 2
    assert "no student named 'atdk'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def test_bad_override_names_the_teacher(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, teachers=[{"name": "t8", "set": {"teacher.top_kk": 8}}]))
    with pytest.raises(ConfigError, match=r"sweep.yaml: teacher 't8'.*teacher: unknown key\(s\) 'top_kk'"):
        plan(spec)
    spec = load_sweep(write_sweep(tmp_path, variants=[{"name": "v", "from": "atkd", "set": {"loss.hard_ratio": 2}}]))
    with pytest.raises(ConfigError, match=r"teacher 'default'.*hard_ratio: must be in \[0, 1\]"):
        plan(spec)


def test_plan_shares_caches_per_teacher_and_demo_builds_per_demo_setting(tmp_path):
    spec = load_sweep(write_sweep(
        tmp_path, students=["kd"],
        variants=[{"name": "atkd-hr0.3", "from": "atkd", "set": {"loss.hard_ratio": 0.3}}],
        teachers=[{"name": "default"}, {"name": "top8", "set": {"teacher.top_k": 8}},
                  {"name": "small", "set": {"demo.teacher": {"hidden_size": 64}}, "students": ["atkd-hr0.3"]}]))
    runs = {r.label: r.cfg for r in plan(spec)}
    out = tmp_path / "out"
    assert list(runs) == [f"{t}/seed-{s}" for t in ("default", "top8", "small") for s in (0, 1)]
    for label, cfg in runs.items():
        teacher, seed = label.split("/seed-")
        assert cfg.run_dir == str(out / "runs" / teacher / f"seed-{seed}")
        assert cfg.cache.path == str(out / "teachers" / teacher / "cache")
        assert cfg.eval.validation_cache == str(out / "teachers" / teacher / "cache-val")
        assert all(s.seed == int(seed) for s in cfg.students)
        # top8 changes only the cache's top_k: same demo data, tokenizer and teacher as default
        assert cfg.demo.dir == str(out / "demo" / ("small" if teacher == "small" else "default"))
        assert cfg.teacher.model == str(Path(cfg.demo.dir) / "teacher")
    assert [s.name for s in runs["default/seed-0"].students] == ["base", "kd"]  # kd's init_from comes along
    small = runs["small/seed-1"].students
    assert [s.name for s in small] == ["base", "atkd-hr0.3"]
    assert small[1].loss.hard_ratio == 0.3 and small[1].loss.kind == "atkd" and small[1].init_from == "base"
    assert runs["top8/seed-0"].teacher.top_k == 8 and runs["default/seed-0"].teacher.top_k != 8


def test_anchored_students_stay_independent(tmp_path):
    """pipeline.yaml shares optim blocks by YAML anchors: a variant's change must not reach its origin."""
    (tmp_path / "pipeline.yaml").write_text(
        "run_dir: x\ndemo: {enabled: true}\nstudents:\n"
        "  - {name: base, model: m, optim: &o {lr: 0.001}}\n"
        "  - {name: kd, init_from: base, loss: {kind: kd}, optim: *o}\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "config": "pipeline.yaml", "out_dir": str(tmp_path / "o"), "seeds": [3],
        "variants": [{"name": "kd-fast", "from": "kd", "set": {"optim.lr": 0.01}}]}))
    (run,) = plan(load_sweep(tmp_path / "s.yaml"))
    assert [(s.name, s.optim.lr, s.seed) for s in run.cfg.students] == [("base", 0.001, 3), ("kd", 0.001, 3),
                                                                        ("kd-fast", 0.01, 3)]


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_sweeps_plan(path):
    spec = load_sweep(path)
    runs = plan(spec)
    assert len(spec.seeds) >= 3 and len(runs) == len(spec.seeds) * len(spec.teachers)


# ---------------------------------------------------------------- end to end


@pytest.mark.integration
def test_sweep_end_to_end_killed_and_continued(tmp_path, monkeypatch):
    from tests.pipeline.test_run_demo import atkd, reduced_config

    cfg = reduced_config(tmp_path / "unused")
    cfg["students"] = cfg["students"][:2]  # base, kd: 4 steps each, a log line (a fault point hit) per step
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "config": "pipeline.yaml", "out_dir": "out", "seeds": [0, 1], "students": ["base", "kd"],
        "baseline": "base"}))
    out = tmp_path / "out"

    # Killed (SIGKILL) in seed 1's base student, after its step-2 checkpoint: seed 0 (8 steps) is finished.
    with monkeypatch.context() as env:
        env.setenv("ATKD_FAULT_POINT", "student.step:11")
        first = atkd("sweep", "sweep.yaml", cwd=tmp_path)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    runs = {r["label"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert runs["default/seed-0"]["finished"] and not runs["default/seed-1"]["finished"]
    assert "finished: 1 of 2" in (out / "report.md").read_text()  # the report so far: seed 0's runs

    second = atkd("sweep", "sweep.yaml", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout
    assert "run 1/2 default/seed-0: finished" in log
    assert "resuming base from step 2" in log  # seed 1's base continues from its checkpoint
    assert len(re.findall(r"stage two: training student", log)) == 2  # seed 1's base and kd, nothing of seed 0
    assert "stage one (training data)" not in log  # the teacher's cache was written once, in the first run

    results = json.loads((out / "results.json").read_text())
    cells = {(c["teacher"], c["model"]): c for c in results["cells"]}
    assert set(cells) == {("default", m) for m in ("base", "kd", "teacher")}
    for cell in cells.values():
        assert cell["seeds"] == [0, 1]
        for name in ("exact_match", "rouge_l", "perplexity", "kl_to_teacher", "top1_agreement", "ece"):
            m = cell["metrics"][name]
            assert m["lo"] <= m["mean"] + 1e-12 and m["mean"] <= m["hi"] + 1e-12, (name, m)
        assert cell["metrics"]["rouge_l"]["examples"] == 16 and cell["metrics"]["perplexity"]["examples"] == 1
    report = (out / "report.md").read_text()
    assert re.search(r"\| default \| kd \| 2 \| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", report)
    assert "## Against `base`" in report and "logical cores" in report and "seeds [0, 1]; finished: all 2" in report
    assert (out / "sweep.png").stat().st_size > 5000
    assert (out / "runs" / "default" / "seed-1" / "eval" / "kd.generations.jsonl").is_file()

    third = atkd("sweep", "sweep.yaml", cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "stage two" not in third.stdout and "stage one" not in third.stdout
    assert third.stdout.count(": finished (") == 2
    strip = lambda text: re.sub(r"wall time: .*|\| \d+ \|\n", "", text)  # noqa: E731
    assert strip((out / "report.md").read_text()) == strip(report)  # fixed bootstrap seed: the same report
