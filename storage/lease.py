"""Shard leases: many writer processes or nodes split one shard plan safely.

A lease is a small JSON file ``<cache>/leases/shard-00000.gen-000000.json``
holding the worker id, a random token and an expiry time (wall clock, seconds
since the epoch; nodes sharing a cache are assumed to have roughly synced
clocks, which leases need anyway).

Why generations instead of rename-based takeover: object stores have no atomic
rename, but they do have exclusive create. The current lease of a shard is the
highest generation present. A free shard is taken by exclusive-creating
generation 0; an expired (or released) generation g is taken over by
exclusive-creating generation g+1, so of several takers exactly one wins on
every backend that has exclusive create (see storage/fs.py). The holder renews
by rewriting its own file; a renewal fails (LeaseLostError) once the lease has
expired or a higher generation exists, and a worker that cannot renew must stop
working on the shard. As a last line of defence the local shard commit is a
rename that refuses to replace a committed shard.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from storage.errors import LeaseLostError
from storage.files import pid_alive
from storage.fs import CacheFS

LEASES_DIR = "leases"


def lease_rel(index: int, generation: int) -> str:
    return f"{LEASES_DIR}/shard-{index:05d}.gen-{generation:06d}.json"


@dataclass
class LeaseRecord:
    shard_index: int
    generation: int
    worker_id: str
    token: str
    expires_at: float
    released: bool = False
    host: str = ""  # where the holder runs, so a rerun on that host ...
    pid: int = 0  # ... can see at once that the holder process is dead

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    def is_live(self, now: float | None = None) -> bool:
        if self.released or (now if now is not None else time.time()) >= self.expires_at:
            return False
        return not self._holder_dead_here()

    def _holder_dead_here(self) -> bool:
        """True when the holder ran on this host and its process no longer exists.

        A killed worker's lease would otherwise block its shard until expiry;
        with this, rerunning on the same machine continues at once. Leases of
        other hosts (or a reused pid) still wait for expiry, which is safe.
        """
        if not self.pid or self.host != socket.gethostname():
            return False
        return not pid_alive(self.pid)


def _read_record(fs: CacheFS, index: int, generation: int) -> LeaseRecord | None:
    try:
        raw = json.loads(fs.read_bytes(lease_rel(index, generation)))
        return LeaseRecord(**raw)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        # Unreadable lease: treat as expired so a dead writer cannot block a shard.
        return LeaseRecord(index, generation, "<unreadable>", "", expires_at=0.0)


def current_lease(fs: CacheFS, index: int) -> LeaseRecord | None:
    """The highest-generation lease of shard ``index`` (None if it was never leased).

    Generations are probed upwards rather than listed: takeovers are rare, so
    this is one or two small reads, and listing a big lease dir is avoided.
    """
    record, generation = None, 0
    while True:
        nxt = _read_record(fs, index, generation)
        if nxt is None:
            return record
        record, generation = nxt, generation + 1


class Lease:
    """A held lease; pass it to Cache.write_shard, renew it while working."""

    def __init__(self, fs: CacheFS, record: LeaseRecord, lease_seconds: float) -> None:
        self._fs = fs
        self.record = record
        self.lease_seconds = lease_seconds

    @property
    def shard_index(self) -> int:
        return self.record.shard_index

    @property
    def worker_id(self) -> str:
        return self.record.worker_id

    def __repr__(self) -> str:
        return (f"Lease(shard={self.shard_index}, worker={self.worker_id!r}, gen={self.record.generation}, "
                f"expires_in={self.record.expires_at - time.time():.0f}s)")

    def check(self) -> None:
        """Raise LeaseLostError unless this lease is still ours and unexpired."""
        now = time.time()
        if not self.record.is_live(now):
            raise LeaseLostError(f"lease on shard {self.shard_index} held by {self.worker_id!r} expired "
                                 f"{now - self.record.expires_at:.0f}s ago; another worker may take it over. "
                                 "Renew leases more often than lease_seconds.")
        latest = current_lease(self._fs, self.shard_index)
        if latest is None or latest.token != self.record.token:
            other = latest.worker_id if latest else "<nobody>"
            raise LeaseLostError(f"lease on shard {self.shard_index} of worker {self.worker_id!r} was "
                                 f"taken over by {other!r}; stop working on this shard")

    def renew(self, lease_seconds: float | None = None) -> None:
        """Extend the expiry; raises LeaseLostError if the lease is no longer ours."""
        self.check()
        if lease_seconds is not None:
            self.lease_seconds = lease_seconds
        self.record.expires_at = time.time() + self.lease_seconds
        self._fs.write_bytes_atomic(lease_rel(self.shard_index, self.record.generation), self.record.to_bytes())

    def release(self) -> None:
        """Give the shard back (e.g. on a handled error) so another worker can take it."""
        try:
            self.check()
        except LeaseLostError:
            return
        self.record.released = True
        self._fs.write_bytes_atomic(lease_rel(self.shard_index, self.record.generation), self.record.to_bytes())


def try_acquire(fs: CacheFS, index: int, worker_id: str, lease_seconds: float) -> Lease | None:
    """Take shard ``index`` if nobody holds a live lease on it; None otherwise."""
    latest = current_lease(fs, index)
    if latest is not None and latest.is_live():
        return None
    generation = 0 if latest is None else latest.generation + 1
    record = LeaseRecord(index, generation, str(worker_id), uuid.uuid4().hex, time.time() + lease_seconds,
                         host=socket.gethostname(), pid=os.getpid())
    if not fs.create_exclusive(lease_rel(index, generation), record.to_bytes()):
        return None  # another worker won this generation
    return Lease(fs, record, lease_seconds)


def remove_leases(fs: CacheFS, index: int) -> None:
    """Delete every lease file of a shard (after it is committed)."""
    generation = 0
    while fs.exists(lease_rel(index, generation)):
        fs.remove(lease_rel(index, generation))
        generation += 1


def default_worker_id() -> str:
    """This process's worker id when none is configured: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def release_quietly(lease: Lease) -> None:
    """Release after a failure, best effort: an unreleased lease expires (lease_seconds) anyway."""
    try:
        lease.release()
    except Exception:  # noqa: S110
        pass


class Heartbeat:
    """Renews a lease in the background until its shard is committed or dropped."""

    def __init__(self, lease, lease_seconds: float):
        self.lease, self.error = lease, None
        self._interval = max(lease_seconds / 4.0, 0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"lease-{lease.shard_index}")
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self._interval):
            try:
                self.lease.renew()
            except Exception as e:  # LeaseLostError, or the filesystem failing
                self.error = e
                return

    def raise_if_lost(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
