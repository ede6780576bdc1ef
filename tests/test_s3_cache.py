"""The cache on S3 (s3fs) against a local S3 server (moto on 127.0.0.1, started by the tests), through
the same CLI a user runs: stage one with 2 workers, verify / inspect / status on the URL, kills and
reruns, students streaming from it (also while stage one writes) and resuming after kills, a server
failing mid-write, a race of lease claimers, and bad input (wrong bucket, missing credentials, a
scheme without its package, a server gone). The storage conformance suite runs on S3 too
(tests/storage/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

import pytest

from tests.support import harness as fh
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, FlakyProxy, free_port
from tests.support.synthetic import build_cache, shard_for_plan
from tests.support.fixtures import atkd_here

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def fsspec_config_kept():
    """Loading a config registers its cache.storage_options process-wide (storage/fs.py): undo it."""
    import fsspec.config

    saved, env = {k: dict(v) for k, v in fsspec.config.conf.items()}, os.environ.get("FSSPEC_S3")
    try:
        yield
    finally:
        fsspec.config.conf.clear()
        fsspec.config.conf.update(saved)
        if env is None:
            os.environ.pop("FSSPEC_S3", None)
        else:
            os.environ["FSSPEC_S3"] = env


def s3_url(name: str) -> str:
    return f"s3://atkd-test/{name}-{uuid.uuid4().hex[:8]}/cache"


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_llama_dir, train_jsonl, local_s3):
    """The tiny teacher, 40 rows (8 shards of 5), and the uninterrupted local teacher and student runs."""
    root = tmp_path_factory.mktemp("s3")
    ws = {"root": root, "model": str(tiny_llama_dir), "data": str(train_jsonl), "s3": local_s3}
    ref = config(ws, "ref", str(root / "ref" / "cache"))
    for stage in ("teacher", "student"):
        rc, out = fh.run_atkd([stage, str(ref)], root / "logs" / f"ref-{stage}.log")
        assert rc == 0, out
    ws["ref_cache"] = fh.cache_snapshot(str(root / "ref" / "cache"))
    ws["ref_student"] = fh.student_snapshot(root / "ref" / "students" / "s1")
    return ws


def config(ws, name: str, cache: str, **cache_keys) -> Path:
    root = ws["root"]
    return fh.write_config(root / f"{name}.yaml", model=ws["model"], data=ws["data"], run_dir=str(root / name),
                           cache="", extra={"cache": {"path": cache, "sequences_per_shard": 5, **cache_keys}})


def test_two_workers_on_s3_equal_a_local_run_and_credentials_stay_out_of_manifest_and_logs(ws, capsys):
    """Credentials only in cache.storage_options (none in the environment): 2 workers get them, and
    neither the manifest, the bucket, the saved configs nor the logs contain them."""
    s3, url = ws["s3"], s3_url("workers")
    options = {"endpoint_url": s3.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY}
    cfg = config(ws, "workers", url, storage_options=options)
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_ENDPOINT_URL": "",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    rc, out = fh.run_atkd(["teacher", str(cfg), "--workers", "2"], ws["root"] / "logs" / "workers.log",
                          env=env, mode="subprocess")
    assert rc == 0, out[-3000:]
    assert "worker 0: pid" in out and "worker 1: pid" in out
    assert fh.compare_caches(fh.cache_snapshot(url), ws["ref_cache"]) == []

    rc, text = atkd_here(capsys, "verify", url)
    assert rc == 0 and "8/8 shards done, 0 pending, 0 bad" in text, text
    rc, text = atkd_here(capsys, "inspect", url)
    assert rc == 0 and "shards done 8/8" in text and "40 sequences" in text, text
    with fsspec_config_kept():
        rc, text = atkd_here(capsys, "status", str(cfg))
    assert rc == 0 and "shards done 8/8" in text, text

    bucket = ws["s3"].client()
    prefix = url.removeprefix("s3://atkd-test/")
    for key in s3.keys("atkd-test", prefix.rsplit("/", 1)[0]):
        body = bucket.get_object(Bucket="atkd-test", Key=key)["Body"].read()
        assert SECRET_KEY.encode() not in body and ACCESS_KEY.encode() not in body, key
    for path in (ws["root"] / "workers").rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            assert SECRET_KEY.encode() not in text and ACCESS_KEY.encode() not in text, path
    assert SECRET_KEY not in out and ACCESS_KEY not in out


def test_teacher_killed_mid_shard_on_s3_reruns_to_the_uninterrupted_cache(ws):
    url = s3_url("kills")
    cfg = config(ws, "kills", url)
    kills = ["shard.write:2", "shard.commit:1", "shard.committed:2", 1.5]
    counts = fh.run_campaign(["teacher", str(cfg)], kills, ws["root"] / "logs" / "kills", env=ws["s3"].env())
    assert counts.kills >= 3 and counts.mismatches == 0, counts
    assert fh.compare_caches(fh.cache_snapshot(url), ws["ref_cache"]) == []
    from storage.verify import verify_cache

    assert verify_cache(url).ok


@pytest.fixture(scope="module")
def s3_cache(ws):
    """A complete copy of the reference cache on S3 (written by stage one there)."""
    url = s3_url("students")
    rc, out = fh.run_atkd(["teacher", str(config(ws, "s3-teacher", url))], ws["root"] / "logs" / "s3-teacher.log",
                          env=ws["s3"].env())
    assert rc == 0, out
    return url


def test_student_from_s3_has_the_local_losses_and_resumes_after_kills(ws, s3_cache):
    cfg = config(ws, "student-s3", s3_cache)
    kills = ["student.step:3", "ckpt.rename:1", "ckpt.optim:2"]
    counts = fh.run_campaign(["student", str(cfg)], kills, ws["root"] / "logs" / "student-s3", env=ws["s3"].env())
    assert counts.kills == 3, counts
    got = fh.student_snapshot(ws["root"] / "student-s3" / "students" / "s1")
    assert fh.compare_students(got, ws["ref_student"]) == []


def test_follow_streams_an_s3_cache_while_stage_one_writes_it(ws):
    from storage.cache import Cache
    from storage.dataset import CacheDataset

    url = s3_url("follow")
    proc = fh.atkd(["teacher", str(config(ws, "follow", url))], ws["root"] / "logs" / "follow.log",
                   env=ws["s3"].env())
    try:
        deadline = time.monotonic() + 180
        while not Cache.exists(url):
            assert proc.poll() is None and time.monotonic() < deadline, proc.output()
            time.sleep(0.2)
        done_at_start = len(Cache.open(url).completed_shards())
        seen = [b["example_ids"].tolist() for b in CacheDataset(url, 4, seed=1, follow=True, epochs=1,
                                                                drop_last=False, follow_timeout=180)]
        assert proc.wait(180) == 0, proc.output()
    finally:
        proc.kill()
    assert done_at_start < 8  # the reader started before the cache was complete
    assert sorted(sum(seen, [])) == list(range(40))
    again = [b["example_ids"].tolist() for b in CacheDataset(url, 4, seed=1, follow=True, epochs=1,
                                                             drop_last=False)]
    assert again == seen  # the order does not depend on when shards appeared


@pytest.mark.parametrize("fraction", [0.05, 0.6])
def test_server_failing_mid_write_gives_storage_io_error_and_never_a_complete_shard(ws, fraction):
    """A proxy in front of the server drops every connection after `fraction` of a shard's bytes
    (fewer retries than s3fs's and botocore's defaults, which take ~40 s to give up here)."""
    from storage.cache import Cache
    from storage.errors import StorageIOError
    from storage.verify import verify_cache

    proxy = FlakyProxy(ws["s3"].port)
    url = s3_url("flaky")
    try:
        cache = build_cache(url, [40, 40, 40], write=[0], endpoint_url=proxy.endpoint,
                            config_kwargs={"retries": {"max_attempts": 1}})
        data = shard_for_plan(cache.manifest.shard_plan[1])
        before = proxy.bytes_up
        cache.write_shard(1, data)  # how many bytes one shard takes
        per_shard = proxy.bytes_up - before
        proxy.fail_after(int(fraction * per_shard))
        t = time.monotonic()
        with pytest.raises(StorageIOError) as err:
            cache.write_shard(2, shard_for_plan(cache.manifest.shard_plan[2]))
        took = time.monotonic() - t
        assert url in str(err.value) and "shard 2" in str(err.value), err.value
        assert "\n" not in str(err.value)
    finally:
        proxy.close()
    report = verify_cache(url)  # straight to the server
    assert not report.bad, report.summary()
    assert Cache.open(url).completed_shards() == [0, 1]
    assert not Cache.open(url).is_shard_complete(2), f"failed after {took:.1f}s"
    Cache.open(url).write_shard(2, shard_for_plan(cache.manifest.shard_plan[2]))  # a rerun writes it
    assert verify_cache(url).ok


def test_eight_claimers_per_shard_have_exactly_one_winner_over_fifty_rounds(local_s3):
    from bench.s3_bench import race_claims

    winners, _ = race_claims(s3_url("race").replace("/cache", "/race"), claimers=8, rounds=50, env=local_s3.env())
    assert winners == [1] * 50


def test_bad_input_one_line_naming_the_url_and_cause(ws, capsys, monkeypatch):
    import fsspec

    def verify(url: str) -> str:
        """`atkd inspect` fails in one line; `atkd verify` reports the same cause as its ERROR line."""
        fsspec.filesystem("s3").clear_instance_cache()
        rc, text = atkd_here(capsys, "inspect", url)
        assert rc == 1 and "Traceback" not in text and len(text.strip().splitlines()) == 1, text
        assert url in text, text
        rc, report = atkd_here(capsys, "verify", url)
        assert rc == 1 and "Traceback" not in report and text.split(": ", 2)[-1][:60] in report, report
        return text

    assert "the bucket 'no-such-bucket' does not exist" in verify("s3://no-such-bucket/cache")
    assert "Please install gcsfs" in verify("gs://bucket/cache")
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
        assert "Could not connect to the endpoint URL" in verify(s3_url("gone"))
    with monkeypatch.context() as m:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            m.delenv(key)
        m.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        m.setenv("AWS_CONFIG_FILE", "/nonexistent")
        assert "NoCredentialsError: Unable to locate credentials" in verify(s3_url("nocreds"))
    fsspec.filesystem("s3").clear_instance_cache()


def test_teacher_into_a_missing_bucket_fails_in_one_line_and_writes_nothing(ws, capsys):
    with fsspec_config_kept():
        rc, text = atkd_here(capsys, "teacher", str(config(ws, "nobucket", "s3://no-such-bucket/cache")))
    assert rc == 1 and "Traceback" not in text, text
    assert "StorageIOError" in text and "s3://no-such-bucket/cache/manifest.json" in text, text
    assert "The specified bucket does not exist" in text, text


def test_several_workers_refused_on_a_backend_without_atomic_exclusive_create(ws, capsys, monkeypatch):
    url = f"memory://atkd-{uuid.uuid4().hex[:8]}/cache"
    cfg = config(ws, "memory", url)
    rc, text = atkd_here(capsys, "teacher", str(cfg), "--workers", "2")
    assert rc == 1 and "BackendError: 2 teacher workers cannot share the cache" in text, text
    assert "in-memory filesystem of one process" in text and "one worker" in text, text
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")  # an array task is one of several writers
    rc, text = atkd_here(capsys, "teacher", str(cfg))
    assert rc == 1 and "a SLURM array of 4 tasks cannot share the cache" in text, text
    from storage.cache import Cache

    assert not Cache.exists(url)  # refused before anything was written
