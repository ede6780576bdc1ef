"""inspect_cache: what a cache holds, for ``atkd inspect``.

Counts come from the shards' attributes (cheap); bytes from the files on
disk; the teacher's uncertainty histogram and top-k mass from the decoded
log-prob arrays of at most ``max_shards`` evenly spaced complete shards, since
reading every shard of a big cache takes long. The report says when it sampled.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storage.cache import Cache
from storage.errors import StorageArgumentError
from storage.schema import describe_logprobs, describe_teacher, has_samples, targets_of

HIST_BINS = 10
BAR_WIDTH = 40


@dataclass
class InspectReport:
    url: str
    fingerprint: str
    num_shards: int
    done: list[int]
    top_k: int | None
    counts: dict[str, int]
    bytes_total: int
    bytes_topk: int
    sampled: list[int] = field(default_factory=list)
    sampled_positions: int = 0
    histogram: list[int] = field(default_factory=list)  # positions per uncertainty bin [i/10, (i+1)/10)
    mean_topk_mass: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    encoding: str = "exact"  # how the log-probs are stored (storage/encoding.py), in words
    format_version: int = 1  # the manifest's: 2 with sampled targets and/or a lossy encoding

    def text(self) -> str:
        return "\n".join(_header(self) + _sizes(self) + _uncertainty(self) + _provenance(self))


def inspect_cache(url: str, max_shards: int = 8, **storage_options) -> InspectReport:
    """Read counts, sizes, and the log-probs of at most ``max_shards`` shards (ManifestError if no cache)."""
    if max_shards < 0:
        raise StorageArgumentError(f"--shards must be >= 0, got {max_shards}")
    cache = Cache.open(url, **storage_options)
    done = cache.completed_shards()
    ident = cache.manifest.identity
    report = InspectReport(url=cache.url, fingerprint=cache.fingerprint, num_shards=cache.num_shards, done=done,
                           top_k=int(ident["top_k"]) if ident.get("top_k") is not None else None,
                           counts=_counts(cache, done), bytes_total=_bytes_under(cache.fs, ""),
                           bytes_topk=sum(_bytes_under(cache.fs, f"{cache.shard_rel(i)}/{a}")
                                          for i in done for a in cache.encoding.topk_arrays),
                           provenance=dict(cache.manifest.provenance), identity=dict(ident),
                           encoding=cache.encoding.label(), format_version=cache.manifest.format_version)
    report.sampled = sample_shards(done, max_shards)
    _read_logprobs(cache, report)
    return report


def sample_shards(done: list[int], n: int) -> list[int]:
    """At most n shards of ``done``, evenly spaced from first to last."""
    if n <= 0 or not done:
        return []
    if n >= len(done):
        return list(done)
    if n == 1:
        return [done[0]]
    return sorted({done[round(i * (len(done) - 1) / (n - 1))] for i in range(n)})


def _counts(cache: Cache, done: list[int]) -> dict[str, int]:
    total = {"num_sequences": 0, "num_tokens": 0, "num_positions": 0}
    for _, attrs in cache.iter_shard_attrs(done):
        counts = (attrs or {}).get("counts", {})
        for key in total:
            total[key] += int(counts.get(key, 0))
    return total


def _bytes_under(fs, rel: str) -> int:
    """Bytes of every file under ``rel`` of the cache."""
    if not fs.is_local:
        try:
            return int(fs.fs.du(fs.path(rel), total=True))
        except FileNotFoundError:
            return 0
    total = 0
    for root, _, files in os.walk(fs.path(rel)):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # removed meanwhile (a writer's temp file)
                pass
    return total


def _read_logprobs(cache: Cache, report: InspectReport) -> None:
    """Fill the histogram and mean top-k mass from the sampled shards' log-prob arrays."""
    import zarr

    hist = np.zeros(HIST_BINS, dtype=np.int64)
    mass_sum, positions = 0.0, 0
    for index in report.sampled:
        group = zarr.open_group(cache.fs.zarr_store(cache.shard_rel(index), read_only=True), mode="r")
        gold = np.asarray(group["target_logprobs"][...], dtype=np.float64)
        topk = cache.encoding.read_logprobs(group)
        uncertainty = 1.0 - np.exp(gold)
        bins = np.clip((uncertainty * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
        hist += np.bincount(bins, minlength=HIST_BINS)
        mass_sum += float(np.exp(topk).sum()) if topk.size else 0.0
        positions += gold.shape[0]
    report.histogram = hist.tolist()
    report.sampled_positions = positions
    report.mean_topk_mass = mass_sum / positions if positions else None


# ---------------------------------------------------------------- text


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _header(r: InspectReport) -> list[str]:
    c = r.counts
    return [f"cache {r.url} (fingerprint {r.fingerprint})",
            f"  {describe_teacher(r.identity)}; vocab {r.identity.get('vocab_size', '?')}, "
            f"max_seq_len {r.identity.get('max_seq_len', '?')}",
            f"  targets {_targets(r.identity, r.format_version)}",
            f"  log-probs: {describe_logprobs(r.identity, r.encoding)}",
            f"  shards done {len(r.done)}/{r.num_shards}",
            f"  {c['num_sequences']:,} sequences, {c['num_tokens']:,} tokens, "
            f"{c['num_positions']:,} target positions (in complete shards)"]


def _targets(identity: dict[str, Any], version: int) -> str:
    """The cache's targets kind (sampled: with its draws per position and sampling method)."""
    kind = targets_of(identity)
    if not has_samples(kind):
        return f"{kind} (cache format v{version})"
    return f"{kind} ({identity.get('samples', '?')} draws per position, sampling {identity.get('sampling', '?')}, " \
           f"cache format v{version})"


def _sizes(r: InspectReport) -> list[str]:
    c = r.counts
    lines = [f"  on disk {_human(r.bytes_total)}"]
    if c["num_tokens"]:
        lines[0] += f", {r.bytes_total / c['num_tokens']:.2f} B per token"
    entries = c["num_positions"] * (r.top_k or 0)
    if entries:
        lines[0] += f", {r.bytes_topk / entries:.2f} B per top-k entry (ids + log-probs)"
    return lines


def _uncertainty(r: InspectReport) -> list[str]:
    if not r.sampled:
        return ["  teacher uncertainty: no complete shard read (none done yet, or --shards 0)"]
    scope = (f"all {len(r.done)} complete shards" if len(r.sampled) == len(r.done)
             else f"a sample of {len(r.sampled)} of {len(r.done)} complete shards ({_list(r.sampled)}; "
                  "--shards N reads more)")
    lines = [f"  teacher uncertainty 1 - p(gold) over {r.sampled_positions:,} positions from {scope}:"]
    peak = max(r.histogram) or 1
    for i, n in enumerate(r.histogram):
        share = n / r.sampled_positions if r.sampled_positions else 0.0
        bar = "#" * math.ceil(BAR_WIDTH * n / peak) if n else ""
        lines.append(f"    {i / HIST_BINS:.1f}-{(i + 1) / HIST_BINS:.1f} {bar:<{BAR_WIDTH}} {share:6.1%} ({n:,})")
    if r.mean_topk_mass is not None and r.top_k:
        lines.append(f"  mean top-{r.top_k} mass (sum of p over the top-k per position): {r.mean_topk_mass:.4f}")
    return lines


def _list(indices: list[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:8])
    return f"shards {shown}" + (", ..." if len(indices) > 8 else "")


def _provenance(r: InspectReport) -> list[str]:
    if not r.provenance:
        return ["  provenance: none recorded (written before atkd recorded it, or no shard written yet)"]
    lines = ["  provenance:"]
    for key in sorted(r.provenance):
        lines.append(f"    {key}: {_fmt_value(key, r.provenance[key])}")
    return lines


def _fmt_value(key: str, value: Any) -> str:
    if key.endswith("_at") and isinstance(value, (int, float)):
        import datetime

        return datetime.datetime.fromtimestamp(value).astimezone().isoformat(timespec="seconds")
    return str(value)
