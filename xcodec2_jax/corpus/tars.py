"""WebDataset tar shards: samples listed from the headers, audio members read by byte range.

A shard's members are grouped into samples by key, as WebDataset does: the member's name up to the
first dot of its base name (``EN_B00000_S00000_W000000.mp3`` and ``...W000000.json`` are one
sample). A sample's audio member (``AUDIO_EXTENSIONS``) is the item; its ``.json`` member's fields
and its text members (``.txt``: column ``txt``; ``.foo.txt``: column ``foo``) are its metadata.

Listing reads the headers and the small metadata members, never the audio: in an uncompressed tar
it seeks past each member's data (ranged reads on an object store). Reading an item is then one
ranged read of its bytes. A gzip-compressed tar has no random access: its items are read from one
forward stream per shard (:class:`_GzipStreams`), which is how the job asks for them (in order).
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import re
import tarfile
import threading
import zlib

from ..utils.files import AUDIO_SUFFIXES
from ..utils.storage import Location

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
AUDIO_EXTENSIONS = tuple(sorted({*AUDIO_SUFFIXES, ".opus", ".m4a"}))
# WebDataset's split of a member name into key and extension.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclasses.dataclass
class Sample:
    """One sample of a shard: ``audio`` the (offset, size) of its audio member's bytes, ``meta`` its
    metadata, ``problem`` why it cannot be used (no audio member, bad JSON)."""

    key: str
    audio: tuple[int, int] | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    problem: str | None = None


def shard_name(name: str) -> str:
    """A shard's file name without its tar suffix: the first part of its items' ids."""
    for suffix in TAR_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_gzip(location: Location) -> bool:
    return location.path.lower().endswith((".tar.gz", ".tgz"))


def samples(location: Location) -> list[Sample]:
    """The samples of the shard at ``location`` in member order. ValueError when it is not a tar; a
    shard cut short keeps the samples before the cut (reading the cut member's audio fails then)."""
    found: dict[str, Sample] = {}
    with location.open("rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:gz" if is_gzip(location) else "r:")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ValueError(f"{location}: not a readable tar file ({type(e).__name__}: {e})") from None
        try:
            for member in tar:
                if member.isfile():
                    _add_member(found, tar, member)
        except (tarfile.TarError, EOFError, OSError, zlib.error):
            pass  # cut short: the members before the cut are listed, the cut one fails when read
    for sample in found.values():
        if sample.audio is None and sample.problem is None:
            kinds = ", ".join(sorted(sample.meta)) or "nothing"
            sample.problem = f"the sample has no audio member ({', '.join(AUDIO_EXTENSIONS)}); it has {kinds}"
    return list(found.values())


def _add_member(found: dict[str, Sample], tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    match = _KEY_EXT.match(member.name)
    if match is None:
        return
    key, ext = match.group(1), match.group(2).lower()
    sample = found.setdefault(key, Sample(key))
    if ("." + ext).endswith(AUDIO_EXTENSIONS):
        if sample.audio is None:
            sample.audio = (member.offset_data, member.size)
    elif ext == "json" or ext.endswith(".json"):
        text = tar.extractfile(member).read()
        try:
            fields = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            sample.problem = f"its .{ext} member is not JSON ({e})"
            return
        if not isinstance(fields, dict):
            sample.problem = f"its .{ext} member is not a JSON object"
            return
        sample.meta.update(fields)
    elif ext == "txt" or ext.endswith(".txt"):
        column = "txt" if ext == "txt" else ext[: -len(".txt")]
        sample.meta[column] = tar.extractfile(member).read().decode("utf-8", errors="replace")


def member_bytes(location: Location, offset: int, size: int) -> bytes:
    """The ``size`` bytes at ``offset`` of the (possibly gzip-compressed) tar at ``location``;
    ValueError when the shard ends before them."""
    if is_gzip(location):
        data = _GZIP_STREAMS.read(location, offset, size)
    else:
        data = location.read_bytes(offset, offset + size)
    if len(data) != size:
        raise ValueError(f"the tar is cut short: it holds {len(data)} of this member's {size} bytes")
    return data


class _GzipStreams:
    """Forward streams through gzip-compressed shards, one per shard. The bytes a stream skips on its
    way to a member are kept for a while (up to ``KEEP_BYTES``): the job's reader threads ask in
    member order, but one may ask a moment before the thread asking for the member just before."""

    KEEP_BYTES = 256 << 20

    def __init__(self):
        self.lock = threading.Lock()
        self.streams: dict[Location, _Stream] = {}

    def read(self, location: Location, offset: int, size: int) -> bytes:
        with self.lock:
            stream = self.streams.setdefault(location, _Stream(location))
        return stream.read(offset, size, self.KEEP_BYTES)


class _Stream:
    def __init__(self, location: Location):
        self.location = location
        self.lock = threading.Lock()
        self.file: gzip.GzipFile | None = None
        self.kept: collections.deque[tuple[int, bytes]] = collections.deque()

    def read(self, offset: int, size: int, keep_bytes: int) -> bytes:
        with self.lock:
            for start, chunk in self.kept:
                if start <= offset and offset + size <= start + len(chunk):
                    return chunk[offset - start : offset - start + size]
            if self.file is None or self.file.tell() > offset:
                if self.file is not None:
                    self.file.close()
                self.file = gzip.GzipFile(fileobj=self.location.open("rb"))
            skipped = offset - self.file.tell()
            if 0 < skipped <= keep_bytes:
                self.kept.append((self.file.tell(), self.file.read(skipped)))
                while sum(len(c) for _, c in self.kept) > keep_bytes:
                    self.kept.popleft()
            else:
                self.file.seek(offset)
            return self.file.read(size)


_GZIP_STREAMS = _GzipStreams()
