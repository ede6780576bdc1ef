"""Exceptions raised by the cache storage layer, and the root of every atkd error.

`AtkdError` is the base of every error atkd raises for a problem the user can
fix (config, data, models, the cache, the disk): the CLI prints its message
without a traceback; any other exception is a bug and keeps its traceback.
It lives here because `storage` is the bottom layer: `stages` and `pipeline`
import it from here, and storage imports nothing of theirs.

The storage errors live in one module so that `cache`, `shard`, `verify` and
`dataset` raise the same types, and callers can catch `StorageError` for any
of them. Kinds that replaced a builtin (ValueError, RuntimeError, OSError)
still derive from it, so `except ValueError` callers keep working.
"""


class AtkdError(Exception):
    """Base class of every error whose message is written for the user (what, where, what to do)."""


class StorageError(AtkdError):
    """Base class for every error raised by `storage`."""


class ManifestError(StorageError):
    """manifest.json is missing, unreadable, or of another format version."""


class CacheMismatchError(StorageError):
    """An existing cache was built with another identity or shard plan."""


class CorruptShardError(StorageError):
    """A shard is incomplete, structurally wrong, or fails its checksums."""


class ShardExistsError(StorageError):
    """A complete shard already exists where a writer tried to commit one."""


class LeaseLostError(StorageError):
    """The caller's shard lease expired or was taken over by another worker."""


class StorageIOError(StorageError, OSError):
    """A disk or filesystem operation on the cache failed; the message says what and where.

    Built like OSError (`errno, message, filename`), so `errno` and `filename`
    stay available (the CLI turns ENOSPC/EACCES into advice)."""


class BackendError(StorageError):
    """A cache location cannot be used at all: its URL scheme has no fsspec backend installed, or
    the backend cannot give stage one's workers what leases need (atomic exclusive create)."""


class ReaderStateError(StorageError, ValueError):
    """The training reader cannot serve what was asked: a resume state of another cache, seed
    or order, or more top-k entries than the cache holds."""


class CacheNotReadyError(StorageError, RuntimeError):
    """The cache has nothing (or not enough) to read yet: shards missing, no sequences, or too few
    sequences for the world size and batch size."""


class StorageArgumentError(StorageError, ValueError):
    """A storage tool was given an argument outside its range (e.g. `inspect --shards -1`)."""
