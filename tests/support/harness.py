"""What bench/ and tests/ share: tiny hub-free models, tokenizers and data, and the kill harness.

tests/ import this module (tests/support/fixtures.py re-exports the builders), and so does bench/.

Builders: everything is built locally and saved with `save_pretrained`, so vLLM
and transformers load it from a directory like any hub model.

Kill harness: one way to SIGKILL a stage at a chosen moment, for stage one and
stage two alike. A process runs either the `atkd` CLI or a function; it is
killed at a named crash point (ATKD_FAULT_POINT, see storage/faults.py: the
code under test calls fault_point(name) there) or after a delay. A *campaign*
runs one `atkd` command again and again on one run directory, killing each
attempt, until one exits 0; the result is then compared bit for bit with an
uninterrupted run's.

Two ways to start a process (each has its own pid, output and exit code):
- "subprocess": `python -m pipeline ARGS`, the real entry point; ~10 s of imports.
- "fork": a child of a forkserver that imported torch, transformers and the
  pipeline once (FORK_PRELOAD), ~1 s per start; also runs functions (`call`).
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
from typing import Callable

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- builders


_WORDS = (
    "the a one two three red green blue cat dog bird fish runs jumps sees eats "
    "big small fast slow and or but not is are was were here there today now "
    "add sum of plus minus equals answer question please tell me what why how"
).split()


def generated_text(n: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences over a small word list (plus digits)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) if rng.random() > 0.15 else str(rng.randint(0, 99))
                 for _ in range(rng.randint(3, 14))]
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ""]))
    return lines


def make_tokenizer(out_dir: str | Path, vocab_size: int = 512, *, add_bos: bool = True, pad_is_eos: bool = True):
    """Train a byte-level BPE tokenizer on generated text, wrap it, save it.

    BOS is added by the tokenizer (TemplateProcessing) when `add_bos`; pad is the
    EOS token when `pad_is_eos` (the common Llama setup, and the case where a
    loss mask derived from token ids would wrongly drop EOS).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<unk>"] + ([] if pad_is_eos else ["<pad>"])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(generated_text(3000, seed=1) + ["### Instruction:\n### Response:\n"], trainer=trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", bos)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>" if pad_is_eos else "<pad>",
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out)
    return wrapped


