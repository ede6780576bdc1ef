"""Backends for the storage conformance suite: a local directory, fsspec memory://, and S3 (s3fs
against a local moto server; integration tier, since the server is a subprocess)."""

from __future__ import annotations

import uuid

import fsspec
import pytest

BACKENDS = ["local", "memory", pytest.param("s3", marks=pytest.mark.integration)]


@pytest.fixture(params=BACKENDS)
def cache_url(request, tmp_path):
    """A fresh, empty cache location on each backend."""
    if request.param == "local":
        yield str(tmp_path / "cache")
        return
    if request.param == "s3":
        request.getfixturevalue("local_s3")
        yield f"s3://atkd-test/{uuid.uuid4().hex}/cache"
        return
    name = f"atkd-test-{uuid.uuid4().hex}"
    yield f"memory://{name}/cache"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


@pytest.fixture
def local_url(tmp_path):
    return str(tmp_path / "cache")
