"""Paths that may be URLs: local paths through ``os``, anything with a scheme (``s3://``, ``gs://``,
``hf://``, ``https://``, ``memory://``, ``file://``) through fsspec.

fsspec and the filesystems behind the schemes (s3fs, gcsfs) are the ``cloud`` extra: a local path
needs none of them, and a URL whose package is missing is one ``ValueError`` naming the extra.
Credentials and endpoints come from each filesystem's own configuration (``AWS_*`` variables,
``AWS_ENDPOINT_URL`` included; Google's application default credentials; ``HF_TOKEN``) unless
``storage_options`` gives them.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import posixpath
from collections.abc import Callable
from typing import IO, Any

from .files import atomic_write, is_temporary, walk_files

CLOUD_EXTRA = 'pip install "xcodec2_jax[cloud]"'
GLOB_CHARS = "*?["


class StorageError(ValueError):
    """A store that cannot be reached or refuses us (connection, credentials, permissions): the job
    stops, unlike for a bad file, since every item after it would fail the same way."""


def storage_error(where, error: Exception) -> StorageError:
    """The one-line :class:`StorageError` of ``error`` met at ``where``."""
    return StorageError(f"{where}: {type(error).__name__}: {' '.join(str(error).split())}")


@contextlib.contextmanager
def reaching(where):
    """Turn what a filesystem raises into a StorageError naming ``where``; a missing file stays a
    ``FileNotFoundError`` and a ``ValueError`` stays itself."""
    try:
        yield
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # botocore, aiohttp, google-auth ... errors share no base class
        raise storage_error(where, e) from None


def is_url(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for a plain local path."""
    return "://" in os.fspath(path)


def filesystem(url: str, storage_options: dict | None = None):
    """``(fs, path)``: the fsspec filesystem of ``url`` and the path within it.

    ValueError (one line) when fsspec or the scheme's package is not installed, naming the extra, or
    when the scheme is unknown.
    """
    try:
        import fsspec.core
    except ImportError:
        raise ValueError(f"{url}: reading URLs needs fsspec: {CLOUD_EXTRA}") from None
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        raise ValueError(f"{url}: the {scheme}:// filesystem is not installed ({e}); {CLOUD_EXTRA}") from None
    except ValueError as e:
        raise ValueError(f"{url}: {e}") from None


def has_glob(path: str) -> bool:
    """True when ``path`` holds a glob pattern (``*``, ``?`` or ``[``)."""
    return any(c in path for c in GLOB_CHARS)


