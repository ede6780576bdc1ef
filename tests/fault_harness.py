"""Kill-and-resume harness shared by tests/test_faults.py and bench/fault_bench.py.

A *campaign* runs a real `atkd` command again and again on one run directory,
SIGKILLing each attempt at a chosen moment (a named crash point, see
storage/faults.py and tests/fault_launcher.py, or after a seeded random delay),
until an attempt exits 0; the result is then compared bit for bit with an
uninterrupted run's.

Two ways to start an `atkd` process (both run `pipeline.cli.main` in a
process of its own, with its own pid, stderr and exit code):
- "subprocess": `python -m tests.fault_launcher ...` (= `python -m pipeline`
  plus the student crash points); about 10 s of imports per start.
- "fork": a child of a forkserver that has torch and transformers imported
  already (tests/fault_launcher.py), about 1 s per start; the default run uses
  it so that several kills fit in its time budget.
Every process runs with one thread (OMP_NUM_THREADS=1), so runs are bit-comparable.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
TOP_K = 8
STUDENT_INIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=32, max_position_embeddings=128)
BASE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONHASHSEED": "0", "ATKD_FAULT_POINT": ""}

# Crash points of stage one (storage/shard.py, storage/fs.py) and stage two (tests/fault_launcher.py).
TEACHER_POINTS = ("shard.write", "shard.commit", "shard.committed", "fs.replace.manifest.json")
STUDENT_POINTS = ("student.step", "ckpt.model", "ckpt.optim", "ckpt.rename", "ckpt.renamed", "log.rewrite")


# ---------------------------------------------------------------- workspace


def write_config(path: Path, *, model: str, data: str, run_dir: str, cache: str, sequences_per_shard: int = 5,
                 max_steps: int = 12, checkpoint_every: int = 2, extra: dict | None = None) -> Path:
    """A pipeline.yaml for the tiny teacher (transformers engine) and one atkd student."""
    cfg = {
        "run_dir": run_dir,
        "data": {"path": data, "max_seq_len": 64},
        "teacher": {"model": model, "backend": "transformers", "top_k": TOP_K, "dtype": "float32",
                    "device": "cpu", "batch_tokens": 256},
        "cache": {"path": cache, "sequences_per_shard": sequences_per_shard},
        "students": [{
            "name": "s1", "init": dict(STUDENT_INIT),
            "loss": {"kind": "atkd", "chunk_size": 16, "ce_weight": 0.1},
            "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": max_steps, "batch_size": 4, "grad_accum": 2},
            "checkpoint_every": checkpoint_every, "keep_checkpoints": 2, "seed": 0,
        }],
    }
    for key, value in (extra or {}).items():
        cfg[key] = value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def make_workspace(root: Path, *, rows: int = 40) -> dict:
    """Tokenizer, tiny Llama teacher and data built from tests/fixtures.py (bench use)."""
    from tests import fixtures

    root = Path(root)
    tok = fixtures.make_tokenizer(root / "tokenizer")
    model = fixtures.make_tiny_llama(root / "teacher", tok, seed=0)
    data = fixtures.write_jsonl(root / "train.jsonl", fixtures.prompt_response_rows(rows))
    return {"root": root, "model": str(model), "data": str(data)}


# ---------------------------------------------------------------- starting atkd


def _env(extra: dict | None) -> dict:
    env = {**os.environ, **BASE_ENV, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


class AtkdProcess:
    """One running `atkd` command: kill(), wait() -> exit code, stderr text."""

    def __init__(self, argv: list[str], log_path: Path, *, env: dict | None = None, mode: str = "fork"):
        self.argv, self.log_path, self.mode = list(argv), Path(log_path), mode
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        if mode == "subprocess":
            self._log = open(self.log_path, "wb")
            self._proc = subprocess.Popen([sys.executable, "-m", "tests.fault_launcher", *argv], cwd=REPO,
                                          env=_env(env), stdout=self._log, stderr=subprocess.STDOUT)
            self.pid = self._proc.pid
        else:
            from tests import fault_launcher

            self._proc = _forkserver().Process(target=fault_launcher.child_main,
                                               args=(argv, {**BASE_ENV, **(env or {})}, str(self.log_path)))
            self._proc.start()
            self.pid = self._proc.pid

    def kill(self) -> bool:
        """SIGKILL unless it already ended; True if it was still running."""
        if self.poll() is not None:
            return False
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def poll(self) -> int | None:
        if self.mode == "subprocess":
            return self._proc.poll()
        return self._proc.exitcode

    def wait(self, timeout: float = 300.0) -> int:
        if self.mode == "subprocess":
            try:
                rc = self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                rc = self._proc.wait()
                raise TimeoutError(f"atkd {' '.join(self.argv)} ran past {timeout}s:\n{self.output()}")
            self._log.close()
            return rc
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            self.kill()
            self._proc.join()
            raise TimeoutError(f"atkd {' '.join(self.argv)} ran past {timeout}s:\n{self.output()}")
        return self._proc.exitcode

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


_SERVER = None


def _forkserver():
    """A forkserver context whose server imported tests.fault_launcher (torch, transformers) once."""
    global _SERVER
    if _SERVER is None:
        for key, value in BASE_ENV.items():  # inherited by the server, so by every child
            if key != "ATKD_FAULT_POINT":
                os.environ.setdefault(key, value)
        sys.path.insert(0, str(REPO)) if str(REPO) not in sys.path else None
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["tests.fault_launcher"])
        _SERVER = ctx
    return _SERVER


def run_atkd(argv, log_path, *, env=None, mode="fork", timeout=300.0) -> tuple[int, str]:
    proc = AtkdProcess(argv, log_path, env=env, mode=mode)
    rc = proc.wait(timeout)
    return rc, proc.output()


# ---------------------------------------------------------------- campaigns


@dataclass
class Counts:
    kills: int = 0  # attempts that were SIGKILLed
    resumes: int = 0  # attempts started on a run directory a killed attempt left behind
    mismatches: int = 0  # finished results that differ from the uninterrupted run
    attempts: int = 0
    missed: int = 0  # planned kills that came too late (the attempt had finished)
    notes: list[str] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        for name in ("kills", "resumes", "mismatches", "attempts", "missed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.notes += other.notes


def run_campaign(argv: list[str], kills: list, log_dir: Path, *, mode: str = "fork",
                 final_mode: str | None = None, timeout: float = 300.0) -> Counts:
    """Run `argv` once per planned kill, then once more to the end.

    Each kill is "point:N" (SIGKILL at the N-th hit of a crash point) or a
    float (SIGKILL after that many seconds). Raises if an attempt fails for
    any other reason, or if the last attempt does not exit 0.
    """
    counts = Counts()
    log_dir = Path(log_dir)
    for i, kill in enumerate(list(kills) + [None]):
        env = {"ATKD_FAULT_POINT": kill} if isinstance(kill, str) else {}
        attempt_mode = (final_mode or mode) if kill is None else mode
        proc = AtkdProcess(argv, log_dir / f"attempt-{i:02d}.log", env=env, mode=attempt_mode)
        counts.attempts += 1
        counts.resumes += i > 0
        if isinstance(kill, (int, float)):
            deadline = proc.started + float(kill)
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.kill()
        rc = proc.wait(timeout)
        if rc in (-signal.SIGKILL, 128 + signal.SIGKILL, -9):
            counts.kills += 1
            continue
        if rc != 0:
            raise RuntimeError(f"attempt {i} ({kill!r}) of atkd {' '.join(argv)} exited {rc}:\n{proc.output()[-4000:]}")
        if kill is not None:
            counts.missed += 1
            counts.notes.append(f"kill {kill!r} came after the run finished")
            break
    return counts


# ---------------------------------------------------------------- comparing results


def cache_snapshot(url: str) -> dict:
    """Everything a cache holds except timestamps and who wrote what: manifest
    fields, and per shard its group attributes and every decoded array."""
    import zarr

    root = Path(url)
    manifest = json.loads((root / "manifest.json").read_text())
    for key in ("created_at", "updated_at", "provenance"):  # when, where and by which engine version
        manifest.pop(key, None)
    shards = {}
    for path in sorted((root / "shards").glob("shard-*.zarr")):
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        attrs = {k: v for k, v in dict(group.attrs).items() if k not in ("written_at", "worker_id")}
        arrays = {name: np.asarray(group[name][...]) for name in sorted(group.array_keys())}
        shards[path.name] = {"attrs": attrs, "arrays": arrays}
    return {"manifest": manifest, "shards": shards}


def compare_caches(a: dict, b: dict) -> list[str]:
    """Differences between two cache_snapshot()s; [] when bit-identical."""
    diffs = []
    for key in sorted(set(a["manifest"]) | set(b["manifest"])):
        if a["manifest"].get(key) != b["manifest"].get(key):
            diffs.append(f"manifest.{key}: {a['manifest'].get(key)!r:.200} != {b['manifest'].get(key)!r:.200}")
    if sorted(a["shards"]) != sorted(b["shards"]):
        diffs.append(f"shards: {sorted(a['shards'])} != {sorted(b['shards'])}")
    for name in sorted(set(a["shards"]) & set(b["shards"])):
        sa, sb = a["shards"][name], b["shards"][name]
        if sa["attrs"] != sb["attrs"]:
            diffs.append(f"{name} attrs differ")
        for arr in sorted(set(sa["arrays"]) | set(sb["arrays"])):
            x, y = sa["arrays"].get(arr), sb["arrays"].get(arr)
            if x is None or y is None or x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                diffs.append(f"{name}/{arr} differs")
    return diffs


_VOLATILE = {"tokens_per_s", "step_s"}


def student_snapshot(out_dir: Path) -> dict:
    """Per-step log records (minus timings) and the final weights of a student."""
    from safetensors.numpy import load_file

    out = Path(out_dir)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    records = [{k: v for k, v in r.items() if k not in _VOLATILE} for r in records]
    weights = load_file(str(out / "final" / "model.safetensors"))
    return {"log": records, "weights": weights, "done": (out / "done.json").is_file()}


def compare_students(a: dict, b: dict) -> list[str]:
    diffs = []
    if not (a["done"] and b["done"]):
        diffs.append("done.json missing")
    steps_a, steps_b = [r["step"] for r in a["log"]], [r["step"] for r in b["log"]]
    if steps_a != steps_b:
        diffs.append(f"logged steps {steps_a} != {steps_b}")
    for ra, rb in zip(a["log"], b["log"]):
        if ra != rb:
            keys = sorted(k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k))
            diffs.append(f"step {ra.get('step')}: {', '.join(f'{k} {ra.get(k)!r} != {rb.get(k)!r}' for k in keys)}")
    if sorted(a["weights"]) != sorted(b["weights"]):
        diffs.append("final weight names differ")
    for name in sorted(set(a["weights"]) & set(b["weights"])):
        if a["weights"][name].tobytes() != b["weights"][name].tobytes():
            diffs.append(f"final weight {name} differs")
    return diffs


def random_kill_plan(rng: random.Random, points: tuple[str, ...], max_hit: int, n_points: int,
                     n_timed: int, max_delay: float) -> list:
    """n_points named crash points (each listed point at least once when n allows) and n_timed delays."""
    chosen = rng.sample(points, min(n_points, len(points)))
    chosen += [rng.choice(points) for _ in range(n_points - len(chosen))]
    plan: list = [f"{p}:{1 if p == 'log.rewrite' else rng.randint(1, max_hit)}" for p in chosen]  # one rewrite per run
    plan += [round(rng.uniform(0.5, max_delay), 2) for _ in range(n_timed)]
    rng.shuffle(plan)
    return plan
