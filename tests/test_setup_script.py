"""scripts/setup.sh prints one line per step; pip's output goes to .venv/setup.log, its tail on failure."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A stand-in interpreter: `-m venv DIR` makes DIR/bin/python, a "pip" that prints 50
# lines and then succeeds, or fails when its arguments contain FAIL_ON.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "--version" ]; then echo "Python 3.11.0"; exit 0; fi
mkdir -p "$3/bin"
cat > "$3/bin/python" <<'X'
#!/usr/bin/env bash
for i in $(seq 1 50); do echo "pip says $i"; done
case "$*" in *"$FAIL_ON"*) [ -n "$FAIL_ON" ] && {
  echo "ERROR: no matching distribution for $FAIL_ON" >&2; exit 1; } ;; esac
exit 0
X
chmod +x "$3/bin/python"
"""


def run_setup(tmp_path: Path, fail_on: str = "") -> subprocess.CompletedProcess:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    fake = tmp_path / "fakepython"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "FAIL_ON": fail_on}
    return subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)


def test_setup_prints_a_line_per_step_and_logs_pip(tmp_path):
    p = run_setup(tmp_path)
    assert p.returncode == 0, p.stderr
    out = (p.stdout + p.stderr).splitlines()
    assert all(line.startswith("[setup]") for line in out), out
    assert len(out) <= 7 and "pip says" not in p.stdout
    assert (tmp_path / ".venv" / "setup.log").read_text().count("pip says 50") >= 3


def test_setup_shows_the_log_tail_when_a_step_fails(tmp_path):
    p = run_setup(tmp_path, fail_on="-e .")  # the atkd install step, on GPU and CPU machines alike
    assert p.returncode == 1
    assert "[setup] FAILED: " in p.stderr and "installing atkd with" in p.stderr
    assert "ERROR: no matching distribution for -e ." in p.stderr and "pip says 50" in p.stderr
    assert "pip says 1\n" not in p.stderr  # only the tail
    assert not (tmp_path / ".venv" / ".atkd-installed").exists()
