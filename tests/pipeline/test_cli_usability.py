"""Issue 10 through the CLI: overrides anywhere (6), leftovers removed (9), quiet
output and a line-based progress bar off a terminal (10), `atkd inspect` (12) and
`--dry-run` (13). Real caches built by `atkd teacher` with the tiny Llama."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli
from tests.support import harness as fh
from tests.support.fixtures import atkd_here

REPO = Path(__file__).resolve().parents[2]




def atkd_subprocess(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **fh.BASE_ENV, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_llama_dir, train_jsonl):
    """A complete reference cache (8 shards of 5 sequences) written by `atkd teacher` in this process
    with one thread, as the `python -m pipeline` subprocesses below run (so their caches compare bit for bit)."""
    import torch

    root = tmp_path_factory.mktemp("usability")
    ws = {"root": root, "model": str(tiny_llama_dir), "data": str(train_jsonl)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["teacher", str(config(ws, "ref"))]) == 0
    finally:
        torch.set_num_threads(threads)
    ws["ref_cache"] = root / "ref" / "cache"
    ws["ref_snapshot"] = fh.cache_snapshot(str(ws["ref_cache"]))
    return ws


def config(ws, name: str, *, cache: str | None = None, **kw) -> Path:
    root = ws["root"]
    return fh.write_config(root / f"{name}.yaml", model=ws["model"], data=ws["data"], run_dir=str(root / name),
                           cache=cache or str(root / name / "cache"), **kw)


def copy_cache(ws, name: str) -> Path:
    dst = ws["root"] / name / "cache"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ws["ref_cache"], dst)
    return dst


def shard_counts(cache: Path) -> dict[str, int]:
    total = {"num_sequences": 0, "num_tokens": 0, "num_positions": 0}
    for z in sorted((cache / "shards").glob("shard-*.zarr")):
        counts = json.loads((z / "zarr.json").read_text())["attributes"]["counts"]
        for key in total:
            total[key] += counts[key]
    return total


# ---------------------------------------------------------------- 6: overrides anywhere


def test_overrides_after_the_student_option_are_accepted(ws, capsys):
    cfg = config(ws, "anywhere")
    rc, out = atkd_here(capsys, "student", str(cfg), "--student", "s1", "--dry-run", "students.s1.optim.max_steps=3")
    assert rc == 0, out
    assert "student s1 (atkd" in out and "would train 3 steps" in out
    rc, out = atkd_here(capsys, "student", "students.s1.optim.max_steps=5", "--student", "s1", str(cfg), "--dry-run")
    assert rc == 0, out
    assert "would train 5 steps" in out
    rc, out = atkd_here(capsys, "-v", "teacher", "--dry-run", str(cfg), "teacher.top_k=4")
    assert rc == 0 and "top-4 log-probs" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["student", str(cfg), "--student", "s1", "--bogus"])
    assert e.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.integration
def test_overrides_anywhere_through_python_m_pipeline(ws):
    cfg = config(ws, "anywhere-e2e")
    proc = atkd_subprocess("student", str(cfg), "--student", "s1", "students.s1.optim.max_steps=7", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "would train 7 steps" in proc.stdout


# ---------------------------------------------------------------- 10: quiet output, progress lines


@pytest.mark.integration
def test_teacher_output_is_concise_off_a_terminal(ws):
    """`atkd teacher` in a subprocess: stderr is a pipe there, as in CI or `| tee`."""
    proc = atkd_subprocess("teacher", str(config(ws, "concise")))
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "\r" not in err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) <= 12, err
    assert all(line.startswith(("[atkd]", "[teacher]")) for line in lines), err
    assert "[teacher] 8/8 shard (100%)" in err
    log = ws["root"] / "concise" / "logs" / "teacher.log"
    assert f"engine and library logs go to {log}" in err
    assert log.is_file()


def test_line_progress_prints_every_tenth_and_at_the_end():
    from stages.progress import LineProgress

    class Clock:
        t = 0.0

        def __call__(self):
            return self.t

    class Out:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return False

    clock, out = Clock(), Out()
    bar = LineProgress(total=100, desc="demo", unit="step", file=out, clock=clock)
    for _ in range(100):
        clock.t += 0.01
        bar.update(1)
        bar.set_postfix(loss="0.5")
    bar.close()
    lines = out.text.splitlines()
    assert len(lines) == 10 and "\r" not in out.text
    assert lines[0].startswith("[demo] 10/100 step (10%)") and lines[-1].startswith("[demo] 100/100 step (100%)")
    assert lines[0].endswith("| loss=0.5")
    slow = LineProgress(total=10_000, desc="slow", file=out, clock=clock)  # 10 s passed: one line
    clock.t += 11
    slow.update(1)
    assert out.text.splitlines()[-1].startswith("[slow] 1/10000 it (0%)")


def test_library_logs_go_to_the_stage_log_and_to_the_console_with_verbose(tmp_path, capsys):
    import logging

    from stages import logs

    for flag in (False, True):
        logs.set_verbose(flag)
        with logs.stage_log(tmp_path / f"v{int(flag)}", "teacher") as path:
            logging.getLogger("transformers.modeling_utils").warning("library says %s", flag)
            logging.getLogger("stages.student.model").warning("project says %s", flag)
        err = capsys.readouterr().err
        assert f"project says {flag}" in err
        assert (f"library says {flag}" in err) is flag
        text = path.read_text()
        assert f"library says {flag}" in text and f"project says {flag}" in text
    logs.set_verbose(False)
    assert os.environ.get(logs.ENV_FILE) is None  # restored for whatever runs next in this process


# ---------------------------------------------------------------- 12: inspect


def test_inspect_reports_counts_sizes_uncertainty_and_provenance(ws, capsys):
    import transformers
    import zarr

    cache = ws["ref_cache"]
    rc, out = atkd_here(capsys, "inspect", str(cache))
    assert rc == 0, out
    c = shard_counts(cache)
    assert "shards done 8/8" in out and f"teacher model {os.path.basename(ws['model'])!r}: top-8 log-probs" in out
    assert (f"{c['num_sequences']:,} sequences, {c['num_tokens']:,} tokens, {c['num_positions']:,} target positions"
            in out)
    assert "B per token" in out and "B per top-k entry (ids + log-probs)" in out
    gold, topk = [], []
    for z in sorted((cache / "shards").glob("shard-*.zarr")):
        g = zarr.open_group(str(z), mode="r")
        gold.append(np.asarray(g["target_logprobs"][...], dtype=np.float64))
        topk.append(np.asarray(g["topk_logprobs"][...], dtype=np.float64))
    unc = 1 - np.exp(np.concatenate(gold))
    assert f"over {unc.size:,} positions from all 8 complete shards" in out
    mass = np.exp(np.concatenate(topk)).sum(1).mean()
    assert f"mean top-8 mass (sum of p over the top-k per position): {mass:.4f}" in out
    bins = np.bincount(np.clip((unc * 10).astype(int), 0, 9), minlength=10)
    rows = [line for line in out.splitlines() if line.startswith("    0.") and "%" in line]
    assert len(rows) == 10
    for i, (row, n) in enumerate(zip(rows, bins)):
        assert row.startswith(f"    {i / 10:.1f}-{(i + 1) / 10:.1f}") and row.endswith(f"{n / unc.size:6.1%} ({n:,})")
        assert ("#" in row) == (n > 0)
    prov = json.loads((cache / "manifest.json").read_text())["provenance"]
    assert prov["teacher_model"] == os.path.abspath(ws["model"])
    assert prov["engine"] == "transformers" and prov["engine_version"] == transformers.__version__
    assert prov["finished_at"] >= prov["started_at"] and prov["hosts"]
    assert f"engine_version: {transformers.__version__}" in out and f"teacher_model: {prov['teacher_model']}" in out


def test_inspect_samples_shards_and_reads_a_config(ws, capsys):
    cfg = config(ws, "inspect-cfg", cache=str(ws["ref_cache"]))
    rc, out = atkd_here(capsys, "inspect", str(cfg), "--shards", "2")
    assert rc == 0, out
    assert "from a sample of 2 of 8 complete shards (shards 0, 7; --shards N reads more)" in out


def test_old_manifest_without_provenance_still_reads(ws, capsys):
    from storage.cache import Cache

    cache = copy_cache(ws, "old-manifest")
    before = Cache.open(str(cache)).fingerprint
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["provenance"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert Cache.open(str(cache)).fingerprint == before  # provenance is not identity
    rc, out = atkd_here(capsys, "inspect", str(cache))
    assert rc == 0 and "provenance: none recorded" in out
    rc, _ = atkd_here(capsys, "verify", str(cache))
    assert rc == 0
    rc, err = atkd_here(capsys, "teacher", str(config(ws, "old-manifest", cache=str(cache))))
    assert rc == 0, err
    assert fh.compare_caches(fh.cache_snapshot(str(cache)), ws["ref_snapshot"]) == []


def test_provenance_updates_keep_what_other_workers_wrote(ws):
    from storage.cache import Cache

    cache = copy_cache(ws, "prov-merge")
    a, b = Cache.open(str(cache)), Cache.open(str(cache))
    a.update_provenance({"note_a": 1})
    b.update_provenance({"note_b": 2})
    b.refresh_manifest()
    prov = json.loads((cache / "manifest.json").read_text())["provenance"]
    assert prov["note_a"] == 1 and prov["note_b"] == 2 and "engine" in prov


def test_inspect_of_a_missing_cache_says_what_to_do(tmp_path, capsys):
    rc, err = atkd_here(capsys, "inspect", str(tmp_path / "nothing"))
    assert rc == 1 and "manifest.json does not exist. Run the teacher stage" in err


# ---------------------------------------------------------------- 13: dry run


def test_dry_run_says_what_would_run_and_writes_nothing(ws, capsys):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = config(ws, "dry")
    rc, out = atkd_here(capsys, "run", str(cfg), "--dry-run")
    assert rc == 0, out
    assert not (ws["root"] / "dry").exists()  # no run dir, no cache, no config.yaml, no logs
    c = shard_counts(ws["ref_cache"])
    assert "data " + ws["data"] + ": 40 rows" in out
    assert "shards: 8 of up to 5 sequences" in out
    assert (f"tokens ~{c['num_tokens']:,}, target positions ~{c['num_positions']:,} (scaled from 40 rows tokenised)"
            in out)
    size = c["num_positions"] * 8 * 2.5 + c["num_positions"] * 4 + c["num_tokens"] * 4
    assert f"estimated cache size ~{size / 1024:,.1f} KiB (an estimate" in out
    torch.manual_seed(0)
    real = LlamaForCausalLM(LlamaConfig(vocab_size=512, **fh.STUDENT_INIT))
    params = sum(p.numel() for p in set(real.parameters()))
    assert f"student s1 (atkd, {params / 1e6:,.2f}M parameters): would train 12 steps" in out
    assert "evaluation: would run" in out


def test_dry_run_names_the_stages_already_done(ws, capsys):
    cfg = config(ws, "dry-done", cache=str(ws["ref_cache"]))
    rc, out = atkd_here(capsys, "teacher", str(cfg), "--dry-run")
    assert rc == 0, out
    assert f"teacher cache {ws['ref_cache']}: complete" in out
    done = ws["root"] / "dry-done" / "students" / "s1"
    done.mkdir(parents=True)
    (done / "done.json").write_text(json.dumps({"steps": 12}))
    rc, out = atkd_here(capsys, "student", str(cfg), "--dry-run")
    assert rc == 0 and "student s1 (atkd" in out and "): done" in out


# ---------------------------------------------------------------- 9: leftovers of killed writers


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.integration
def test_teacher_removes_partial_shards_no_live_writer_owns(ws, capsys):
    from storage.cache import Cache

    cache = copy_cache(ws, "partials")
    shards = cache / "shards"
    shutil.rmtree(shards / "shard-00003.zarr")
    Cache.open(str(cache)).refresh_manifest()  # as if shard 3 was never committed
    # Killed writers: one of a shard that is complete by now, one of a shard nobody holds.
    shutil.copytree(ws["ref_cache"] / "shards" / "shard-00001.zarr", shards / "shard-00001.zarr.partial-0a1b2c")
    shutil.copytree(ws["ref_cache"] / "shards" / "shard-00003.zarr", shards / "shard-00003.zarr.partial-3d4e5f")
    rc, report = atkd_here(capsys, "verify", str(cache))
    assert rc == 0 and "2 leftover partial shard directories" in report
    proc = atkd_subprocess("teacher", str(config(ws, "partials", cache=str(cache))))  # one thread, like ws's
    rc, err = proc.returncode, proc.stderr
    assert rc == 0, err
    assert "removed 2 leftover partial shard directories of interrupted writers" in err
    assert f"{shards}/shard-00003.zarr.partial-3d4e5f" in err
    assert sorted(p.name for p in shards.iterdir()) == [f"shard-{i:05d}.zarr" for i in range(8)]
    assert fh.compare_caches(fh.cache_snapshot(str(cache)), ws["ref_snapshot"]) == []


def test_a_partial_under_a_live_lease_is_kept(ws):
    from storage import lease as leases
    from storage.cache import Cache

    cache_dir = copy_cache(ws, "partials-live")
    shutil.rmtree(cache_dir / "shards" / "shard-00004.zarr")
    partial = cache_dir / "shards" / "shard-00004.zarr.partial-beef"
    shutil.copytree(ws["ref_cache"] / "shards" / "shard-00004.zarr", partial)
    cache = Cache.open(str(cache_dir))
    lease = leases.try_acquire(cache.fs, 4, "live-writer", lease_seconds=600)  # this (live) process
    assert cache.remove_stale_partials() == [] and partial.is_dir()
    lease.release()
    assert cache.remove_stale_partials() == [str(partial)] and not partial.exists()


@pytest.mark.integration
def test_student_start_removes_partials_of_dead_processes_only(ws):
    cfg = config(ws, "ckpt-partials", cache=str(ws["ref_cache"]))
    out = ws["root"] / "ckpt-partials" / "students" / "s1"
    dead, live = _dead_pid(), os.getpid()
    (out / "checkpoints").mkdir(parents=True)
    stale = [out / f".final.partial-{dead}", out / "checkpoints" / f".step_000002.partial-{dead}-0badc0de"]
    for d in stale + [out / f".final.partial-{live}"]:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    (out / f"done.json.partial-{dead}").write_text("{")
    stale.append(out / f"done.json.partial-{dead}")
    rc, log = fh.run_atkd(["student", str(cfg), "students.s1.optim.max_steps=2"], ws["root"] / "logs" / "ckpt.log")
    assert rc == 0, log
    for p in stale:
        assert not p.exists() and f"removed {p} (left by an interrupted save whose process is gone)" in log
    assert (out / f".final.partial-{live}").is_dir()  # its process runs: not ours to delete
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.integration
@pytest.mark.vllm
def test_vllm_teacher_output_goes_to_the_stage_log(ws):
    """vLLM's ~60 start-up lines (its engine core is a child process) land in logs/teacher.log."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    cfg = config(ws, "vllm-quiet")
    proc = atkd_subprocess("teacher", str(cfg), "teacher.backend=vllm")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "\r" not in proc.stderr and "Traceback" not in proc.stderr
    assert all(line.startswith(("[atkd]", "[teacher]")) for line in lines), proc.stderr
    assert "[teacher] 8/8 shard (100%)" in proc.stderr
    log = (ws["root"] / "vllm-quiet" / "logs" / "teacher.log").read_text()
    assert "Initializing a V1 LLM engine" in log and log.count("vllm[") >= 10
    prov = json.loads((ws["root"] / "vllm-quiet" / "cache" / "manifest.json").read_text())["provenance"]
    import vllm

    assert prov["engine"] == "vllm" and prov["engine_version"] == vllm.__version__


def test_inspect_and_verify_refuse_bad_arguments_with_a_clear_message(ws, capsys):
    rc, err = atkd_here(capsys, "inspect", str(ws["ref_cache"]), "--shards", "-1")
    assert rc == 1 and "--shards must be >= 0, got -1" in err
    rc, err = atkd_here(capsys, "verify", str(ws["ref_cache"]), "teacher.top_k=4")
    assert rc == 2 and "overrides ['teacher.top_k=4'] only apply to a config file" in err
