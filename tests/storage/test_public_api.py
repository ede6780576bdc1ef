"""storage/ uses only the public API of its dependencies (zarr, fsspec, numcodecs ...).

zarr documents ``zarr.core`` as private ("should not be imported directly by
3rd-party code") and, like every Python package, modules and names starting
with an underscore. Private modules change between minor releases, so the
cache format's reader and writer must not depend on them.
"""

from __future__ import annotations

import ast
from pathlib import Path

STORAGE = Path(__file__).resolve().parents[2] / "storage"


def _private_uses(path: Path) -> list[str]:
    """'file:line: what' for every import of zarr.core or of an underscore module/name of
    another package, and every attribute chain such as ``zarr.storage._fsspec``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def bad_module(module: str) -> bool:
        parts = module.split(".")
        if parts[0] in ("storage", "__future__"):
            return False  # our own modules may use their own private helpers
        return module == "zarr.core" or module.startswith("zarr.core.") or any(p.startswith("_") for p in parts)

    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # report whole chains once
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if bad_module(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if bad_module(node.module):
                found.append(f"{where}: from {node.module} import ...")
            elif node.module.split(".")[0] != "storage":
                found += [f"{where}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") or bad_module(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Attribute) and id(node) not in inner:
            chain, cur = [node.attr], node.value
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in ("zarr", "fsspec", "numcodecs"):
                dotted = ".".join([cur.id, *reversed(chain)])
                if bad_module(dotted):
                    found.append(f"{where}: {dotted}")
    return found


def test_storage_imports_no_private_module_of_a_dependency():
    files = sorted(STORAGE.glob("*.py"))
    assert files, STORAGE
    found = [use for f in files for use in _private_uses(f)]
    assert found == [], "storage/ must use public APIs only:\n" + "\n".join(found)


def test_the_check_catches_what_it_should(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import zarr\nfrom zarr.core.sync import sync\nimport zarr.storage._fsspec\n"
                     "from zarr.storage import _fsspec\nx = zarr.storage._fsspec._make_async\n"
                     "from zarr.core import sync as s\nfrom storage.shard import _chunks\n")
    assert sorted(_private_uses(probe)) == [
        "probe.py:2: from zarr.core.sync import ...", "probe.py:3: import zarr.storage._fsspec",
        "probe.py:4: from zarr.storage import _fsspec", "probe.py:5: zarr.storage._fsspec._make_async",
        "probe.py:6: from zarr.core import ..."]
