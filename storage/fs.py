"""One small filesystem layer for the cache: local/NFS paths and any fsspec URL.

Everything else in `storage` goes through `CacheFS`, so the two commit
protocols (rename on local paths, "complete last" on object stores), the
exclusive-create primitive used by leases, and the translation of a backend's
own errors into `StorageIOError` (naming the URL and the cause) live in one place.

Guarantees by backend:
- local (and NFS): atomic replace via temp file + ``os.replace``
  (``storage.files.atomic_write``, shared with every other layer); exclusive
  create via a hard link of a private temporary file (atomic on local disks
  and on NFSv3+); directory rename is atomic and refuses to overwrite a
  non-empty directory.
- fsspec (``s3://``, ``memory://``, ...): a single ``put`` of the whole object
  is atomic on object stores. Exclusive create is ``open(mode="xb")``, which is
  atomic only where the backend makes it so: s3fs commits an "xb" file with one
  conditional put (``PutObject`` with ``If-None-Match: *``; the store refuses it
  with 412 when the key exists, which s3fs raises as FileExistsError), so of
  several creators exactly one wins. fsspec's base file class accepts "xb" on any
  backend without making it exclusive, so only the backends in
  ``_ATOMIC_CREATE`` are trusted with several writers; on any other (and on
  ``memory://``, which lives in one process) stage one refuses more than one
  worker (`shared_writers_problem`), and a single worker creates by
  check-then-write. There is no atomic rename on object stores, so nothing here
  relies on one.
- Listings are not cached for fsspec backends (``use_listings_cache=False``):
  other writers change the cache, and a stale listing must never hide a lease
  or a shard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.errors import BackendError, StorageError, StorageIOError
from storage.faults import fault_point
from storage.files import atomic_write

log = logging.getLogger(__name__)

# fsspec backends whose open(mode="xb") is an atomic create between processes and nodes
# (class name: why). Checked in each backend's source, see the module doc.
_ATOMIC_CREATE = {"S3FileSystem": "conditional put (If-None-Match: *)"}
# Protocols whose first path component is a bucket (or container) that must exist.
_BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "abfs", "az", "adl")
# Packages whose exceptions are a remote backend failing (credentials, network, server errors).
_BACKEND_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "adlfs", "azure", "urllib3",
                    "requests", "fsspec")


def is_backend_error(e: BaseException) -> bool:
    """An error of the filesystem or of a remote backend (not a bug of ours): OSError, or an
    exception class of botocore, aiohttp, ... (a missing credential, a refused connection)."""
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in _BACKEND_MODULES


def describe_error(e: BaseException) -> str:
    """One line: the error's own text (its class name when that says more), without a traceback."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = (lines[0][:300] + (" ..." if len(lines) > 1 or len(lines[0]) > 300 else "")) if lines else type(e).__name__
    return text if isinstance(e, OSError) else f"{type(e).__name__}: {text}"


def _version(fs) -> tuple[int, ...]:
    """The (year, month) of a backend package's calendar version, e.g. (2026, 7) for s3fs 2026.7.0."""
    import importlib

    text = getattr(importlib.import_module(type(fs).__module__.split(".")[0]), "__version__", "0")
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


# ---- storage options from the config (cache.storage_options) -------------------
_SECRET_KEY = re.compile(r"(^|_)(key|secret|token|password|passwd|credentials?)$|secret|token|password", re.I)
REDACTED = "<redacted>"


def redact_options(options: Any) -> Any:
    """A copy of storage options with every secret-looking value replaced by REDACTED (for the
    resolved config a run saves; the secrets travel to child processes in the environment)."""
    if isinstance(options, dict):
        return {k: (REDACTED if _SECRET_KEY.search(str(k)) and not isinstance(v, dict) else redact_options(v))
                for k, v in options.items()}
    return options


def _without_redacted(options: dict) -> dict:
    return {k: _without_redacted(v) if isinstance(v, dict) else v for k, v in options.items() if v != REDACTED}


def register_storage_options(url: str, options: dict) -> None:
    """Make ``options`` the defaults of every fsspec filesystem of ``url``'s protocol in this
    process (fsspec's own configuration), and of child processes (``FSSPEC_<PROTOCOL>``, which
    fsspec reads at import). Values a saved config redacted are left to what the environment has."""
    options = _without_redacted(options or {})
    if not options or "://" not in str(url):
        return
    import fsspec.config

    protocol = str(url).split("://", 1)[0].lower()
    fsspec.config.conf.setdefault(protocol, {}).update(options)
    os.environ[f"FSSPEC_{protocol.upper()}"] = json.dumps(fsspec.config.conf[protocol])


