"""storage.files: the one atomic-write helper every layer uses."""

from __future__ import annotations

import os
import stat

import pytest

from storage import files


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_replaces_whole_files_with_the_usual_mode(tmp_path):
    old = os.umask(0o027)
    try:
        assert files.current_umask() == 0o027 and files.usual_mode() == 0o640
        target = tmp_path / "out.json"
        files.atomic_write(target, "é one\n")
        assert target.read_bytes() == "é one\n".encode() and _mode(target) == 0o640
        files.atomic_write(target, b"two")
        assert target.read_bytes() == b"two"
        with files.atomic_open(tmp_path / "rows.jsonl") as f:
            f.write("a\n")
            f.write("b\n")
        assert (tmp_path / "rows.jsonl").read_text() == "a\nb\n" and _mode(tmp_path / "rows.jsonl") == 0o640
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "rows.jsonl"]  # no temp files


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_open(target, "w") as f:
            f.write("half")
            raise RuntimeError("killed")
    seen = []

    def crash():
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        raise RuntimeError("crash point")

    with pytest.raises(RuntimeError, match="crash point"):
        files.atomic_write(target, b"new", before_replace=crash)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["keep.txt"]
    tmp_name = [n for n in seen[0] if n != "keep.txt"][0]
    assert tmp_name.startswith(f"keep.txt.partial-{os.getpid()}-")  # beside it; the pid names the writer
    with pytest.raises(ValueError):
        with files.atomic_open(target, "a"):
            pass


def test_usual_permissions_and_fsync_dir(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    for p in (tmp_path / "d" / "w.bin", tmp_path / "d" / "e" / "x.bin"):
        p.write_bytes(b"")
        os.chmod(p, 0o600)
    files.usual_permissions(tmp_path / "d")
    assert {_mode(tmp_path / "d" / "w.bin"), _mode(tmp_path / "d" / "e" / "x.bin")} == {files.usual_mode()}
    os.chmod(tmp_path / "d" / "w.bin", 0o600)
    files.usual_permissions(tmp_path / "d" / "w.bin")  # a single file
    assert _mode(tmp_path / "d" / "w.bin") == files.usual_mode()
    files.fsync_dir(tmp_path)
    files.fsync_dir(tmp_path / "missing")  # no error where it cannot
