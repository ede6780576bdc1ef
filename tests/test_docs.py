"""The docs stand alone and match the code: every module is listed, no missing file is cited."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "storage")


def _listed_modules() -> set[str]:
    """Paths of the module tree in docs/architecture.md's "Modules" block (indent = depth)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Modules", 1)[1].split("```", 2)[1]
    listed, parents = set(), {}
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m:
            continue
        depth, name = len(m.group(1)) // 2, m.group(2)
        prefix = "/".join(parents[d] for d in range(depth))
        if name.endswith("/"):
            parents[depth] = name.rstrip("/")
        elif name.endswith(".py"):
            listed.add(f"{prefix}/{name}" if prefix else name)
    return listed


def test_architecture_lists_every_module():
    actual = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
              if p.name != "__init__.py" and "__pycache__" not in p.parts}
    listed = _listed_modules()
    assert sorted(actual - listed) == [], "modules missing from docs/architecture.md"
    assert sorted(listed - actual) == [], "docs/architecture.md lists modules that do not exist"


def test_cited_docs_exist():
    cited = set()
    for pkg in (*PACKAGES, "docs", "README.md"):
        paths = [ROOT / pkg] if pkg.endswith(".md") else [*(ROOT / pkg).rglob("*.py"), *(ROOT / pkg).rglob("*.md")]
        for p in paths:
            text = p.read_text()
            assert "DESIGN.md" not in text, f"{p} cites DESIGN.md, which is not in the repository"
            cited |= set(re.findall(r"docs/[\w.-]+\.md", text))
    assert cited, "nothing cites docs/"
    assert sorted(c for c in cited if not (ROOT / c).is_file()) == []