class CacheFS:
    """Paths relative to one cache root, on a local disk or an fsspec backend."""

    def __init__(self, url: str | os.PathLike, **storage_options: Any) -> None:
        self.url = str(url)
        if "://" in self.url and not self.url.startswith(("file://", "local://")):
            storage_options.setdefault("use_listings_cache", False)
        self.storage_options = dict(storage_options)
        try:
            self.fs, root = fsspec.url_to_fs(self.url, **storage_options)
        except (ImportError, OSError) as e:  # fsspec: "Install s3fs to access S3"; hdfs: no libjvm
            extra = " (pip install 'atkd[s3]')" if self.url.startswith(("s3://", "s3a://")) else ""
            raise BackendError(f"cannot open the cache at {self.url}: {describe_error(e)}{extra}") from None
        except ValueError as e:  # "Protocol not known: ..."
            raise BackendError(f"cannot open the cache at {self.url}: {describe_error(e)}; use a local path or "
                               "an fsspec URL (s3://bucket/prefix, ...)") from None
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self._warned_exclusive = False
        self._afs = None  # the async filesystem for zarr, made on first use (_async_fs)
        self._afs_pid = 0

    def __repr__(self) -> str:
        return f"CacheFS({self.url!r})"

    def __getstate__(self) -> dict:
        # The async filesystem is bound to zarr's event loop: made again where unpickled.
        return {**self.__dict__, "_afs": None}

    # ---- paths ------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """Backend path (no protocol for fsspec) of ``rel`` under the root."""
        if not rel:
            return self.root
        return f"{self.root}/{rel}" if self.root else rel

    def display(self, rel: str = "") -> str:
        """Human-readable location for error messages."""
        return self.path(rel) if self.is_local else f"{self.url.rstrip('/')}/{rel}"

    @property
    def backend(self) -> str:
        """The backend in words, for messages: 'local disk' or 'S3FileSystem (s3://)'."""
        if self.is_local:
            return "local disk"
        return f"{type(self.fs).__name__} ({self.url.split('://', 1)[0]}://)"

    # ---- errors -----------------------------------------------------------
    @contextlib.contextmanager
    def io(self, what: str, rel: str = ""):
        """Turn a backend's failure inside the block into StorageIOError saying what failed
        where and why (FileNotFoundError and our own errors pass: callers handle them)."""
        try:
            yield
        except (FileNotFoundError, StorageError):
            raise
        except Exception as e:
            if not is_backend_error(e):
                raise
            code = e.errno if isinstance(e, OSError) else None
            raise StorageIOError(code, f"{what} {self.display(rel)} failed: {describe_error(e)}") from e

    def missing_bucket(self) -> str | None:
        """The bucket of an object-store URL when it does not exist (or these credentials cannot
        see it); None when it exists or the URL has no bucket."""
        protocol = self.url.split("://", 1)[0].lower() if "://" in self.url else ""
        if protocol not in _BUCKET_PROTOCOLS:
            return None
        bucket = self.root.strip("/").split("/", 1)[0]
        with self.io("checking the bucket of"):
            return None if self.fs.exists(bucket) else bucket

    def shared_writers_problem(self) -> str | None:
        """Why several stage-one workers may not share this cache (None: they may).

        Leases rest on an exclusive create that exactly one of several processes or
        nodes wins; see the module doc for the backends that have one."""
        if self.is_local:
            return None
        name = type(self.fs).__name__
        if name == "MemoryFileSystem":
            return f"{self.url} is an in-memory filesystem of one process: other workers cannot see it"
        if name == "S3FileSystem" and _version(self.fs) < (2024, 12):
            return (f"s3fs {_version(self.fs)} predates its conditional puts (If-None-Match: *, s3fs 2024.12), "
                    "so its exclusive create is not atomic; pip install -U 'atkd[s3]'")
        if name not in _ATOMIC_CREATE:
            return (f"{self.url} is on {self.backend}, which has no exclusive create atkd knows to be atomic "
                    "(leases need one: of several workers claiming a shard exactly one must win)")
        return None

    # ---- files ------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        with self.io("checking", rel):
            return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        """Raises FileNotFoundError when missing."""
        if self.is_local:
            with open(self.path(rel), "rb") as f:
                return f.read()
        with self.io("reading", rel):
            return self.fs.cat_file(self.path(rel))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Readers see the old content or the new one, never a mix."""
        if self.is_local:
            target = self.path(rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            # e.g. fs.replace.manifest.json: the new copy is written, the old one still in place
            atomic_write(target, data, before_replace=lambda: fault_point(f"fs.replace.{rel}"))
        else:
            # One put of the whole object: atomic on object stores.
            with self.io("writing", rel):
                self.fs.pipe_file(self.path(rel), data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` only if it does not exist; True if we created it.

        Of several concurrent callers exactly one gets True (see the module
        docstring for the backends where this is weaker).
        """
        if self.is_local:
            target = self.path(rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            # Write a private temp file, then hard-link it into place: link(2)
            # fails if the target exists (atomic on local disks and NFS, the
            # classic NFS lock-file trick) and the file appears complete.
            tmp = f"{target}.partial-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        if type(self.fs).__name__ not in _ATOMIC_CREATE:
            # One writer only (stage one refuses more, see shared_writers_problem): check, then write.
            if not self._warned_exclusive:
                log.info("%s: exclusive create by check-then-write (%s); one writer only", self.url, self.backend)
                self._warned_exclusive = True
            if self.exists(rel):
                return False
            self.write_bytes_atomic(rel, data)
            return True
        with self.io("creating", rel):
            try:
                with self.fs.open(self.path(rel), "xb") as f:
                    f.write(data)
                return True
            except FileExistsError:
                return False
            except OSError as e:
                # A 412 the backend did not tag as If-None-Match, or S3's 409 ConditionalRequestConflict
                # (another conditional write of this key in flight): someone else creates it.
                text = str(e)
                if "pre-condition" in text or "ConditionalRequestConflict" in text:
                    return False
                raise

    def list(self, rel: str = "") -> list[str]:
        """Names (not paths) of the entries directly under ``rel``; [] if it is missing."""
        if self.is_local:
            try:
                return sorted(os.listdir(self.path(rel)))
            except FileNotFoundError:
                return []
        try:
            with self.io("listing", rel):
                entries = self.fs.ls(self.path(rel), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def remove(self, rel: str, recursive: bool = False) -> None:
        """Remove a file (or a directory tree with recursive=True); missing is fine."""
        try:
            if self.is_local and recursive and os.path.isdir(self.path(rel)):
                import shutil

                shutil.rmtree(self.path(rel))
            else:
                with self.io("removing", rel):
                    self.fs.rm(self.path(rel), recursive=recursive)
        except FileNotFoundError:
            pass

    def rename(self, src: str, dst: str) -> None:
        """Atomic rename on local/NFS; refuses to replace an existing directory.

        Only meaningful on local paths: object stores have no atomic rename,
        and the commit protocol there does not use one.
        """
        if not self.is_local:
            raise NotImplementedError(f"atomic rename is not available on {self.url}; "
                                      "object stores commit shards in place (see storage/shard.py)")
        os.rename(self.path(src), self.path(dst))

    def makedirs(self, rel: str) -> None:
        if self.is_local:
            os.makedirs(self.path(rel), exist_ok=True)
        else:
            with self.io("creating the directory", rel):
                self.fs.makedirs(self.path(rel), exist_ok=True)

    # ---- zarr -------------------------------------------------------------
    def zarr_store(self, rel: str, read_only: bool = False):
        """A zarr v3 store rooted at ``rel`` (LocalStore or FsspecStore)."""
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.path(rel), read_only=read_only)
        return zarr.storage.FsspecStore(self._async_fs(), path=self.path(rel), read_only=read_only)

    def _async_fs(self):
        """The asynchronous filesystem zarr's FsspecStore requires, made once per CacheFS.

        Filesystems with an async implementation (s3fs, gcsfs, ...) are opened
        again with ``asynchronous=True``; synchronous ones such as memory:// are
        wrapped in fsspec's ``AsyncFileSystemWrapper`` (the documented way, and
        what FsspecStore.from_url does). Made once: the wrapper is costly to
        build and an attribute read would otherwise pay for it every time.
        Made again in a forked child (a reader's worker process), whose event
        loop is not the parent's.
        """
        if self._afs is None or self._afs_pid != os.getpid():
            self._afs_pid = os.getpid()
            if self.fs.async_impl and self.fs.asynchronous:
                self._afs = self.fs
            elif self.fs.async_impl:
                self._afs = fsspec.url_to_fs(self.url, **{**self.storage_options, "asynchronous": True})[0]
            else:
                from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

                self._afs = AsyncFileSystemWrapper(self.fs, asynchronous=True)
        return self._afs
