"""The generation stage: a model writes responses for the training prompts into a sharded rows file.

    <out>/manifest.json             identity (model fingerprint, the prompts' data identity, sampling
                                    settings, seed, engine) and the shard plan, written once
    <out>/rows/shard-00000.jsonl    one committed shard: the prompt rows with `response` replaced by a
                                    generation, plus `_atkd` provenance (source, row, sample, seed, tokens,
                                    same_tokens: the text tokenises back to exactly the sampled ids)
    <out>/stats/shard-00000.json    what that shard kept and dropped (written just before its rows)
    <out>/leases/                   the cache's lease files (storage/lease.py), same protocol

`<out>/rows/` is an ordinary jsonl data directory: stage one caches the teacher on it like any data.
Shards are row ranges of the prompts (stages/split.py's plan, the train part only), claimed through
the same leases as stage one; a shard's file appears by an atomic rename, so a killed worker leaves
at most an expired lease and a temporary file that no reader lists. Every response's seed is a hash
of (seed, row index) (+ j for the j-th of n samples): a rerun, another worker count or another
rows_per_shard on vLLM gives the same rows (stages/generate/engines.py).

Dropped, and counted: responses that stopped at the token limit without EOS (over-long: training
them would teach an EOS the model never chose), empty ones, and prompts too long to leave room for a
response. A shard that keeps nothing is an error with those counts; nothing empty is committed.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from stages import data as data_mod
from stages import split
from stages.data_config import DataConfig
from stages.errors import EngineError
from stages.fingerprint import model_fingerprint, splitmix64
from stages.rounds_config import GenerateConfig
from stages.generate.engines import Request, make_generator, resolve_backend
from storage.diff import changes
from storage.errors import AtkdError
from storage.faults import fault_point

MANIFEST = "manifest.json"
FORMAT = "atkd-generated-rows/1"
_SEED_BITS = np.uint64(0x7FFFFFFF)  # vLLM and torch take any non-negative int; 31 bits is safe everywhere


class GenerationError(AtkdError):
    """Generation produced nothing usable, or its output belongs to another configuration."""


@dataclass
class GenerationJob:
    model: str  # the model directory that generates (the teacher, or a student's final/)
    source: str  # teacher | student: what the rows' provenance says
    data_cfg: DataConfig  # where the prompts are (its train part)
    gen: GenerateConfig
    seed: int  # the base seed; each row's seed is hashed from it and the row index
    out: str  # output directory (local)
    data_fraction: float = 0.0
    trust_remote_code: bool = False
    vllm: dict = field(default_factory=dict)  # start_llm settings (the pipeline passes the teacher's)


@dataclass
class GenerationSummary:
    out: str
    engine: str = ""
    shards_total: int = 0
    shards_written: int = 0
    prompts: int = 0
    data_rows: int = 0  # rows kept with the dataset's response (data_fraction)
    generated: int = 0  # responses kept
    empty: int = 0
    overlong: int = 0
    prompt_too_long: int = 0
    new_tokens: int = 0
    retokenized_same: int = 0  # kept responses whose text tokenises back to exactly the sampled ids
    seconds: float = 0.0
    generate_seconds: float = 0.0
    engine_start_seconds: float = 0.0
    per_shard: list[dict] = field(default_factory=list)


def _log(msg: str) -> None:
    print(f"[generate] {msg}", file=sys.stderr, flush=True)


def row_seeds(seed: int, indices: np.ndarray) -> np.ndarray:
    """Each row's seed: a hash of (seed, row index), so it does not depend on batches or shards."""
    key = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    return splitmix64(np.asarray(indices, dtype=np.uint64) ^ key) & _SEED_BITS


