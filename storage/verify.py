"""verify_cache: check every shard of a cache and name each bad one (``atkd verify``).

Also ``status_summary`` for ``atkd status``: shards done/total, counts, leases.
A shard that is absent or not yet marked complete is *pending* (the teacher
stage will write it), not bad; a complete shard that fails any check is *bad*.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from storage import lease as leases
from storage import shard as shards
from storage.cache import Cache
from storage.errors import ManifestError
from storage.schema import ShardData, describe_logprobs, describe_teacher


@dataclass
class VerifyReport:
    url: str
    num_shards: int = 0
    done: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    bad: dict[int, list[str]] = field(default_factory=dict)  # shard index -> problems
    locations: dict[int, str] = field(default_factory=dict)  # shard index -> path, for bad shards
    cache_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    positions: int = 0
    sequences: int = 0

    @property
    def ok(self) -> bool:
        """No bad shard and a readable manifest (pending shards are fine)."""
        return not self.bad and not self.cache_problems

    def summary(self) -> str:
        lines = [f"cache {self.url}: {len(self.done)}/{self.num_shards} shards done, "
                 f"{len(self.pending)} pending, {len(self.bad)} bad; "
                 f"{self.sequences} sequences, {self.positions} positions in good shards"]
        lines += [f"  ERROR {p}" for p in self.cache_problems]
        for index in sorted(self.bad):
            lines.append(f"  BAD shard {index} ({self.locations.get(index) or 'location unknown'}):")
            lines += [f"    - {p}" for p in self.bad[index]]
        lines += [f"  note: {n}" for n in self.notes]
        if self.bad:
            lines.append("  Delete each bad shard directory and rerun the teacher stage to rewrite it (a missing one: "
                         "just rerun it).")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def verify_cache(url: str, deep: bool = True, **storage_options) -> VerifyReport:
    """Check every shard: structure, arrays, shapes, dtypes, and with ``deep``
    the checksums and values (finite, <= 0, descending log-probs, ids < vocab,
    target rows consistent; a lossy log-prob encoding's invariants and its
    stated error bound, storage/encoding.py). Never raises for a bad cache; read the report."""
    report = VerifyReport(url=str(url))
    try:
        cache = Cache.open(url, **storage_options)
    except ManifestError as e:
        report.cache_problems.append(str(e))
        return report
    report.num_shards = cache.num_shards
    vocab, top_k = cache.vocab_size, cache.manifest.identity.get("top_k")
    if vocab is None:
        report.notes.append("manifest identity has no vocab_size; ids were only checked to be >= 0")
    for index, attrs in cache.iter_shard_attrs(range(cache.num_shards)):
        if attrs is None or (attrs.get("complete") is not True and not attrs.get(shards.UNREADABLE)):
            report.pending.append(index)
            if index in cache.manifest.shards_done:
                state = "missing" if attrs is None else "incomplete (no `complete` marker)"
                report.bad[index] = [f"the manifest lists it as done, but the shard is {state}"]
                report.locations[index] = cache.shard_location(index)
            continue
        problems = _check_shard(cache, index, attrs, deep, vocab, top_k)
        if problems:
            report.bad[index] = problems
            report.locations[index] = cache.shard_location(index)
        else:
            report.done.append(index)
            counts = attrs.get("counts", {})
            report.sequences += int(counts.get("num_sequences", 0))
            report.positions += int(counts.get("num_positions", 0))
    stale = [n for n in cache.fs.list(shards.SHARDS_DIR) if ".partial-" in n]
    if stale:
        report.notes.append(f"{len(stale)} leftover partial shard directories from interrupted writes "
                            f"under {cache.fs.display(shards.SHARDS_DIR)} "
                            "(the next `atkd teacher` removes those no live writer owns)")
    return report


def _check_shard(cache: Cache, index: int, attrs: dict, deep: bool, vocab: int | None, top_k) -> list[str]:
    rel = cache.shard_rel(index)
    if not deep:
        problems = [] if attrs.get("counts") and attrs.get("checksums") else ["attrs lack counts or checksums"]
        if attrs.get(shards.UNREADABLE):
            problems.append("zarr.json is not valid JSON")
        return problems
    enc = cache.encoding  # a shard stored with another one is reported by load_arrays
    arrays, problems = shards.load_arrays(cache.fs, rel, verify_checksums=True, encoding=enc,
                                          samples=cache.manifest.has_samples)
    if problems:
        return problems
    data = ShardData.from_arrays(arrays)
    problems = data.validate(vocab_size=vocab, logprob_atol=enc.max_abs_error, grid_floor=enc.grid_floor)
    if top_k is not None and data.top_k != int(top_k):
        problems.append(f"top_k is {data.top_k}, the manifest identity says {top_k}")
    return problems


def status_summary(url: str, **storage_options) -> str:
    """One printable paragraph: shards done/total, counts, live leases (no decoding)."""
    try:
        cache = Cache.open(url, **storage_options)
    except ManifestError as e:
        return str(e)
    done = cache.completed_shards()
    seqs = positions = 0
    for _, attrs in cache.iter_shard_attrs(done):
        counts = (attrs or {}).get("counts", {})
        seqs += int(counts.get("num_sequences", 0))
        positions += int(counts.get("num_positions", 0))
    now, held = time.time(), []
    for index in sorted(set(range(cache.num_shards)) - set(done)):
        record = leases.current_lease(cache.fs, index)
        if record is not None and record.is_live(now):
            held.append(f"shard {index} by {record.worker_id} ({record.expires_at - now:.0f}s left)")
    ident = cache.manifest.identity
    lines = [f"cache {cache.url} (format v{cache.manifest.format_version}, fingerprint {cache.fingerprint})",
             f"  {describe_teacher(ident)}",
             f"  log-probs: {describe_logprobs(ident, cache.encoding.label())}",
             f"  shards done {len(done)}/{cache.num_shards}; {seqs} sequences, {positions} positions",
             *_engine_line(cache.manifest.provenance),
             f"  leased now: {len(held)}"] + [f"    {h}" for h in held]
    return "\n".join(lines)


def _engine_line(provenance: dict) -> list[str]:
    """Which engine (and vLLM route) wrote the shards, from the provenance (not the identity)."""
    if not provenance.get("engine"):
        return []
    route = provenance.get("engine_route", "")
    return [f"  engine {provenance['engine']} {provenance.get('engine_version', '')}".rstrip()
            + (f", route {route.split(' ', 1)[0]}" if route else "")]
