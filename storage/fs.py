"""One small filesystem layer for the cache: local/NFS paths and any fsspec URL.

Everything else in `storage` goes through `CacheFS`, so the two commit
protocols (rename on local paths, "complete last" on object stores) and the
exclusive-create primitive used by leases live in one place.

Guarantees by backend:
- local (and NFS): atomic replace via temp file + ``os.replace``
  (``storage.files.atomic_write``, shared with every other layer); exclusive
  create via ``O_CREAT | O_EXCL`` (atomic on local disks and on NFSv3+);
  directory rename is atomic and refuses to overwrite a non-empty directory.
- fsspec (``memory://``, ``s3://``, ``gs://`` ...): a single ``put`` of the whole
  object is atomic on object stores; exclusive create uses ``open(mode="xb")``,
  which s3fs/gcsfs implement with conditional writes and ``memory://`` natively.
  Backends without "xb" fall back to check-then-write, which is NOT atomic
  between nodes (a warning is logged once); use such a backend with one writer.
  There is no atomic rename on object stores, so nothing here relies on one.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.faults import fault_point
from storage.files import atomic_write

log = logging.getLogger(__name__)


class CacheFS:
    """Paths relative to one cache root, on a local disk or an fsspec backend."""

    def __init__(self, url: str | os.PathLike, **storage_options: Any) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options)
        self.fs, root = fsspec.url_to_fs(self.url, **storage_options)
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

    # ---- files ------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        """Raises FileNotFoundError when missing."""
        if self.is_local:
            with open(self.path(rel), "rb") as f:
                return f.read()
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
        try:
            with self.fs.open(self.path(rel), "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):
            if not self._warned_exclusive:
                log.warning("%s does not support exclusive create (mode 'xb'); falling back to "
                            "check-then-write, which is not atomic across writers", type(self.fs).__name__)
                self._warned_exclusive = True
            if self.fs.exists(self.path(rel)):
                return False
            self.fs.pipe_file(self.path(rel), data)
            return True

    def list(self, rel: str = "") -> list[str]:
        """Names (not paths) of the entries directly under ``rel``; [] if it is missing."""
        if self.is_local:
            try:
                return sorted(os.listdir(self.path(rel)))
            except FileNotFoundError:
                return []
        try:
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
