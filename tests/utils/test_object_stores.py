"""The test servers of ``object_stores`` through the real clients (s3fs, gcsfs): writes, globs, byte
ranges and seeks with explicit storage options, objects that appear only when their upload closes, a
child process configured by environment variables alone, and a stopped server that leaves nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import uuid

import fsspec
import fsspec.core
import pytest
from object_stores import gcs_server, s3_server, serve  # noqa: F401

pytestmark = pytest.mark.subprocess

MiB = 2**20


@pytest.fixture(params=["s3", "gs"])
def store(request):
    """Each server in turn."""
    return request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")


def new_bucket(store) -> str:
    return store.make_bucket(f"test-{uuid.uuid4().hex[:12]}")


def test_write_glob_range_and_seek(store):
    bucket = new_bucket(store)
    fs, path = fsspec.core.url_to_fs(f"{store.scheme}://{bucket}/dir/a.tar", **store.storage_options)
    assert path == f"{bucket}/dir/a.tar"
    data = bytes(range(256)) * 8
    fs.pipe_file(path, data)
    with fs.open(f"{bucket}/dir/b.tar", "wb") as f:
        f.write(b"b")
    fs.pipe_file(f"{bucket}/dir/c.txt", b"c")
    fs.pipe_file(f"{bucket}/dir/sub/d.tar", b"d")
    assert sorted(fs.glob(f"{bucket}/dir/*.tar")) == [path, f"{bucket}/dir/b.tar"]
    # By keyword: s3fs's second positional parameter is version_id, not start.
    assert fs.cat_file(path, start=100, end=300) == data[100:300]
    with fs.open(path, "rb") as f:
        f.seek(1000)
        assert f.read(10) == data[1000:1010]
        f.seek(-4, os.SEEK_END)
        assert f.read() == data[-4:]


def test_an_object_appears_only_when_its_upload_closes(store):
    bucket = new_bucket(store)
    fs, path = fsspec.core.url_to_fs(f"{store.scheme}://{bucket}/big.bin", **store.storage_options)
    data = os.urandom(11 * MiB)
    # Two blocks of 5 MiB (the smallest S3 part): a multipart / resumable upload, not one request.
    with fs.open(path, "wb", block_size=5 * MiB) as f:
        f.write(data[: 6 * MiB])
        f.flush()
        fs.invalidate_cache()
        assert not fs.exists(path)
        f.write(data[6 * MiB :])
    fs.invalidate_cache()
    assert fs.size(path) == len(data) and fs.cat_file(path) == data


def test_a_child_process_configured_by_environment_alone(store):
    bucket = new_bucket(store)
    fs, _ = fsspec.core.url_to_fs(f"{store.scheme}://{bucket}", **store.storage_options)
    fs.pipe_file(f"{bucket}/from-parent.txt", b"parent")
    code = (
        "import sys, fsspec\n"
        "fs = fsspec.filesystem(sys.argv[1])\n"
        "assert type(fs).__module__ != 'gcsfs.extended_gcsfs', type(fs)\n"
        "sys.stdout.buffer.write(fs.cat_file(sys.argv[2] + '/from-parent.txt'))\n"
        "fs.pipe_file(sys.argv[2] + '/from-child.txt', b'child')\n"
    )
    argv = [sys.executable, "-c", code, store.scheme, bucket]
    child = subprocess.run(argv, env={**os.environ, **store.env}, capture_output=True, timeout=60)
    assert child.returncode == 0, child.stderr.decode(errors="replace")[-3000:]
    assert child.stdout == b"parent"
    fs.invalidate_cache()
    assert fs.cat_file(f"{bucket}/from-child.txt") == b"child"


def test_a_stopped_server_leaves_no_listener_or_cached_filesystem():
    with serve("s3") as store:
        fs = fsspec.filesystem("s3", **store.storage_options)
        fs.pipe_file(f"{store.make_bucket('stopped')}/x", b"x")
        assert fsspec.filesystem("s3", **store.storage_options) is fs
    with pytest.raises(OSError):
        urllib.request.urlopen(store.endpoint, timeout=5)
    assert fsspec.filesystem("s3", **store.storage_options) is not fs