def make_tiny_llama(
    out_dir: str | Path,
    tokenizer,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    head_dim: int = 64,
    seed: int = 0,
    init_std: float = 0.2,
    max_positions: int = 512,
    vocab: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
):
    """A random-weight LlamaConfig model saved (with its tokenizer) to `out_dir`.

    `vocab`: logits beyond the tokenizer's (default: exactly its size), e.g. 32000 to
    time a realistic head and sampling cost with a tiny tokenizer.
    head_dim >= 32 because vLLM's CPU attention kernels refuse 16. `init_std`
    is large on purpose so the next-token distributions are peaked rather than
    near-uniform: top-k orders are then well separated and comparable between
    engines.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return p


def prompt_response_rows(n: int, seed: int = 0) -> list[dict]:
    """Instruction rows of varied length (some long, for truncation tests)."""
    rng = random.Random(seed)
    prompts = generated_text(n, seed=seed + 10)
    responses = generated_text(n, seed=seed + 20)
    rows = []
    for i in range(n):
        resp = responses[i]
        if rng.random() < 0.2:
            resp = " ".join([resp] * rng.randint(2, 5))
        rows.append({"prompt": prompts[i], "response": " " + resp})
    return rows


# ---------------------------------------------------------------- workspace


TOP_K = 8
STUDENT_INIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=32, max_position_embeddings=128)
BASE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONHASHSEED": "0", "ATKD_FAULT_POINT": "", "ATKD_FAULT_TRACE": ""}

# Crash points (storage/faults.py) of stage one and of stage two.
TEACHER_POINTS = ("shard.write", "shard.commit", "shard.committed", "fs.replace.manifest.json")
STUDENT_POINTS = ("student.step", "ckpt.model", "ckpt.optim", "ckpt.rename", "ckpt.renamed", "log.rewrite")
KILLED = (-signal.SIGKILL, 128 + signal.SIGKILL)


def write_config(path: Path, *, model: str, data: str, run_dir: str, cache: str, sequences_per_shard: int = 5,
                 max_steps: int = 12, checkpoint_every: int = 2, extra: dict | None = None) -> Path:
    """A pipeline.yaml for the tiny teacher (transformers engine) and one atkd student."""
    cfg = {
        "run_dir": run_dir,
        "data": {"path": data, "max_seq_len": 64},
        "teacher": {"model": model, "backend": "transformers", "top_k": TOP_K, "dtype": "float32",
                    "device": "cpu", "batch_tokens": 256,
                    "overlap_writes": True},  # the background writer beside scoring, as on a GPU
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
    """Tokenizer, tiny Llama teacher and `rows` rows of data under `root`."""
    root = Path(root)
    tok = make_tokenizer(root / "tokenizer")
    model = make_tiny_llama(root / "teacher", tok, seed=0)
    data = write_jsonl(root / "train.jsonl", prompt_response_rows(rows))
    return {"root": root, "model": str(model), "data": str(data)}


def committed_shards(trace: Path) -> list[int]:
    """Shard indices in the order their commits were traced (ATKD_FAULT_TRACE), repeats included."""
    if not Path(trace).exists():
        return []
    out = []
    for line in Path(trace).read_text().splitlines():
        name, detail, _pid = line.split()
        if name == "shard.committed":
            out.append(int(detail.rsplit("shard-", 1)[1].split(".")[0]))
    return out


# ---------------------------------------------------------------- processes


def env_for(extra: dict | None = None) -> dict:
    """os.environ + BASE_ENV + `extra`, with the repository on PYTHONPATH: for `python -m pipeline`."""
    env = {**os.environ, **BASE_ENV, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


class Proc:
    """One running process: kill(), poll(), wait() -> exit code (-9 when SIGKILLed), output()."""

    def __init__(self, log_path: Path, *, env: dict | None = None, mode: str = "fork",
                 argv: list[str] | None = None, target: Callable | None = None, args: tuple = ()):
        self.log_path, self.mode = Path(log_path), mode
        self.what = f"atkd {' '.join(argv)}" if argv is not None else getattr(target, "__name__", "target")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        if mode == "subprocess":
            if argv is None:
                raise ValueError("mode 'subprocess' runs the CLI only: pass argv")
            self._log = open(self.log_path, "wb")
            self._proc = subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=REPO,  # noqa: S603
                                          env=env_for(env), stdout=self._log, stderr=subprocess.STDOUT)
        else:
            if argv is not None:
                target, args = _cli, (list(argv),)
            self._proc = _forkserver().Process(target=_child_main,
                                               args=(target, args, {**BASE_ENV, **(env or {})}, str(self.log_path)))
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
                self._proc.wait()
                raise TimeoutError(f"{self.what} ran past {timeout}s:\n{self.output()}") from None
            self._log.close()
            return rc
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            self.kill()
            self._proc.join()
            raise TimeoutError(f"{self.what} ran past {timeout}s:\n{self.output()}")
        return self._proc.exitcode

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def atkd(argv: list[str], log_path: Path, *, env: dict | None = None, mode: str = "fork") -> Proc:
    """Start `atkd ARGV` (pipeline.cli.main) with stdout and stderr into `log_path`."""
    return Proc(log_path, env=env, mode=mode, argv=argv)


def call(target: Callable, args: tuple, log_path: Path, *, env: dict | None = None) -> Proc:
    """Start `target(*args)` in a warm forked child (a module-level function); exit 0 when it returns."""
    return Proc(log_path, env=env, target=target, args=args)


def run_atkd(argv, log_path, *, env=None, mode="fork", timeout=300.0) -> tuple[int, str]:
    proc = atkd(argv, log_path, env=env, mode=mode)
    rc = proc.wait(timeout)
    return rc, proc.output()


def _cli(argv: list[str]) -> int:
    from pipeline import cli

    return cli.main(argv)


def _child_main(target: Callable, args: tuple, env: dict, log_path: str) -> None:
    """A forkserver child: `target(*args)` with stdout+stderr to `log_path`; exits with its code."""
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # tqdm's default lock is a multiprocessing semaphore, which a SIGKILLed child would leak.
    import threading

    from tqdm.std import tqdm

    tqdm.set_lock(threading.RLock())
    try:
        rc = target(*args)
        rc = rc if isinstance(rc, int) else 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


_SERVER = None


def fork_preload() -> list[str]:
    """Modules the forkserver imports once, so that each child starts warm (transformers imports
    lazily: the modules of the classes the stages use are named)."""
    import transformers

    lazy = [getattr(transformers, name).__module__ for name in
            ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "LlamaForCausalLM", "PreTrainedTokenizerFast")]
    return ["torch", "numpy", "datasets", "zarr", "safetensors.torch", *lazy, "pipeline.cli",
            "pipeline.orchestrator", "stages.teacher.capture", "stages.teacher.engine_hf", "stages.student.trainer",
            "storage.dataset", "tqdm.std"]


def _forkserver():
    """The forkserver context, its server started with fork_preload() (one per session)."""
    global _SERVER
    if _SERVER is None:
        for key, value in BASE_ENV.items():  # inherited by the server, so by every child
            if not key.startswith("ATKD_"):
                os.environ.setdefault(key, value)
        # The server imports its modules from its own sys.path (Python < 3.13 ignores the parent's),
        # which comes from PYTHONPATH: this checkout first, not an installed copy of atkd.
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if paths[0] != str(REPO):
            os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, paths)])
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(fork_preload())
        _SERVER = ctx
    return _SERVER


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

    def compared(self, name: str, plan: list, diffs: list) -> None:
        """Count a campaign's comparison with the uninterrupted run and print its line."""
        self.mismatches += bool(diffs)
        if diffs:
            self.notes.append(f"{name}: {diffs[:5]}")
        print(f"  {name}: plan {plan} -> kills {self.kills}, mismatches {self.mismatches}", flush=True)


