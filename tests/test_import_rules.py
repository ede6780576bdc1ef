"""Who may import whom: every module of pipeline/, stages/ and storage/ against the rules block of
docs/architecture.md ("Who may import whom"), and the checker itself against a deliberate violation."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "storage")
# Every package under stages/ is a layer of its own (a new one needs a rule: test_rules_name_every_layer).
SUBPACKAGE_LAYERS = tuple(f"stages/{d.name}" for d in sorted((ROOT / "stages").iterdir())
                          if (d / "__init__.py").is_file())


def read_rules(text: str) -> dict[str, set[str]]:
    """{layer: layers it may import} from the ```imports block (`layer -> a, b`)."""
    block = text.split("```imports", 1)[1].split("```", 1)[0]
    rules = {}
    for line in block.strip().splitlines():
        layer, _, allowed = line.partition("->")
        rules[layer.strip()] = {a.strip() for a in allowed.split(",") if a.strip()}
    return rules


def layer_of(module: str) -> str | None:
    """`stages.teacher.capture` -> "stages/teacher", `stages.data` -> "stages", `torch` -> None."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    if parts[0] == "stages" and len(parts) > 1 and f"stages/{parts[1]}" in SUBPACKAGE_LAYERS:
        return f"stages/{parts[1]}"
    return parts[0]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from stages import data` names stages.data; `from stages.x import y` names stages.x
            found += [(node.lineno, f"{node.module}.{a.name}" if node.module in PACKAGES else node.module)
                      for a in node.names]
    return found


def violations(root: Path, rules: dict[str, set[str]]) -> list[str]:
    """`path:line: <layer> imports <module> (<layer> may import: ...)` for every import the rules forbid."""
    bad = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root)
            own = layer_of(".".join(rel.with_suffix("").parts))
            for line, module in imported_modules(path):
                other = layer_of(module)
                if other is None or other == own or other in rules[own]:
                    continue
                allowed = ", ".join(sorted(rules[own])) or "nothing of atkd"
                bad.append(f"{rel}:{line}: {own} imports {module} ({own} may import: {allowed})")
    return bad


def _rules() -> dict[str, set[str]]:
    return read_rules((ROOT / "docs" / "architecture.md").read_text())


def test_rules_name_every_layer():
    layers = {layer_of(".".join(p.relative_to(ROOT).with_suffix("").parts))
              for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    assert set(_rules()) == layers
    assert all(re.fullmatch(r"[a-z]+(/[a-z]+)?", a) and a in layers for allowed in _rules().values() for a in allowed)


def test_every_module_follows_the_import_rules():
    assert violations(ROOT, _rules()) == []


def test_the_stages_import_none_of_each_other():
    rules = _rules()
    for a in ("stages/teacher", "stages/student", "stages/demo", "stages/eval"):
        assert not rules[a] & {"stages/teacher", "stages/student", "stages/demo", "stages/eval"}, a


def test_a_teacher_module_importing_the_student_is_caught(tmp_path):
    """The checker fails on a deliberate violation: a copy of a real teacher module plus one import."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    teacher = tmp_path / "stages" / "teacher"
    teacher.mkdir()
    source = (ROOT / "stages" / "teacher" / "finetune.py").read_text()
    (teacher / "finetune.py").write_text(source)
    assert violations(tmp_path, _rules()) == []
    violation = "\n\ndef train():\n    from stages.student.trainer import train_student\n"
    (teacher / "finetune.py").write_text(source + violation)
    bad = violations(tmp_path, _rules())
    assert len(bad) == 1 and "stages/teacher imports stages.student.trainer" in bad[0], bad
    assert bad[0].startswith("stages/teacher/finetune.py:")
    (teacher / "capture.py").write_text("from stages import student\n")
    assert any("stages/teacher imports stages.student" in b for b in violations(tmp_path, _rules()))
