"""Write and read one shard: a zarr v3 group with the format v1 arrays (v2: plus sample arrays and/or an encoded top-k).

Commit protocol (a half-written shard is never read):
- local/NFS: the group is written under ``shard-00000.zarr.partial-<uuid>``
  and renamed into place; the rename refuses to replace an existing shard, so
  of two racing writers exactly one commit wins.
- fsspec object stores (no atomic rename): written in place, with the group
  attribute ``complete: true`` written last. Readers accept only groups whose
  attributes say ``complete: true`` (on both backends).

Group attributes: ``format_version``, ``counts`` (sequences, tokens, positions,
top_k), ``checksums`` (sha256 of each decoded array's C-order bytes, so the
check is independent of codec and chunking), ``codec``, ``complete``, plus
what the writers add (``shard_index``, ``written_at``, ``worker_id``; stage one: ``data``, ``rows``);
see docs/cache-format.md. Format v2's optional features: the sample arrays of
sampled targets (stored as they are), and a lossy log-prob encoding
(storage/encoding.py) applied on write and undone on read, named in ``logprob_encoding``.

Only zarr's public API is used (zarr.open_group, Group.create_array, group
attributes; tests/storage/test_public_api.py checks it), so a zarr upgrade
cannot break the format through a private helper.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle
from zarr.errors import GroupNotFoundError

from storage.encoding import LogprobEncoding, describe_record
from storage.errors import CorruptShardError, ShardExistsError, StorageIOError
from storage.faults import fault_point
from storage.fs import CacheFS, describe_error, is_backend_error
from storage.schema import ARRAY_NAMES, SUPPORTED_VERSIONS, ShardData, format_version_for

SHARDS_DIR = "shards"

# Uncompressed bytes per chunk. A shard is normally read whole, so chunks are
# large (few objects, little per-chunk overhead on object stores) but not one
# per array, so zarr can decode several chunks of a big array in parallel.
CHUNK_BYTES = 8 << 20

# Codec presets; "default" is what write_shard uses. Measured with
# bench/cache_bench.py (1.05M positions, k=64, Zipf-like ids over a 32k vocab):
#   default (ids zstd5+bitshuffle, log-probs zstd5+shuffle)  2.43 B per top-k entry
#     = ids 1.31 B + log-probs 1.13 B (raw: 4 + 2 B)
#   zstd5 byte-shuffle for both 2.46, bitshuffle for both 2.46, lz4 2.80 (3x faster
#   to write), zstd9 2.26 but ~25x slower to write (~3k positions/s per core).
# Shuffling groups the near-constant high bytes/bits (ids < 2^16; sign and
# exponent of log-probs) so zstd removes them; no shuffle cost ~27% more (200k-row probe).
CODEC_PRESETS: dict[str, dict[str, Any]] = {
    "default": {"int": ("zstd", 5, "bitshuffle"), "float": ("zstd", 5, "shuffle")},
    "shuffle": {"int": ("zstd", 5, "shuffle"), "float": ("zstd", 5, "shuffle")},
    "bitshuffle": {"int": ("zstd", 5, "bitshuffle"), "float": ("zstd", 5, "bitshuffle")},
    "lz4": {"int": ("lz4", 5, "bitshuffle"), "float": ("lz4", 5, "shuffle")},
    "zstd9": {"int": ("zstd", 9, "bitshuffle"), "float": ("zstd", 9, "shuffle")},
}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.zarr"


def shard_rel(index: int) -> str:
    """Path of shard ``index`` relative to the cache root."""
    return f"{SHARDS_DIR}/{shard_name(index)}"


def array_checksum(a: np.ndarray) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(a).data).hexdigest()


# Format v2's sample ids (ascending per position, mostly < 2^16) compress ~20% better
# byte-shuffled than bit-shuffled (bench/cache_bench.py --sampled).
_SHUFFLE_BY_NAME = {"sample_ids": "shuffle"}


def _compressor(dtype: np.dtype, preset: str, name: str = "") -> BloscCodec:
    cname, clevel, shuffle = CODEC_PRESETS[preset]["float" if dtype.kind == "f" else "int"]
    shuffle = _SHUFFLE_BY_NAME.get(name, shuffle)
    return BloscCodec(cname=cname, clevel=clevel, shuffle=BloscShuffle(shuffle), typesize=dtype.itemsize)


def _chunks(a: np.ndarray) -> tuple[int, ...]:
    row_bytes = a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
    rows = max(1, min(a.shape[0], CHUNK_BYTES // max(1, row_bytes)))
    return (rows, *a.shape[1:])


def write_shard(fs: CacheFS, rel: str, data: ShardData, *, codec: str = "default",
                encoding: LogprobEncoding | None = None, extra_attrs: dict[str, Any] | None = None,
                before_commit: Callable[[], None] | None = None) -> None:
    """Write ``data`` as a complete shard at ``rel`` (see the module docstring).

    ``before_commit`` runs after the arrays are written and before the shard
    becomes visible (the lease check); if it raises, nothing is committed.
    Raises ShardExistsError if a complete shard is already there. The caller
    validates ``data`` first (Cache.write_shard does). ``encoding``: how the
    top-k is stored (default exact); checksums are of the stored arrays.
    """
    encoding = encoding or LogprobEncoding()
    stored = encoding.encode(data)
    attrs = {
        "format_version": format_version_for(data.has_samples, encoding.lossy),
        "counts": data.counts(),
        "checksums": {name: array_checksum(a) for name, a in stored.items()},
        "codec": codec,
        **({"logprob_encoding": encoding.describe()} if encoding.lossy else {}),
        **(extra_attrs or {}),
    }
    if fs.is_local:
        tmp = f"{rel}.partial-{uuid.uuid4().hex}"
        try:
            _write_group(fs.zarr_store(tmp), stored, attrs, codec)
            fault_point("shard.write", rel)  # arrays written, not yet marked complete
            _mark_complete(fs.zarr_store(tmp))
            if before_commit is not None:
                before_commit()
            fault_point("shard.commit", rel)  # complete under the temporary name, not renamed
            try:
                fs.rename(tmp, rel)
            except OSError as e:  # ENOTEMPTY/EEXIST: another writer committed first
                raise ShardExistsError(f"{fs.display(rel)} already exists; not replacing it") from e
            fault_point("shard.committed", rel)  # visible; leases and manifest not yet updated
        except BaseException:
            _remove_partial(fs, tmp)
            raise
    else:
        if is_complete(fs, rel):
            raise ShardExistsError(f"{fs.display(rel)} is already complete; not replacing it")
        _write_group(fs.zarr_store(rel), stored, attrs, codec)
        fault_point("shard.write", rel)  # every array written, `complete` still false
        if before_commit is not None:
            before_commit()
        fault_point("shard.commit", rel)  # lease checked, not yet marked complete
        _mark_complete(fs.zarr_store(rel))
        fault_point("shard.committed", rel)  # visible; leases and manifest not yet updated


def _remove_partial(fs: CacheFS, tmp: str, settle_seconds: float = 5.0) -> None:
    """Delete a failed write's temporary group.

    When one chunk write fails (disk full), zarr's other chunk writes of the
    same call may still be landing from worker threads, so one rmtree can race
    with them (files reappear, or rmtree fails with ENOTEMPTY). Remove until the
    directory stays gone, within a bounded time; a leftover is invisible to
    readers anyway and `verify` reports it.
    """
    deadline = time.monotonic() + settle_seconds
    while True:
        try:
            fs.remove(tmp, recursive=True)
        except OSError:
            pass
        time.sleep(0.05)
        if not fs.exists(tmp) or time.monotonic() > deadline:
            return


# zarr's synchronous API runs every call on zarr's own event loop thread and
# may be called from many threads at once; calls made from a small pool of
# threads therefore overlap their I/O like one asyncio.gather would (one round
# trip of latency for eight arrays on object stores), with zarr's public API only.
_POOL_THREADS = 8
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool_after_fork() -> None:
    """A forked child (a reader's worker process) has none of its parent's threads."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _concurrently(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """[fn(item) ...] run on a shared thread pool, in order; the first exception is raised
    after every call has finished (so no write of a failed shard is still landing)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="atkd-zarr")
        pool = _pool
    futures = [pool.submit(fn, item) for item in items]
    errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
    return [f.result() for f in futures]