def keeps_data(seed: int, indices: np.ndarray, fraction: float) -> np.ndarray:
    """Which rows keep the dataset's response: a uniform hash of (seed, row) below `fraction`."""
    if fraction <= 0.0:
        return np.zeros(len(indices), dtype=bool)
    key = splitmix64(np.array([(seed ^ 0x5EED) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    u = (splitmix64(np.asarray(indices, dtype=np.uint64) + key) >> np.uint64(11)).astype(np.float64) / 2.0 ** 53
    return u < fraction


def rows_path(out: str) -> str:
    return f"{out.rstrip('/')}/rows"


def expected_rows(job: GenerationJob):
    """(identity, plan, source, rows, backend, why): nothing generated, the data indexed once."""
    if job.data_cfg.kind != "prompt_response":
        raise GenerationError(f"generation replaces the response of prompt_response rows; data.kind is "
                              f"{job.data_cfg.kind}")
    source, n = data_mod.training_rows(job.data_cfg)
    plan = split.shard_plan(job.data_cfg, n, job.gen.rows_per_shard)
    if not plan:
        raise data_mod.DataError(f"{job.data_cfg.path!r} has no training rows to generate for")
    backend, why = resolve_backend(job.model, job.gen.backend)
    sampling = {k: v for k, v in asdict(job.gen).items() if k not in ("backend", "rows_per_shard", "batch_size",
                                                                     "lease_seconds")}
    identity = {"format": FORMAT, "source": job.source, "model_fingerprint": model_fingerprint(job.model),
                "data": data_mod.rows_identity(job.data_cfg, source, n), "sampling": sampling,
                "base_seed": int(job.seed), "data_fraction": float(job.data_fraction), "engine": backend}
    return identity, plan, source, n, backend, why


def _open(job: GenerationJob, identity: dict, plan: list[dict]):
    """The output's CacheFS: its manifest created, or checked against this job's identity and plan."""
    from storage.fs import CacheFS

    fs = CacheFS(job.out)
    record = {"identity": identity, "shard_plan": plan, "model": job.model, "created_at": time.time()}
    if fs.create_exclusive(MANIFEST, json.dumps(record, indent=1).encode()):
        return fs
    found = json.loads(fs.read_bytes(MANIFEST))
    diff = changes({"identity": found["identity"], "shard_plan": found["shard_plan"]},
                   {"identity": identity, "shard_plan": plan})
    if diff:
        raise GenerationError(f"the generated rows at {job.out} were made from another configuration: "
                              f"{'; '.join(diff[:4])}; delete {job.out} (or retrain the student with "
                              "--retrain) to generate them anew")
    return fs


def shard_rel(index: int) -> str:
    return f"rows/shard-{index:05d}.jsonl"


def done_shards(out: str, num: int) -> list[int]:
    from storage.fs import CacheFS

    fs = CacheFS(out)
    return [i for i in range(num) if fs.exists(shard_rel(i))]


def is_complete(out: str) -> bool:
    """Every shard of the plan committed (False when no manifest)."""
    from storage.fs import CacheFS

    fs = CacheFS(out)
    if not fs.exists(MANIFEST):
        return False
    plan = json.loads(fs.read_bytes(MANIFEST))["shard_plan"]
    return len(done_shards(out, len(plan))) == len(plan)


def run_generation(job: GenerationJob, *, engine=None, worker_id: str = "") -> GenerationSummary:
    """Generate every shard not yet committed (see the module doc); `engine` an already started
    generator (tests), else one is started at the first claimed shard and closed at the end."""
    from stages.teacher.identity import load_tokenizer
    from storage.lease import Heartbeat, default_worker_id, release_quietly, remove_leases, try_acquire

    t0 = time.perf_counter()
    identity, plan, source, n, backend, why = expected_rows(job)
    fs = _open(job, identity, plan)
    tokenizer = load_tokenizer(job.model, job.trust_remote_code)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise GenerationError(f"the tokenizer of {job.model} has no EOS token: a response could never end")
    summary = GenerationSummary(out=job.out, shards_total=len(plan))
    own = engine is None
    worker = worker_id or default_worker_id()
    waited = False
    try:
        while True:
            todo = [e for e in plan if not fs.exists(shard_rel(e["index"]))]
            lease = None
            for entry in todo:
                lease = try_acquire(fs, entry["index"], worker, job.gen.lease_seconds)
                if lease is not None:
                    break
            if lease is None:
                if not todo:
                    break
                if not waited:
                    _log(f"{len(todo)} shard(s) are leased by other workers; waiting until they are written or "
                         f"their leases expire (generate.lease_seconds={job.gen.lease_seconds:g})")
                waited = True
                time.sleep(min(5.0, max(job.gen.lease_seconds / 4.0, 0.1)))
                continue
            if engine is None:
                from stages.lm import pad_id

                t_start = time.perf_counter()
                engine = make_generator(job.model, backend, eos=eos, pad=pad_id(tokenizer),
                                        max_seq_len=job.data_cfg.max_seq_len, batch_size=job.gen.batch_size,
                                        trust_remote_code=job.trust_remote_code, vllm_settings=job.vllm)
                summary.engine_start_seconds = time.perf_counter() - t_start
                _log(f"engine: {engine.description} ({why})")
            if engine.name != backend:
                raise EngineError(f"the rows at {job.out} are identified as {backend}'s, the engine given is "
                                  f"{engine.name}")
            summary.engine = engine.name
            beat = Heartbeat(lease, job.gen.lease_seconds)
            try:
                rows, stats = _generate_shard(job, plan[lease.shard_index], source, n, tokenizer, engine)
                beat.raise_if_lost()
                fault_point("generate.scored", shard_rel(lease.shard_index))
                fs.write_bytes_atomic(f"stats/shard-{lease.shard_index:05d}.json", json.dumps(stats).encode())
                fs.write_bytes_atomic(shard_rel(lease.shard_index),
                                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
                fault_point("generate.committed", shard_rel(lease.shard_index))
            except BaseException:
                beat.stop()
                release_quietly(lease)
                raise
            beat.stop()
            remove_leases(fs, lease.shard_index)
            _add(summary, stats)
            _log(f"shard {lease.shard_index + 1}/{len(plan)}: {stats['prompts']} prompts, kept {stats['generated']} "
                 f"generated + {stats['data_rows']} dataset rows (dropped {stats['overlong']} over-long, "
                 f"{stats['empty']} empty, {stats['prompt_too_long']} prompts too long; "
                 f"{stats['retokenized_same']} tokenise back to the sampled ids), "
                 f"{stats['new_tokens'] / max(stats['seconds'], 1e-9):,.0f} new tok/s")
    finally:
        if own and engine is not None:
            engine.close()
    summary.seconds = time.perf_counter() - t0
    return summary



def _add(summary: GenerationSummary, stats: dict) -> None:
    summary.shards_written += 1
    for key in ("prompts", "data_rows", "generated", "empty", "overlong", "prompt_too_long", "new_tokens",
                "retokenized_same"):
        setattr(summary, key, getattr(summary, key) + stats[key])
    summary.generate_seconds += stats["seconds"]
    summary.per_shard.append(stats)


def _generate_shard(job: GenerationJob, entry: dict, source, n: int, tokenizer, engine) -> tuple[list[dict], dict]:
    start, end = int(entry["row_start"]), int(entry["row_end"])
    indices, rows = split.read_part(job.data_cfg, source, n, start, end)
    seeds = row_seeds(job.seed, indices)
    from_data = keeps_data(job.seed, indices, job.data_fraction)
    stats = {"shard": int(entry["index"]), "rows": [start, end], "prompts": len(rows), "data_rows": 0,
             "generated": 0, "empty": 0, "overlong": 0, "prompt_too_long": 0, "new_tokens": 0, "retokenized_same": 0}
    out, asked = [], []
    for k, (idx, row) in enumerate(zip(indices.tolist(), rows)):
        if from_data[k]:
            out.append((idx, -1, {**row, "_atkd": {"source": "data", "row": idx}}))
            stats["data_rows"] += 1
            continue
        prompt = data_mod.prompt_ids(row, tokenizer, job.data_cfg, idx)
        room = min(job.gen.max_new_tokens, job.data_cfg.max_seq_len - len(prompt) - 1)  # + EOS must fit
        if room < 1:
            stats["prompt_too_long"] += 1
            continue
        asked.append((idx, row, Request(prompt, int(seeds[k]), room)))
    t = time.perf_counter()
    samples = engine.generate([r for _, _, r in asked], job.gen.n, job.gen.temperature, job.gen.top_p) if asked else []
    stats["seconds"] = time.perf_counter() - t
    field_name = job.data_cfg.response_field
    for (idx, row, req), per_row in zip(asked, samples):
        for j, s in enumerate(per_row):
            stats["new_tokens"] += len(s.token_ids) + int(s.finished)
            text = tokenizer.decode(s.token_ids, skip_special_tokens=True)
            if not s.finished:
                stats["overlong"] += 1
            elif not text.strip():
                stats["empty"] += 1
            else:
                # Stage one re-tokenises the text: the targets are the sampled tokens where this holds
                same = tokenizer(text, add_special_tokens=False)["input_ids"] == list(s.token_ids)
                out.append((idx, j, {**row, field_name: text,
                                     "_atkd": {"source": job.source, "row": idx, "sample": j, "seed": req.seed + j,
                                               "tokens": len(s.token_ids), "same_tokens": same}}))
                stats["generated"] += 1
                stats["retokenized_same"] += same
    if not out and rows:  # (a shard whose rows are all held out has nothing to generate)
        raise GenerationError(
            f"generation with {job.model} kept no response for shard {entry['index']} (rows {start}-{end - 1}): of "
            f"{len(asked) * job.gen.n} responses {stats['overlong']} stopped at the token limit without EOS "
            f"(generate.max_new_tokens {job.gen.max_new_tokens}, data.max_seq_len {job.data_cfg.max_seq_len}), "
            f"{stats['empty']} were empty, and {stats['prompt_too_long']} prompts left no room for a response; "
            "raise max_new_tokens / data.max_seq_len, or generate from a model that ends its answers with EOS")
    out.sort(key=lambda x: (x[0], x[1]))
    return [r for _, _, r in out], stats


def generated_data(data_cfg: DataConfig, out: str) -> DataConfig:
    """The data section stage one reads the generated rows with: the same template and fields, the
    whole rows directory (the split was applied when generating)."""
    from dataclasses import replace

    return replace(data_cfg, path=rows_path(out), format="jsonl", split="train", limit=None, holdout=None)
