"""manifest.json: what a cache is (identity), how it is split (shard plan), what is done.

The manifest is written once when a cache is created and rewritten (atomically)
as shards complete. ``shards_done`` is a summary for humans and tools; the
truth is each shard's own ``complete`` attribute (see storage/shard.py), so a
summary that lags behind concurrent writers is harmless and is refreshed by
``Cache.refresh_manifest()``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from storage.encoding import EncodingError, LogprobEncoding
from storage.diff import changes
from storage.errors import CacheMismatchError, ManifestError
from storage.fs import CacheFS
from storage.schema import ARRAY_DTYPES, FORMAT_VERSION, SUPPORTED_VERSIONS, format_version_for, has_samples, targets_of

MANIFEST_NAME = "manifest.json"


def normalize_json(value: Any) -> Any:
    """The value as it will read back from JSON (tuples -> lists, keys -> str)."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except TypeError as e:
        raise ValueError(f"cache identity and shard plan must be JSON-serialisable: {e}") from e


@dataclass
class Manifest:
    """identity: teacher, tokenizer fingerprint, top_k, data fingerprint, template,
    max_seq_len, vocab_size, ... (free-form, compared key by key on reopen).
    shard_plan: one dict per shard, e.g. {"index", "example_start", "example_end"}.
    provenance: how it was made (teacher path, engine and version, dtype, host,
    start/end times); informational only, so never part of the fingerprint or
    of the identity comparison. Manifests written before it existed read as {}.
    logprob_encoding: None for the exact top-k, else the lossy encoding's
    description (storage/encoding.py; format v2): part of the fingerprint and
    compared on reopen, absent from an exact cache's JSON."""

    identity: dict[str, Any]
    shard_plan: list[dict[str, Any]]
    shards_done: list[int] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    dtypes: dict[str, str] = field(default_factory=lambda: dict(ARRAY_DTYPES))
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    provenance: dict[str, Any] = field(default_factory=dict)
    logprob_encoding: dict[str, Any] | None = None

    @classmethod
    def for_identity(cls, identity: dict[str, Any], shard_plan: list[dict[str, Any]],
                     encoding: LogprobEncoding | None = None) -> "Manifest":
        """A new manifest; its format version and dtypes follow the identity's ``targets`` and
        the log-prob ``encoding`` (exact top-k only: v1, exactly as before; sampled targets
        and/or a lossy encoding: v2 with their arrays)."""
        enc = (encoding or LogprobEncoding()).for_top_k(identity.get("top_k"))
        samples = has_samples(targets_of(identity))
        if enc.lossy and identity.get("top_k") == 0:
            raise EncodingError(f"log-prob encoding {enc.name}: this cache has no top-k to encode (targets "
                                f"{targets_of(identity)}, top_k 0); store it exact")
        return cls(identity=identity, shard_plan=shard_plan, format_version=format_version_for(samples, enc.lossy),
                   dtypes={name: str(spec[0]) for name, spec in enc.array_specs(samples).items()},
                   logprob_encoding=enc.describe())

    @property
    def encoding(self) -> LogprobEncoding:
        """How the shards store the top-k log-probs (``logprob_encoding``; absent: exact)."""
        return LogprobEncoding.from_record(self.logprob_encoding)

    @property
    def has_samples(self) -> bool:
        """Whether the shards hold sampled teacher targets (the identity's ``targets``)."""
        return has_samples(targets_of(self.identity))

    @property
    def num_shards(self) -> int:
        return len(self.shard_plan)

    def fingerprint(self) -> str:
        """Stable hash of what the cache contains: format, dtypes, identity, shard plan.

        The data order of the streaming reader is a function of this, so two
        caches built the same way train in the same order.
        """
        payload = {"format_version": self.format_version, "dtypes": self.dtypes,
                   "identity": self.identity, "shard_plan": self.shard_plan}
        if self.logprob_encoding is not None:
            payload["logprob_encoding"] = self.logprob_encoding
        text = json.dumps(normalize_json(payload), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def to_json(self) -> str:
        raw = asdict(self)
        if raw["logprob_encoding"] is None:  # an exact cache's manifest reads as before
            del raw["logprob_encoding"]
        return json.dumps(raw, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "Manifest":
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ManifestError(f"{where} is not valid JSON ({e}); the cache metadata is damaged. "
                                "Restore it from the shards with a new cache, or delete the cache.") from e
        if not isinstance(raw, dict):
            raise ManifestError(f"{where} does not hold a JSON object")
        version = raw.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise ManifestError(f"{where} has cache format version {version!r}; this code reads versions "
                                f"{', '.join(map(str, SUPPORTED_VERSIONS))}. Use the matching atkd release, "
                                "or rebuild the cache.")
        missing = [k for k in ("identity", "shard_plan") if k not in raw]
        if missing:
            raise ManifestError(f"{where} lacks required keys {missing}")
        known = {f for f in cls.__dataclass_fields__}
        manifest = cls(**{k: v for k, v in raw.items() if k in known})
        try:
            LogprobEncoding.from_record(manifest.logprob_encoding)
        except EncodingError as e:
            raise ManifestError(f"{where}: {e}") from None
        return manifest

    def differences(self, identity: dict[str, Any], shard_plan: list[dict[str, Any]]) -> list[str]:
        """One `key: cache's -> requested` line per identity key / plan entry that differs."""
        want_id, want_plan = normalize_json(identity), normalize_json(shard_plan)
        diffs = changes(self.identity, want_id, prefix="identity.")
        if len(self.shard_plan) != len(want_plan):
            diffs.append(f"shard_plan: {len(self.shard_plan)} -> {len(want_plan)} shards")
        else:
            bad = [i for i, (a, b) in enumerate(zip(self.shard_plan, want_plan)) if a != b]
            for i in bad[:3]:
                diffs += changes(self.shard_plan[i], want_plan[i], prefix=f"shard_plan[{i}].")
            if len(bad) > 3:
                diffs.append(f"... and {len(bad) - 3} more shard_plan entries differ")
        return diffs

    def check_matches(self, identity: dict[str, Any], shard_plan: list[dict[str, Any]], where: str) -> None:
        """Raise CacheMismatchError naming every identity key / plan entry that differs."""
        diffs = self.differences(identity, shard_plan)
        if diffs:
            raise CacheMismatchError(
                f"the cache at {where} was built with a different configuration (cache -> requested):\n  "
                + "\n  ".join(diffs)
                + "\nUse a new cache path for the new configuration, or delete this cache to rebuild it.")


def read_manifest(fs: CacheFS) -> Manifest:
    where = fs.display(MANIFEST_NAME)
    try:
        text = fs.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        bucket = fs.missing_bucket()
        if bucket is not None:
            raise ManifestError(f"no cache at {fs.url}: the bucket {bucket!r} does not exist (or these credentials "
                                "cannot see it); create the bucket or fix cache.path") from None
        raise ManifestError(f"no cache at {fs.url}: {where} does not exist. Run the teacher stage "
                            "(`atkd teacher`) to create it, or check the cache path.") from None
    return Manifest.from_json(text, where)


def write_manifest(fs: CacheFS, manifest: Manifest) -> None:
    manifest.updated_at = time.time()
    fs.write_bytes_atomic(MANIFEST_NAME, manifest.to_json().encode())


def create_manifest(fs: CacheFS, manifest: Manifest) -> bool:
    """Write the manifest only if none exists; True if this call created it.

    Many workers may start on an empty cache at once; exactly one creates the
    manifest and the others then compare against it.
    """
    return fs.create_exclusive(MANIFEST_NAME, manifest.to_json().encode())
