"""Exceptions raised by the cache storage layer.

They live in one module so that `cache`, `shard`, `verify` and `dataset` raise
the same types, and callers can catch `StorageError` for any of them.
"""


class StorageError(Exception):
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
