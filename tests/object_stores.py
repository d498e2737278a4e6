"""Real object-store servers on 127.0.0.1 for tests: moto's S3 server and gcp-storage-emulator's GCS.

``serve("s3")`` / ``serve("gs")`` start one as a child process and yield an :class:`ObjectStore`; the
session fixtures ``s3_server`` and ``gcs_server`` wrap them (``from object_stores import s3_server``).
A server that does not answer within ``START_TIMEOUT`` seconds is an error carrying its output, never
a skip. Clients reach a server two ways:

- in this process, ``fsspec.core.url_to_fs(url, **store.storage_options)``: the endpoint is in the
  options, hence in fsspec's instance-cache key, so a cached filesystem never outlives its server's
  session (``serve`` also clears the cache when the server stops). Do not point fsspec at a server by
  editing ``os.environ`` here: ``fsspec.filesystem("s3")`` with no options is cached without the
  variables, and a later test would get an instance bound to a dead server;
- in a child process, with ``env={**os.environ, **store.env}`` and no options, as a user configures
  the real services (``AWS_ENDPOINT_URL`` and friends; ``STORAGE_EMULATOR_HOST``).

fsspec also caches listings per instance: after another process writes, call ``fs.invalidate_cache()``.

gcsfs's default ``GCSFileSystem`` (its experimental ``ExtendedGcsFileSystem``) asks Google's gRPC
storage-control API for the bucket's layout on every ``open`` and read, which the emulator (JSON over
HTTP only) cannot answer: each would wait up to 60 s. So ``serve("gs")`` maps ``gs://`` to the plain
``gcsfs.core.GCSFileSystem`` in this process, and ``env`` turns the extension off in child processes.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
# 127.0.0.1 is never reached through a proxy set in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ObjectStore:
    """A running server: its scheme (``s3`` or ``gs``), endpoint and how clients reach it."""

    scheme: str
    endpoint: str
    storage_options: dict
    env: dict

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` through the server's own API and return the name."""
        if self.scheme == "s3":
            # Not s3fs's mkdir: with a region in client_kwargs it sends LocationConstraint=us-east-1,
            # which S3 (and moto) reject.
            request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        else:
            body = json.dumps({"name": name}).encode()
            headers = {"Content-Type": "application/json"}
            request = urllib.request.Request(f"{self.endpoint}/storage/v1/b", body, headers, method="POST")
        _DIRECT.open(request, timeout=10).close()
        return name


def s3_store(port: int) -> ObjectStore:
    """The S3 store at ``port`` (moto accepts any credentials; botocore needs some, and a region)."""
    endpoint = f"http://{HOST}:{port}"
    options = {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    return ObjectStore("s3", endpoint, options, env)


def gcs_store(port: int) -> ObjectStore:
    """The GCS store at ``port``, used anonymously (the emulator checks no credentials)."""
    endpoint = f"http://{HOST}:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": endpoint,
        # fsspec's own configuration variable (FSSPEC_<protocol>_<option>): without it gcsfs would try
        # Google's default credentials first (a developer's would then be refreshed against Google).
        "FSSPEC_GS_TOKEN": "anon",
        # Read by gcsfs when it is imported: the plain GCSFileSystem (see the module docstring).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    return ObjectStore("gs", endpoint, {"endpoint_url": endpoint, "token": "anon"}, env)


def server_command(scheme: str, port: int) -> list[str]:
    """The command line that serves ``scheme`` on 127.0.0.1:``port``."""
    if scheme == "s3":
        return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    emulator = [sys.executable, "-m", "gcp_storage_emulator", "start"]
    return [*emulator, "--host", HOST, "--port", str(port), "--in-memory"]


def _tail(log, limit: int = 4000) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-limit:]


def wait_until_up(proc: subprocess.Popen, endpoint: str, log, timeout: float = START_TIMEOUT) -> None:
    """Return once ``endpoint`` answers HTTP; raise with the server's output if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            _DIRECT.open(endpoint + "/", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # an error status is still an answer
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.args} did not answer within {timeout:.0f} s:\n{_tail(log)}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    """Terminate ``proc``, killing it if it has not exited within ``STOP_TIMEOUT``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


def use_plain_gcsfs() -> None:
    """Resolve ``gs://`` and ``gcs://`` in this process to ``gcsfs.core.GCSFileSystem``."""
    import fsspec
    import gcsfs.core

    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)


@contextlib.contextmanager
def serve(scheme: str, timeout: float = START_TIMEOUT) -> Iterator[ObjectStore]:
    """Run a server for ``scheme`` (``s3`` or ``gs``) on a free port while the block runs."""
    import fsspec

    port = free_port()
    store = s3_store(port) if scheme == "s3" else gcs_store(port)
    if scheme == "gs":
        use_plain_gcsfs()
    # A file, not a pipe: the servers log every request, and a full pipe nobody reads would stall them.
    with tempfile.TemporaryFile() as log:
        command = server_command(scheme, port)
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_up(proc, store.endpoint, log, timeout)
            yield store
        finally:
            stop(proc)
            fsspec.get_filesystem_class(scheme).clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[ObjectStore]:
    """A moto S3 server for the test session."""
    with serve("s3") as store:
        yield store


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[ObjectStore]:
    """A GCS emulator (in memory) for the test session."""
    with serve("gs") as store:
        yield store
