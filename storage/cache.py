"""Cache: one teacher-logit cache (manifest + shards + leases) at a local path or fsspec URL.

Writers (stage one) call ``create_or_open``, then loop ``claim_shard`` ->
compute -> ``write_shard``. Readers (stage two, verify, status) call ``open``.
The truth about which shards are done is each shard's ``complete`` attribute;
the manifest's ``shards_done`` is a summary rewritten after each commit.
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any, Iterable, Iterator

from storage import lease as leases
from storage import partials
from storage import shard as shards
from storage.errors import (CacheMismatchError, CorruptShardError, ManifestError, ShardExistsError,  # noqa: F401
                            StorageError, StorageIOError)
from storage.fs import CacheFS, describe_error, is_backend_error
from storage.encoding import LogprobEncoding, describe_record
from storage.lease import Lease
from storage.manifest import MANIFEST_NAME, Manifest, create_manifest, normalize_json, read_manifest, write_manifest
from storage.schema import ShardData, has_samples, targets_of

_SHARD_NAME = re.compile(r"^shard-(\d{5,})\.zarr$")

__all__ = ["Cache", "CacheMismatchError", "CorruptShardError", "ShardExistsError", "Lease"]


@contextlib.contextmanager
def _writing(what: str, where: str):
    """An OSError of a write to the cache (read-only directory, disk full, ...) becomes a
    StorageIOError saying what was written where; errno and filename are kept for the CLI's advice."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise StorageIOError(e.errno, f"{what} in {where} failed ({e.strerror or e})", e.filename) from e
    except Exception as e:  # botocore, aiohttp, ...: a remote store failing
        if not is_backend_error(e):
            raise
        raise StorageIOError(None, f"{what} in {where} failed ({describe_error(e)})") from e


