"""Backends for the storage conformance suite: a local directory and fsspec memory://."""

from __future__ import annotations

import uuid

import fsspec
import pytest

BACKENDS = ["local", "memory"]


@pytest.fixture(params=BACKENDS)
def cache_url(request, tmp_path):
    """A fresh, empty cache location on each backend."""
    if request.param == "local":
        yield str(tmp_path / "cache")
        return
    name = f"atkd-test-{uuid.uuid4().hex}"
    yield f"memory://{name}/cache"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


@pytest.fixture
def local_url(tmp_path):
    return str(tmp_path / "cache")
