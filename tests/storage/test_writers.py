"""Real processes on one local cache: a writer killed mid-shard, two writers sharing a plan."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from storage import lease as leases
from storage.cache import Cache
from storage.fs import CacheFS
from tests.support.synthetic import build_cache, make_identity, make_plan, shard_for_plan

ROOT = Path(__file__).resolve().parents[2]

# Writes shard 1 and dies on the way: at a named crash point (ATKD_FAULT_POINT, storage/faults.py),
# or, for "arrays", hangs after signalling the parent once some arrays are written (no named point
# there: it blocks zarr's event loop), to be SIGKILLed.
KILLED_WRITER = textwrap.dedent("""
    import sys, time, pathlib
    from storage.cache import Cache
    from tests.support.synthetic import shard_for_plan
    url, ready, where = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
    if where == "arrays":
        from zarr.core.group import AsyncGroup
        real, calls = AsyncGroup.create_array, []
        async def create_array(self, *a, **k):
            result = await real(self, *a, **k)
            calls.append(1)
            if len(calls) == 3:
                ready.write_text("ready")
                time.sleep(600)
            return result
        AsyncGroup.create_array = create_array
    cache = Cache.open(url)
    cache.write_shard(1, shard_for_plan(cache.manifest.shard_plan[1]))
""")

WORKER = textwrap.dedent("""
    import sys, time, json
    from storage.cache import Cache
    from tests.support.synthetic import make_identity, make_plan, shard_for_plan
    url, name, sizes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    cache = Cache.create_or_open(url, make_identity(), make_plan(sizes))
    while (lease := cache.claim_shard(name, lease_seconds=60)) is not None:
        time.sleep(0.02)  # "teacher compute": lets the two workers interleave
        cache.write_shard(lease.shard_index, shard_for_plan(cache.manifest.shard_plan[lease.shard_index]),
                          lease=lease)
        print(lease.shard_index, flush=True)
""")


def _python(script: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.integration
@pytest.mark.parametrize("where", ["arrays", "shard.write", "shard.commit"])
def test_writer_killed_mid_shard_leaves_nothing_visible(local_url, tmp_path, where):
    """Killed with some arrays written; with all written, not marked complete; complete, not renamed."""
    cache = build_cache(local_url, [3, 5], write=[0])
    ready = tmp_path / "ready"
    if where == "arrays":
        proc = _python(KILLED_WRITER, local_url, str(ready), where)
        deadline = time.time() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "writer never reached the kill point"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    else:
        proc = _python(KILLED_WRITER, local_url, str(ready), where, env={"ATKD_FAULT_POINT": f"{where}:1"})
    assert proc.wait(60) == -signal.SIGKILL, proc.communicate()
    assert cache.completed_shards() == [0]
    assert not cache.is_shard_complete(1) and not cache.fs.exists(cache.shard_rel(1))
    assert any(".partial-" in n for n in cache.fs.list("shards"))  # the debris, under another name
    data = shard_for_plan(cache.manifest.shard_plan[1])
    cache.write_shard(1, data)
    assert Cache.open(local_url).read_shard(1).equals(data)


@pytest.mark.integration
def test_two_writer_processes_write_each_shard_exactly_once(local_url):
    sizes = [2, 3, 0, 4, 1, 2, 3, 2, 1, 2]
    procs = [_python(WORKER, local_url, f"worker-{i}", json.dumps(sizes)) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    written = [[int(x) for x in out.split()] for out, _ in outs]
    assert sorted(written[0] + written[1]) == list(range(len(sizes))), written
    assert written[0] and written[1], f"one worker did everything: {written}"
    cache = Cache.open(local_url)
    assert cache.completed_shards() == list(range(len(sizes)))
    assert cache.manifest.shards_done == list(range(len(sizes)))
    for i in range(len(sizes)):
        attrs = cache.shard_attrs(i)
        assert i in written[int(attrs["worker_id"].split("-")[1])]
        assert cache.read_shard(i).equals(shard_for_plan(cache.manifest.shard_plan[i]))
    assert cache.fs.list("leases") == []  # lease files are removed after each commit


def test_racing_takeovers_of_an_expired_lease_have_one_winner(local_url):
    cache = Cache.create_or_open(local_url, make_identity(), make_plan([1]))
    assert leases.try_acquire(cache.fs, 0, "dead", lease_seconds=0.01) is not None
    time.sleep(0.05)
    won, barrier = [], threading.Barrier(8)

    def take(i):
        fs = CacheFS(local_url)
        barrier.wait()
        if leases.try_acquire(fs, 0, f"t{i}", lease_seconds=60) is not None:
            won.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert leases.current_lease(cache.fs, 0).worker_id == f"t{won[0]}"


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(local_url):
    """A rerun after `kill -9` must not wait lease_seconds for its own dead lease."""
    cache = build_cache(local_url, [3, 3], write=[])
    held = cache.claim_shard("killed", lease_seconds=3600)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)  # that process has exited
    held.record.pid = dead_pid
    CacheFS(local_url).write_bytes_atomic(leases.lease_rel(0, 0), held.record.to_bytes())
    taker = cache.claim_shard("rerun", lease_seconds=60)
    assert taker.shard_index == 0 and taker.record.generation == 1


def test_lease_of_a_live_process_is_respected(local_url):
    cache = build_cache(local_url, [3, 3], write=[])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        held = cache.claim_shard("alive", lease_seconds=3600)
        held.record.pid = sleeper.pid
        CacheFS(local_url).write_bytes_atomic(leases.lease_rel(0, 0), held.record.to_bytes())
        assert cache.claim_shard("other", lease_seconds=60).shard_index == 1
    finally:
        sleeper.kill()
        sleeper.wait()
