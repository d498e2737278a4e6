"""WebDataset tar shards: streamed sample by sample, or listed and then read by byte range.

A shard's members are grouped into samples by key, as WebDataset does: the member's name up to the
first dot of its base name (``EN_B00000_S00000_W000000.mp3`` and ``...W000000.json`` are one
sample). A sample's audio member (``AUDIO_EXTENSIONS``) is the item; its ``.json`` member's fields
and its text members (``.txt``: column ``txt``; ``.foo.txt``: column ``foo``) are its metadata.

``tokenize`` streams each shard once from its start (:func:`stream`: one sequential read, the first
sample available as soon as its bytes arrive, ``.tar.gz`` alike). Training draws crops at random, so
it lists a shard first (:func:`samples`: the headers and the small metadata members; in an
uncompressed tar it seeks past each member's data) and reads each item as one ranged read of its
bytes; a gzip-compressed shard is read there through one forward stream per shard
(:class:`_GzipStreams`).
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
from collections.abc import Iterator

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
    data: bytes | None = None  # the audio member's bytes, when streamed


def shard_name(name: str) -> str:
    """A shard's file name without its tar suffix: the first part of its items' ids."""
    for suffix in TAR_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_gzip(location: Location) -> bool:
    return location.path.lower().endswith((".tar.gz", ".tgz"))


# What tarfile, gzip and the file beneath raise on a damaged or truncated shard.
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def _open(location: Location, f, streaming: bool) -> tarfile.TarFile:
    mode = ("r|" if streaming else "r:") + ("gz" if is_gzip(location) else "")
    try:
        return tarfile.open(fileobj=f, mode=mode)
    except _TAR_ERRORS as e:
        raise ValueError(f"{location}: not a readable tar file ({type(e).__name__}: {e})") from None


def samples(location: Location) -> list[Sample]:
    """The samples of the shard at ``location`` in member order. ValueError when it is not a tar; a
    shard cut short keeps the samples before the cut (reading the cut member's audio fails then)."""
    found: dict[str, Sample] = {}
    with location.open("rb") as f:
        tar = _open(location, f, streaming=False)
        try:
            for member in tar:
                split = _split(member)
                if split is not None:
                    _add_member(found.setdefault(split[0], Sample(split[0])), tar, member, split[1])
        except _TAR_ERRORS:
            pass  # cut short: the members before the cut are listed, the cut one fails when read
    return [_checked(sample) for sample in found.values()]


def _checked(sample: Sample) -> Sample:
    if sample.audio is None and sample.problem is None:
        kinds = ", ".join(sorted(sample.meta)) or "nothing"
        sample.problem = f"the sample has no audio member ({', '.join(AUDIO_EXTENSIONS)}); it has {kinds}"
    return sample


def stream(location: Location) -> Iterator[Sample]:
    """The samples of the shard at ``location`` in member order, each with its audio bytes, read in one
    forward pass. A shard cut short ends with its cut sample marked as such; a key met again after
    its sample ended is a sample marked as a repeat (ids must stay unique); a file that is not a tar
    is a ValueError."""
    with location.open("rb") as f:
        tar = _open(location, f, streaming=True)
        current: Sample | None = None
        seen: set[str] = set()
        try:
            for member in tar:
                split = _split(member)
                if split is None:
                    continue
                key, ext = split
                if current is None or key != current.key:
                    if current is not None:
                        yield _checked(current)
                    current = Sample(key)
                    if key in seen:
                        current.problem = f"key {key!r} appears again after its sample ended"
                    seen.add(key)
                _add_member(current, tar, member, ext, keep_audio=True)
        except _TAR_ERRORS as e:
            if current is None:
                raise ValueError(f"{location}: not a readable tar file ({type(e).__name__}: {e})") from None
            current.problem = f"the tar is cut short in this sample ({type(e).__name__}: {e})"
        if current is not None:
            yield _checked(current)


def _split(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, lower-cased extension) of a regular file member, as WebDataset splits its name."""
    match = _KEY_EXT.match(member.name) if member.isfile() else None
    return None if match is None else (match.group(1), match.group(2).lower())


def _add_member(
    sample: Sample, tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, keep_audio: bool = False
) -> None:
    """Add ``member`` (extension ``ext``) to ``sample``: the audio's place (and bytes when
    ``keep_audio``), or the metadata it holds."""
    if ("." + ext).endswith(AUDIO_EXTENSIONS):
        if sample.audio is None:
            sample.audio = (member.offset_data, member.size)
            if keep_audio:
                sample.data = tar.extractfile(member).read()
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
    """Forward streams through gzip-compressed shards, one per shard, the ``MAX_STREAMS`` used last
    kept open (each holds a file and its kept bytes). The bytes a stream skips on its way to a member
    are kept for a while (up to ``KEEP_BYTES``): readers ask in member order, but one thread may ask a
    moment before the thread asking for the member just before."""

    KEEP_BYTES = 256 << 20
    MAX_STREAMS = 4

    def __init__(self):
        self.lock = threading.Lock()
        self.streams: collections.OrderedDict[Location, _Stream] = collections.OrderedDict()

    def read(self, location: Location, offset: int, size: int) -> bytes:
        with self.lock:
            stream = self.streams.pop(location, None) or _Stream(location)
            self.streams[location] = stream
            while len(self.streams) > self.MAX_STREAMS:
                self.streams.popitem(last=False)[1].close()
        return stream.read(offset, size, self.KEEP_BYTES)


class _Stream:
    def __init__(self, location: Location):
        self.location = location
        self.lock = threading.Lock()
        self.raw = self.file = None
        self.kept: collections.deque[tuple[int, bytes]] = collections.deque()

    def _reset(self) -> None:
        # GzipFile leaves the file it reads from open: both are closed.
        for f in (self.file, self.raw):
            if f is not None:
                f.close()
        self.raw = self.file = None

    def close(self) -> None:
        with self.lock:
            self._reset()
            self.kept.clear()

    def read(self, offset: int, size: int, keep_bytes: int) -> bytes:
        with self.lock:
            for start, chunk in self.kept:
                if start <= offset and offset + size <= start + len(chunk):
                    return chunk[offset - start : offset - start + size]
            if self.file is None or self.file.tell() > offset:
                self._reset()
                self.raw = self.location.open("rb")
                self.file = gzip.GzipFile(fileobj=self.raw)
            skipped = offset - self.file.tell()
            if 0 < skipped <= keep_bytes:
                self.kept.append((self.file.tell(), self.file.read(skipped)))
                while sum(len(c) for _, c in self.kept) > keep_bytes:
                    self.kept.popleft()
            else:
                self.file.seek(offset)
            return self.file.read(size)


_GZIP_STREAMS = _GzipStreams()