def _write_group(store, arrays: dict[str, np.ndarray], attrs: dict[str, Any], codec: str) -> None:
    """Create the group and all arrays; the arrays are written concurrently."""
    # mode="w" clears leftovers of an interrupted in-place write first.
    group = zarr.open_group(store, mode="w", zarr_format=3, attributes={**attrs, "complete": False})

    def write(item: tuple[str, np.ndarray]) -> None:
        name, a = item
        group.create_array(name, data=np.ascontiguousarray(a), chunks=_chunks(a),
                           compressors=[_compressor(a.dtype, codec, name)], fill_value=0)

    _concurrently(write, arrays.items())


def _mark_complete(store) -> None:
    """Last write of a shard: only now may readers use the group."""
    zarr.open_group(store, mode="r+", zarr_format=3).attrs.update({"complete": True})


UNREADABLE = "_unreadable"  # key read_attrs sets when zarr.json exists but cannot be parsed


def _open_group(fs: CacheFS, rel: str) -> tuple[Any, dict[str, Any] | None]:
    """(the read-only zarr group, its attributes); (None, None) when there is no group
    metadata, (None, {"_unreadable": True}) when there is but it is not a readable
    zarr v3 group (truncated or overwritten JSON, an array's metadata)."""
    try:
        group = zarr.open_group(fs.zarr_store(rel, read_only=True), mode="r", zarr_format=3)
    except (GroupNotFoundError, FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None, None
    except Exception as e:  # JSONDecodeError, ContainsArrayError, TypeError/ValueError on malformed metadata
        _raise_backend_error(e, fs, rel)
        return None, {UNREADABLE: True}
    attrs = group.attrs.asdict()
    return (group, attrs) if isinstance(attrs, dict) else (None, {UNREADABLE: True})


def read_attrs(fs: CacheFS, rel: str) -> dict[str, Any] | None:
    """The shard group's attributes, or None if there is no group metadata.

    Reads only the group's zarr.json (no array is touched); metadata that is
    there but unreadable gives ``{"_unreadable": True}``.
    """
    return _open_group(fs, rel)[1]


def read_attrs_many(fs: CacheFS, rels: list[str]) -> list[dict[str, Any] | None]:
    """``read_attrs`` of each of ``rels``, concurrently (object stores: about one latency, not N)."""
    if len(rels) <= 1:
        return [read_attrs(fs, rel) for rel in rels]
    return _concurrently(lambda rel: read_attrs(fs, rel), rels)


def is_complete(fs: CacheFS, rel: str) -> bool:
    attrs = read_attrs(fs, rel)
    return bool(attrs) and attrs.get("complete") is True


def read_shard(fs: CacheFS, rel: str, *, verify_checksums: bool = True,
               encoding: LogprobEncoding | None = None, samples: bool | None = None) -> ShardData:
    """Read a complete shard, decoding its top-k; CorruptShardError names the shard and every problem.
    ``encoding``: the one the manifest names (default exact); a shard stored otherwise is refused.
    ``samples``: whether the manifest says the cache holds sampled targets (None: as the shard says)."""
    arrays, problems = load_arrays(fs, rel, verify_checksums=verify_checksums, encoding=encoding, samples=samples)
    if problems:
        raise CorruptShardError(
            f"shard {fs.display(rel)} is unusable: " + "; ".join(problems)
            + ". Run `atkd verify` on the cache, then delete this shard directory and rerun "
              "the teacher stage to rewrite it.")
    return ShardData.from_arrays(arrays)


def load_arrays(fs: CacheFS, rel: str, *, verify_checksums: bool = True, encoding: LogprobEncoding | None = None,
                samples: bool | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Decode every array, check it against the group attributes and the encoding's
    invariants, and undo the log-prob encoding (``encoding``: the manifest's, default exact;
    ``samples``: the manifest's sampled targets, None to take the shard's word for it).

    Returns (the ShardData arrays, problems); shared by read_shard (raises) and verify (reports).
    """
    encoding = encoding or LogprobEncoding()
    group, attrs = _open_group(fs, rel)
    if attrs is None:
        return {}, ["no zarr.json: the shard is missing or was never committed"]
    if attrs.get(UNREADABLE):
        return {}, ["zarr.json is not valid JSON (truncated or overwritten)"]
    if attrs.get("complete") is not True:
        return {}, ["group attribute complete is not true (a half-written shard)"]
    version = attrs.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        return {}, [f"format_version {version!r}, this reader supports {', '.join(map(str, SUPPORTED_VERSIONS))}"]
    if attrs.get("logprob_encoding") != encoding.describe():
        return {}, [f"written with log-prob encoding {describe_record(attrs.get('logprob_encoding'))}, "
                    f"but the cache manifest says {describe_record(encoding.describe())}"]
    if samples is None:  # no manifest at hand: the shard's own checksums name its arrays
        samples = "sample_ids" in (attrs.get("checksums") or {})
    expected = format_version_for(samples, encoding.lossy)
    if version != expected:
        return {}, [f"format_version {version!r}, but a shard {'with' if samples else 'without'} sampled targets "
                    f"and with the {encoding.name} log-prob encoding is format v{expected}"]
    specs = encoding.array_specs(samples)
    try:
        decoded = _read_arrays(group, list(specs))
    except Exception as e:  # zarr raises various types on broken group metadata
        _raise_backend_error(e, fs, rel)
        return {}, [f"cannot open the zarr group ({type(e).__name__}: {e})"]
    for e in decoded.values():  # the store failing (network, credentials) says nothing about the shard
        if isinstance(e, Exception):
            _raise_backend_error(e, fs, rel)
    checksums = attrs.get("checksums", {})
    arrays: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for name, (dtype, ndim) in specs.items():
        a = decoded[name]
        if isinstance(a, KeyError):
            problems.append(f"array {name!r} is missing")
            continue
        if isinstance(a, Exception):
            problems.append(f"array {name!r} cannot be decoded ({type(a).__name__}: {a})")
            continue
        if a.dtype != dtype or a.ndim != ndim:
            problems.append(f"array {name!r} is {a.dtype} {a.ndim}-d, expected {dtype} {ndim}-d")
            continue
        if verify_checksums and checksums.get(name) != array_checksum(a):
            problems.append(f"array {name!r} fails its checksum (stored {checksums.get(name)!r})")
            continue
        arrays[name] = a
    problems += _check_counts(arrays, attrs.get("counts", {}))
    if problems:
        return arrays, problems
    problems = encoding.check(arrays)
    return (arrays if problems else encoding.decode(arrays)), problems


def _raise_backend_error(e: Exception, fs: CacheFS, rel: str) -> None:
    """Raise StorageIOError when reading failed in the store rather than in the shard's content
    (an unreachable server is no reason to call a shard half-written or corrupt)."""
    if is_backend_error(e) and not isinstance(e, (FileNotFoundError, KeyError, IsADirectoryError, NotADirectoryError)):
        code = e.errno if isinstance(e, OSError) else None
        raise StorageIOError(code, f"reading {fs.display(rel)} failed: {describe_error(e)}") from e


def _read_arrays(group, names: Iterable[str] = ARRAY_NAMES) -> dict[str, Any]:
    """name -> decoded array, or the exception reading it raised; all arrays concurrently.

    The arrays' metadata comes from one ``members()`` call; when that fails (a
    damaged array's zarr.json), each array is opened by name so the error
    names the array.
    """
    try:
        nodes = dict(group.members())
    except Exception:
        nodes = {}

    def one(name: str) -> tuple[str, Any]:
        try:
            node = nodes[name] if name in nodes else group[name]
            return name, np.asarray(node[...])
        except Exception as e:
            return name, e

    return dict(_concurrently(one, names))


def _check_counts(arrays: dict[str, np.ndarray], counts: dict[str, int]) -> list[str]:
    expect = {"example_ids": "num_sequences", "input_ids": "num_tokens", "target_positions": "num_positions"}
    problems = []
    for name, key in expect.items():
        if name in arrays and counts.get(key) != arrays[name].shape[0]:
            problems.append(f"array {name!r} has {arrays[name].shape[0]} entries, attrs say {key}={counts.get(key)}")
    return problems