def run_campaign(argv: list[str], kills: list, log_dir: Path, *, mode: str = "fork",
                 final_mode: str | None = None, timeout: float = 300.0, env: dict | None = None) -> Counts:
    """Run `atkd ARGV` once per planned kill, then once more to the end.

    Each kill is "point:N" (SIGKILL at the N-th hit of a crash point) or a
    float (SIGKILL after that many seconds). Raises if an attempt fails for
    any other reason, or if the last attempt does not exit 0. `env`: added to every attempt's.
    """
    counts = Counts()
    log_dir = Path(log_dir)
    for i, kill in enumerate(list(kills) + [None]):
        attempt_env = {**(env or {}), **({"ATKD_FAULT_POINT": kill} if isinstance(kill, str) else {})}
        attempt_mode = (final_mode or mode) if kill is None else mode
        proc = atkd(argv, log_dir / f"attempt-{i:02d}.log", env=attempt_env, mode=attempt_mode)
        counts.attempts += 1
        counts.resumes += i > 0
        if isinstance(kill, (int, float)):
            deadline = proc.started + float(kill)
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.kill()
        rc = proc.wait(timeout)
        if rc in KILLED:
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
    fields, and per shard its group attributes and every decoded array. `url`: a
    local path or any fsspec URL (s3://...); committed shard groups only."""
    import zarr

    from storage.fs import CacheFS

    fs = CacheFS(url)
    manifest = json.loads(fs.read_bytes("manifest.json"))
    for key in ("created_at", "updated_at", "provenance"):  # when, where and by which engine version
        manifest.pop(key, None)
    shards = {}
    for name in fs.list("shards"):
        if not (name.startswith("shard-") and name.endswith(".zarr")):
            continue  # a killed writer's shard-N.zarr.partial-* (local)
        group = zarr.open_group(fs.zarr_store(f"shards/{name}", read_only=True), mode="r", zarr_format=3)
        attrs = {k: v for k, v in dict(group.attrs).items() if k not in ("written_at", "worker_id")}
        arrays = {name: np.asarray(group[name][...]) for name in sorted(group.array_keys())}
        shards[name] = {"attrs": attrs, "arrays": arrays}
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