class Cache:
    """A cache opened for reading or writing; see the module docstring."""

    def __init__(self, fs: CacheFS, manifest: Manifest) -> None:
        self.fs = fs
        self.manifest = manifest

    # ---- opening ----------------------------------------------------------
    @classmethod
    def create_or_open(cls, url: str, identity: dict[str, Any], shard_plan: list[dict[str, Any]], *,
                       logprob_encoding: LogprobEncoding | None = None, **storage_options: Any) -> "Cache":
        """Create the cache on first use; on reopen refuse another identity, plan or encoding.

        Safe when many workers start at once: one creates the manifest, the
        others compare against it. Raises CacheMismatchError naming each
        differing key with both values. ``logprob_encoding``: how shards store
        the top-k (default exact; a lossy one makes the cache format v2, storage/encoding.py).
        """
        fs = CacheFS(url, **storage_options)
        wanted = Manifest.for_identity(normalize_json(identity), normalize_json(shard_plan), logprob_encoding)
        # Existing cache: compare only (no write, so a read-only complete cache can be checked).
        if fs.exists(MANIFEST_NAME):
            created = False
        else:
            with _writing("creating the cache manifest", fs.display(MANIFEST_NAME)):
                created = create_manifest(fs, wanted)
        if not created:
            existing = read_manifest(fs)
            if existing.logprob_encoding != wanted.logprob_encoding:
                raise CacheMismatchError(
                    f"the cache at {fs.url} stores top-k log-probs as {describe_record(existing.logprob_encoding)}; "
                    f"this configuration asks for {describe_record(wanted.logprob_encoding)} "
                    "(cache.logprob_encoding / cache.logprob_step). Use the cache's setting, a new cache path, "
                    "or delete this cache to rebuild it.")
            existing.check_matches(identity, shard_plan, fs.url)
            return cls(fs, existing)
        return cls(fs, wanted)

    @staticmethod
    def exists(url: str, **storage_options: Any) -> bool:
        """True when a cache (its manifest) is at ``url``."""
        return CacheFS(url, **storage_options).exists(MANIFEST_NAME)

    @classmethod
    def open(cls, url: str, **storage_options: Any) -> "Cache":
        """Open an existing cache; ManifestError if there is none or of another format version."""
        fs = CacheFS(url, **storage_options)
        return cls(fs, read_manifest(fs))

    def __repr__(self) -> str:
        return f"Cache({self.url!r}, shards={self.num_shards})"

    # ---- facts ------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.fs.url

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint()

    @property
    def encoding(self) -> LogprobEncoding:
        """How the shards store the top-k log-probs (the manifest's ``logprob_encoding``)."""
        return self.manifest.encoding

    @property
    def vocab_size(self) -> int | None:
        v = self.manifest.identity.get("vocab_size")
        return int(v) if v is not None else None

    def shard_rel(self, index: int) -> str:
        self._check_index(index)
        return shards.shard_rel(index)

    def shard_location(self, index: int) -> str:
        """Where shard ``index`` lives, for messages."""
        return self.fs.display(self.shard_rel(index))

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard index {index} out of range: {self.url} has {self.num_shards} shards")

    def shard_attrs(self, index: int) -> dict[str, Any] | None:
        """Group attributes of shard ``index`` (counts, checksums, complete), or None."""
        return shards.read_attrs(self.fs, self.shard_rel(index))

    def iter_shard_attrs(self, indices: Iterable[int], batch: int = 64) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """(index, ``shard_attrs(index)``) for each index; on object stores read
        ``batch`` at a time concurrently, without holding every shard's attributes."""
        indices = list(indices)
        for start in range(0, len(indices), batch):
            part = indices[start:start + batch]
            yield from zip(part, shards.read_attrs_many(self.fs, [self.shard_rel(i) for i in part]))

    def is_shard_complete(self, index: int) -> bool:
        return shards.is_complete(self.fs, self.shard_rel(index))

    def completed_shards(self) -> list[int]:
        """Indices of the committed shards, from the shards themselves (not the manifest).

        Local paths: a final shard name only appears through the commit rename,
        so one directory listing suffices. Object stores write in place, so
        each shard's ``complete`` attribute is read (concurrently).
        """
        found = []
        for name in self.fs.list(shards.SHARDS_DIR):
            m = _SHARD_NAME.match(name)
            if m and int(m.group(1)) < self.num_shards:
                found.append(int(m.group(1)))
        found.sort()
        if self.fs.is_local:
            return found
        return [i for i, attrs in self.iter_shard_attrs(found) if attrs and attrs.get("complete") is True]

    def is_complete(self) -> bool:
        return len(self.completed_shards()) == self.num_shards

    # ---- writing ----------------------------------------------------------
    def claim_shard(self, worker_id: str, lease_seconds: float = 600.0) -> Lease | None:
        """Lease the first shard that is neither complete nor leased by a live worker.

        None means nothing is claimable right now: every shard is complete or
        leased. Compare ``completed_shards()`` with ``num_shards`` to tell
        "all done" from "others are still working" (their leases may expire).
        """
        done = set(self.completed_shards())
        for index in range(self.num_shards):
            if index in done:
                continue
            with _writing(f"claiming shard {index} (a lease file)", self.fs.display("leases")):
                lease = leases.try_acquire(self.fs, index, worker_id, lease_seconds)
            if lease is None:
                continue
            # The shard may have been committed between our listing and the
            # lease (its lease files are removed after commit): never redo it.
            if self.is_shard_complete(index):
                lease.release()
                continue
            return lease
        return None

    def write_shard(self, index: int, data: ShardData, lease: Lease | None = None, *,
                    codec: str = "default", attrs: dict[str, Any] | None = None) -> None:
        """Validate and atomically commit shard ``index``, then update the manifest summary.

        With a lease, it is checked before writing and again just before the
        commit; LeaseLostError means another worker took the shard over.
        Without one the caller promises to be the only writer of this shard.
        ``attrs``: extra group attributes (e.g. what the shard's rows held).
        """
        rel = self.shard_rel(index)
        if lease is not None:
            if lease.shard_index != index:
                raise ValueError(f"lease is for shard {lease.shard_index}, not shard {index}")
            lease.check()
        problems = data.validate(vocab_size=self.vocab_size)
        top_k = self.manifest.identity.get("top_k")
        if top_k is not None and data.top_k != int(top_k):
            problems.append(f"top_k is {data.top_k}, the cache identity says {top_k}")
        targets = targets_of(self.manifest.identity)
        if has_samples(targets) != data.has_samples:
            problems.append(f"the cache holds {targets} targets but the shard {'has' if data.has_samples else 'lacks'} "
                            "sample arrays")
        if problems:
            raise ValueError(f"refusing to write invalid data as {self.fs.display(rel)}:\n  "
                             + "\n  ".join(problems) + "\nThis is a bug in the code producing the shard.")
        extra = {**(attrs or {}), "shard_index": index, "written_at": time.time(),
                 "worker_id": lease.worker_id if lease is not None else None}
        try:
            shards.write_shard(self.fs, rel, data, codec=codec, encoding=self.encoding, extra_attrs=extra,
                               before_commit=lease.check if lease is not None else None)
        except (StorageError, ValueError):
            raise
        except Exception as e:  # disk full, read-only, a store gone: say which shard, that nothing was committed
            if not is_backend_error(e):
                raise
            errno_, filename = (e.errno, e.filename) if isinstance(e, OSError) else (None, None)
            cause = (e.strerror or e) if isinstance(e, OSError) else describe_error(e)
            raise StorageIOError(errno_, f"writing shard {index} to {self.fs.display(rel)} failed "
                                         f"({cause}); nothing of this shard was committed and the "
                                         "completed shards are intact", filename) from e
        leases.remove_leases(self.fs, index)
        self.refresh_manifest()

    def refresh_manifest(self) -> Manifest:
        """Rewrite manifest.json's ``shards_done`` from the shards on disk.

        Concurrent writers may each rewrite it; re-listing after the write and
        rewriting when the listing changed makes the last writer's summary
        current in practice (the shards stay the truth either way).
        """
        for _ in range(3):
            done = self.completed_shards()
            self.manifest.shards_done = done
            self._merge_disk_provenance()
            with _writing("updating the cache manifest", self.fs.display(MANIFEST_NAME)):
                write_manifest(self.fs, self.manifest)
            if self.completed_shards() == done:
                break
        return self.manifest

    def update_provenance(self, values: dict[str, Any]) -> Manifest:
        """Merge ``values`` into the manifest's provenance and rewrite it atomically.

        Provenance (teacher path, engine, host, times) never changes the
        fingerprint. The manifest on disk is re-read first, so what other
        workers recorded is kept; of two writers of one key the last one wins.
        """
        self._merge_disk_provenance()
        self.manifest.provenance.update(normalize_json(values))
        with _writing("recording provenance", self.fs.display(MANIFEST_NAME)):
            write_manifest(self.fs, self.manifest)
        return self.manifest

    def _merge_disk_provenance(self) -> None:
        try:
            on_disk = read_manifest(self.fs).provenance
        except ManifestError:
            return
        self.manifest.provenance = {**on_disk, **self.manifest.provenance}

    def remove_stale_partials(self) -> list[str]:
        """Delete temporary shard directories (``shard-N.zarr.partial-<uuid>``) no writer owns.

        A partial is stale when its shard is complete or when no live lease
        covers the shard (its writer was killed, or gave the shard up). Returns
        the locations removed. Object stores write shards in place: nothing to do.
        """
        with _writing("removing stale partial shards", self.fs.display("shards")):
            return partials.remove_stale(self)

    # ---- reading ----------------------------------------------------------
    def read_shard(self, index: int, *, verify_checksums: bool = True) -> ShardData:
        """Decode shard ``index``; CorruptShardError (naming the shard) if it is
        missing, incomplete, or fails its checksums."""
        return shards.read_shard(self.fs, self.shard_rel(index), verify_checksums=verify_checksums,
                                 encoding=self.encoding, samples=self.manifest.has_samples)

    def shard_num_sequences(self, index: int) -> int:
        """Sequence count of a complete shard, from its attributes (no decoding)."""
        attrs = self.shard_attrs(index)
        if not attrs or attrs.get("complete") is not True:
            raise CorruptShardError(f"shard {self.shard_location(index)} is not complete (missing or "
                                    "half-written); wait for the teacher stage or run `atkd verify`")
        try:
            return int(attrs["counts"]["num_sequences"])
        except (KeyError, TypeError, ValueError):
            raise CorruptShardError(f"shard {self.shard_location(index)} has no counts.num_sequences "
                                    "attribute; run `atkd verify` on the cache") from None
