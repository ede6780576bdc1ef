"""One progress line for a whole cache, from the shards themselves.

Used by the parent of several teacher workers (pipeline/workers.py): it owns no
shard, so it reads progress where every worker leaves it, each committed
shard's attributes (`data.tokens`), and reports shards done, tokens per second
and the ETA, measured from the first shard it sees committed (the workers'
engine start-up is not the scoring's pace).
"""

from __future__ import annotations

import sys
import time


class CacheProgress:
    def __init__(self, cache_url: str, *, enabled: bool = True):
        self.url, self.enabled = cache_url, enabled
        self._cache = None
        self._seen: set[int] = set()
        self._tokens = 0
        self._t0 = None  # when the first shard committed after we started watching
        self._bar = None

    def _open(self):
        from storage.cache import Cache
        from storage.errors import ManifestError

        if self._cache is None:
            try:
                self._cache = Cache.open(self.url)
            except ManifestError:  # the workers have not created it yet
                return None
            self._seen = set(self._cache.completed_shards())  # done before we started: no rate
            if self.enabled:
                from stages.progress import tqdm

                self._bar = tqdm(total=self._cache.num_shards, initial=len(self._seen), unit="shard",
                                 desc="teacher", file=sys.stderr, dynamic_ncols=True)
        return self._cache

    def update(self) -> None:
        cache = self._open()
        if cache is None:
            return
        new = [i for i in cache.completed_shards() if i not in self._seen]
        first = self._t0 is None and bool(new)
        for i in new:
            attrs = cache.shard_attrs(i) or {}
            if not first:  # the first shards' tokens were scored before the clock started
                self._tokens += int((attrs.get("data") or {}).get("tokens", 0))
            self._seen.add(i)
        if first:
            self._t0 = time.perf_counter()
        if self._bar is not None and new:
            self._bar.n = len(self._seen)
            if first:
                from stages.progress import restart_clock

                restart_clock(self._bar)
            else:
                rate = self._tokens / max(time.perf_counter() - self._t0, 1e-9)
                self._bar.set_postfix_str(f"{rate:,.0f} tok/s (all workers)")
            self._bar.refresh()

    @property
    def tokens(self) -> int:
        return self._tokens

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