class Location:
    """A file or folder, local or at a URL, with the few operations the corpus job needs.

    ``Location("s3://bucket/tokens", options)`` and ``Location("/data/tokens")`` behave alike; local
    paths never import fsspec. Writes are whole-or-nothing: locally a temporary file renamed into
    place, on an object store one upload (an object appears only once its upload completes).
    """

    def __init__(self, path: str | os.PathLike, storage_options: dict | None = None):
        path = os.fspath(path)
        self.options = dict(storage_options or {})
        self.fs = None
        if is_url(path):
            self.fs, inner = filesystem(path, self.options)
            protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
            self.url = inner if protocol in ("file", "local") else self.fs.unstrip_protocol(inner)
            self.path = inner
        else:
            self.url = self.path = os.path.abspath(path)

    @property
    def is_local(self) -> bool:
        """True for a plain local path (no fsspec involved)."""
        return self.fs is None

    def child(self, *parts: str) -> Location:
        """The location ``parts`` below this one (same filesystem and options)."""
        new = object.__new__(Location)
        new.options, new.fs = self.options, self.fs
        if self.fs is None:
            new.url = new.path = os.path.join(self.path, *parts)
        else:
            new.path = posixpath.join(self.path, *parts)
            new.url = posixpath.join(self.url, *parts)
        return new

    def sibling(self, relative: str) -> Location:
        """``relative`` resolved against this file's folder (an absolute path or URL is kept)."""
        if is_url(relative):
            return Location(relative, self.options)
        if self.fs is None:
            return Location(os.path.join(os.path.dirname(self.path), relative))
        parent = object.__new__(Location)
        parent.options, parent.fs = self.options, self.fs
        parent.path, parent.url = posixpath.dirname(self.path), posixpath.dirname(self.url)
        return parent.child(relative)

    @property
    def name(self) -> str:
        """The last part of the path (the file or folder name)."""
        return posixpath.basename(self.path.rstrip("/")) if self.fs else os.path.basename(self.path)

    def exists(self) -> bool:
        """Whether anything is there (asked afresh, as are is_file, is_dir and names)."""
        return self._ask(os.path.exists, "exists")

    def is_file(self) -> bool:
        """Whether a file is there."""
        return self._ask(os.path.isfile, "isfile")

    def is_dir(self) -> bool:
        """Whether a folder (or an object-store prefix) is there."""
        return self._ask(os.path.isdir, "isdir")

    def _ask(self, local: Callable[[str], bool], remote: str) -> bool:
        if self.fs is None:
            return local(self.path)
        # fsspec caches listings per filesystem instance, and other processes write to the same
        # folders: the store is asked afresh.
        with reaching(self.url):
            self.fs.invalidate_cache(self.path)
            return getattr(self.fs, remote)(self.path)

    def open(self, mode: str = "rb", **kwargs) -> IO:
        """The file opened in ``mode`` (``kwargs`` to ``open`` or the filesystem's ``open``)."""
        if self.fs is None:
            return open(self.path, mode, **kwargs)
        with reaching(self.url):
            return self.fs.open(self.path, mode, **kwargs)

    def read_bytes(self, start: int | None = None, end: int | None = None) -> bytes:
        """The file's bytes, or those in [start, end) (one ranged read on an object store)."""
        if self.fs is not None:
            with reaching(self.url):
                return self.fs.cat_file(self.path, start=start, end=end)
        with open(self.path, "rb") as f:
            if start is None:
                return f.read()
            f.seek(start)
            return f.read(None if end is None else end - start)

    def write_bytes(self, data: bytes) -> None:
        """Replace the file with ``data``, whole or not at all."""
        if self.fs is None:
            atomic_write(self.path, lambda f: f.write(data))
        else:
            with reaching(self.url):
                self.fs.pipe_file(self.path, data)

    def write_with(self, write: Callable[[IO[bytes]], Any]) -> None:
        """``write(f)`` to a buffer, then :meth:`write_bytes` (locally straight into the temporary file)."""
        if self.fs is None:
            atomic_write(self.path, write)
            return
        buffer = io.BytesIO()
        write(buffer)
        with reaching(self.url):
            self.fs.pipe_file(self.path, buffer.getvalue())

    def remove(self) -> None:
        """Delete the file."""
        if self.fs is None:
            os.unlink(self.path)
        else:
            with reaching(self.url):
                self.fs.rm_file(self.path)

    def files(self, suffixes: tuple[str, ...] | None = None) -> list[Location]:
        """Every file below this folder whose lower-cased name ends in one of ``suffixes``, sorted."""
        if self.fs is None:
            return [Location(p) for p in walk_files(self.path, suffixes)]
        with reaching(self.url):
            found = sorted(self.fs.find(self.path))
        if suffixes is not None:
            found = [p for p in found if p.lower().endswith(suffixes)]
        return [self._at(p) for p in found]

    def names(self) -> list[str]:
        """The names directly in this folder (none when it does not exist)."""
        if self.fs is None:
            return sorted(os.listdir(self.path)) if os.path.isdir(self.path) else []
        with reaching(self.url):
            self.fs.invalidate_cache(self.path)
            if not self.fs.exists(self.path):
                return []
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False))

    def remove_temporary(self, target: str) -> None:
        """Delete leftover temporary files of :meth:`write_bytes` for ``target`` in this folder (local
        only: an object-store upload leaves nothing behind)."""
        if self.fs is None:
            for name in self.names():
                if is_temporary(name, target):
                    os.unlink(os.path.join(self.path, name))

    def _at(self, inner: str) -> Location:
        new = object.__new__(Location)
        new.options, new.fs, new.path = self.options, self.fs, inner
        new.url = self.fs.unstrip_protocol(inner)
        return new

    def __eq__(self, other) -> bool:
        if not isinstance(other, Location):
            return False
        return (self.url, _key(self.options)) == (other.url, _key(other.options))

    def __hash__(self) -> int:
        return hash((self.url, _key(self.options)))

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __str__(self) -> str:
        return self.url


def _key(options: dict) -> str:
    return json.dumps(options, sort_keys=True, default=repr)


def expand(path: str | os.PathLike, storage_options: dict | None = None) -> list[Location]:
    """``path`` as locations: a glob pattern expanded (sorted; none found is a ValueError), else itself."""
    path = os.fspath(path)
    if not has_glob(path):
        return [Location(path, storage_options)]
    if not is_url(path):
        found = sorted(glob.glob(path, recursive=True))
        if not found:
            raise ValueError(f"{path}: the pattern matches nothing")
        return [Location(p) for p in found]
    base = Location(path, storage_options)
    with reaching(path):
        found = sorted(base.fs.glob(base.path))
    if not found:
        raise ValueError(f"{path}: the pattern matches nothing")
    return [base._at(p) for p in found]
