"""CacheFS primitives on every backend."""

from __future__ import annotations

import pytest

from storage.fs import CacheFS


def test_files_atomic_write_exclusive_create_list_remove(cache_url):
    fs = CacheFS(cache_url)
    with pytest.raises(FileNotFoundError):
        fs.read_bytes("a/x.json")
    assert fs.list("a") == []
    fs.write_bytes_atomic("a/x.json", b"one")
    fs.write_bytes_atomic("a/x.json", b"two")
    assert fs.read_bytes("a/x.json") == b"two"
    assert fs.create_exclusive("a/y.json", b"first") is True
    assert fs.create_exclusive("a/y.json", b"second") is False
    assert fs.read_bytes("a/y.json") == b"first"
    assert fs.list("a") == ["x.json", "y.json"]  # no temp files left behind
    fs.remove("a/x.json")
    fs.remove("a/x.json")  # missing is fine
    assert fs.list("a") == ["y.json"] and fs.exists("a/y.json") and not fs.exists("a/x.json")


def test_rename_only_on_local(cache_url):
    fs = CacheFS(cache_url)
    fs.write_bytes_atomic("d/f", b"x")
    if fs.is_local:
        fs.rename("d", "e")
        assert fs.read_bytes("e/f") == b"x"
    else:
        with pytest.raises(NotImplementedError, match="object stores"):
            fs.rename("d", "e")


def test_zarr_store_of_a_sync_filesystem_is_made_once_and_not_pickled(cache_url):
    import pickle

    fs = CacheFS(cache_url)
    a, b = fs.zarr_store("x"), fs.zarr_store("y", read_only=True)
    if fs.is_local:
        return
    assert a.fs is b.fs and a.fs.async_impl and a.fs.asynchronous  # one async wrapper per CacheFS
    clone = pickle.loads(pickle.dumps(fs))  # noqa: S301 - our own object, pickled in this test
    assert clone._afs is None and clone.zarr_store("x").fs.async_impl
