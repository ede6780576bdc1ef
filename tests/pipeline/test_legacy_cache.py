"""A cache written before row-range shard plans: stage two reads it, stage one refuses it by name."""

from __future__ import annotations

import json
import shutil

from pipeline import cli
from tests.support import harness as fh


def test_old_cache_is_read_by_students_and_refused_by_the_teacher(tmp_path, capsys, tiny_llama_dir, train_jsonl):
    cfg = fh.write_config(tmp_path / "cfg.yaml", model=str(tiny_llama_dir), data=str(train_jsonl),
                          run_dir=str(tmp_path / "run"), cache=str(tmp_path / "run" / "cache"), max_steps=2)
    assert cli.main(["teacher", str(cfg)]) == 0
    # Rewrite the manifest as the previous version wrote it: plan by tokenised examples, an
    # identity with num_examples and a data fingerprint over the tokens (not comparable now).
    manifest_path = tmp_path / "run" / "cache" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    start = 0
    for entry in manifest["shard_plan"]:
        n = entry["row_end"] - entry["row_start"]
        entry.clear()
        entry.update(index=len([e for e in manifest["shard_plan"] if "example_start" in e]),
                     example_start=start, example_end=start + n)
        start += n
    ident = manifest["identity"]
    for key in ("num_rows", "data_format", "data_fields"):
        ident.pop(key)
    ident.update(num_examples=start, data_fingerprint="sha256:tokens-of-the-old-version")
    manifest_path.write_text(json.dumps(manifest))
    snapshot = fh.cache_snapshot(str(tmp_path / "run" / "cache"))

    capsys.readouterr()
    assert cli.main(["teacher", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "was written by an older atkd whose shard plan counts tokenised examples" in err
    assert "use a new cache.path or delete the old cache" in err

    assert cli.main(["student", str(cfg)]) == 0
    out = capsys.readouterr()
    assert "written by an older atkd: its data was not checked" in out.out + out.err
    assert (tmp_path / "run" / "students" / "s1" / "final").is_dir()
    assert fh.compare_caches(fh.cache_snapshot(str(tmp_path / "run" / "cache")), snapshot) == []
    shutil.rmtree(tmp_path / "run")
