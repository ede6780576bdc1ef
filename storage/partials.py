"""Leftover temporary shard directories of killed writers, and their removal.

A local shard is written as ``shards/shard-00003.zarr.partial-<uuid>`` and
renamed into place (storage/shard.py). A writer killed before the rename
leaves that directory behind. It is stale, and safe to delete, when its shard
is complete (someone else committed it) or when no live lease covers the shard:
a live writer always holds the lease of the shard it writes.
"""

from __future__ import annotations

import logging
import re
import time

from storage import lease as leases
from storage import shard as shards

log = logging.getLogger(__name__)

_PARTIAL = re.compile(r"^shard-(\d{5,})\.zarr\.partial-[0-9a-f]+$")


def partial_names(fs) -> list[tuple[str, int]]:
    """(directory name, shard index) of every partial shard directory."""
    found = []
    for name in fs.list(shards.SHARDS_DIR):
        m = _PARTIAL.match(name)
        if m:
            found.append((name, int(m.group(1))))
    return found


def is_stale(cache, index: int, now: float) -> bool:
    if index >= cache.num_shards or cache.is_shard_complete(index):
        return True
    record = leases.current_lease(cache.fs, index)
    return record is None or not record.is_live(now)


def remove_stale(cache) -> list[str]:
    """Remove the stale partials of ``cache`` (a storage.cache.Cache); return their locations."""
    if not cache.fs.is_local:
        return []
    now, removed = time.time(), []
    for name, index in partial_names(cache.fs):
        if not is_stale(cache, index, now):
            continue
        rel = f"{shards.SHARDS_DIR}/{name}"
        cache.fs.remove(rel, recursive=True)
        removed.append(cache.fs.display(rel))
    if removed:
        log.info("removed %d leftover partial shard director%s of interrupted writers: %s", len(removed),
                 "y" if len(removed) == 1 else "ies", ", ".join(removed))
    return removed
