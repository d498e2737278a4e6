"""``utils.storage``: local paths and fsspec URLs behave alike (fsspec's in-process ``memory://`` store
stands for a bucket; the real S3 and GCS clients are exercised by tests/corpus/test_buckets.py)."""

from __future__ import annotations

import os

import fsspec
import pytest

from xcodec2_jax.utils.storage import Location, expand, filesystem, is_url


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        yield str(tmp_path / "root")
        return
    path = f"memory://storage-test-{os.getpid()}-{id(tmp_path)}"
    yield path
    fsspec.filesystem("memory").rm(path.removeprefix("memory://"), recursive=True)


def test_locations_read_write_list_and_glob_alike(root):
    base = Location(root)
    assert base.is_local == (not is_url(root))
    assert not base.exists() and base.names() == []
    a = base.child("data", "a.bin")
    a.write_bytes(b"0123456789")
    base.child("data", "sub", "b.txt").write_with(lambda f: f.write(b"text"))
    assert a.is_file() and base.child("data").is_dir() and a.name == "a.bin"
    assert a.read_bytes() == b"0123456789" and a.read_bytes(2, 5) == b"234"
    with a.open("rb") as f:
        f.seek(7)
        assert f.read() == b"789"
    assert base.child("data").names() == ["a.bin", "sub"]
    assert [p.name for p in base.files()] == ["a.bin", "b.txt"]
    assert [p.name for p in base.files((".txt",))] == ["b.txt"]
    assert a.sibling("sub/b.txt").read_bytes() == b"text"
    assert [p.name for p in expand(str(base.child("data")) + "/*.bin")] == ["a.bin"]
    # A rewrite replaces the file whole; a location equals another of the same place and options.
    a.write_bytes(b"new")
    assert a.read_bytes() == b"new" and Location(a.url) == a and len({Location(a.url), a}) == 1
    a.remove()
    assert not a.exists()
    with pytest.raises(ValueError, match="matches nothing"):
        expand(str(base.child("data")) + "/*.flac")


def test_unknown_scheme_is_one_clear_error():
    with pytest.raises(ValueError, match="nowhere://x/y: .*nowhere"):
        filesystem("nowhere://x/y")
    with pytest.raises(ValueError, match=r'pip install "xcodec2_jax\[cloud\]"'):
        Location("abfs://container/x")  # fsspec knows Azure's scheme; its adlfs is not installed
