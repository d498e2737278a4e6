"""The items of a corpus: listed from directories, globs, manifests, Parquet files and WebDataset tar
shards, local or at URLs (``utils.storage``), then read one by one.

Listing reads no audio (names, manifest lines, Parquet's non-audio columns, tar headers and their
small ``.json`` / ``.txt`` members), so every process of a multi-host job lists the same items in the
same order cheaply. What a source says about an item besides its audio (manifest fields, Parquet
columns, a tar sample's JSON fields and text members) is its ``meta``. Reading an item
(:func:`read_item`) decodes, downmixes and resamples it to 16 kHz mono float32; anything wrong with
one item is a ``ValueError`` naming the problem, recorded by the caller, never fatal to the job.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import posixpath
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from ..inference.audio import read_audio, unreadable
from ..utils.files import AUDIO_SUFFIXES
from ..utils.storage import Location, StorageError, expand, storage_error
from . import tars

MANIFEST_SUFFIXES = (".txt", ".lst", ".jsonl")


@dataclasses.dataclass(frozen=True)
class Item:
    """One utterance.

    ``path``: the audio file, or the Parquet file (``row`` set: its audio column) or tar shard
    (``member`` set: the (offset, size) of the audio member's bytes) holding it; a local path or URL.
    ``location``: where ``path`` is read from (None: the local path). ``meta``: the source's other
    fields for this item. ``problem``: why a listed item cannot be used (a tar sample with no audio).
    ``data``: its audio file's bytes, already read (a streamed tar sample).
    """

    id: str
    path: str
    row: int | None = None
    member: tuple[int, int] | None = None
    location: Location | None = dataclasses.field(default=None, compare=False, repr=False)
    meta: dict | None = dataclasses.field(default=None, compare=False, repr=False)
    problem: str | None = None
    data: bytes | None = dataclasses.field(default=None, compare=False, repr=False)

    def where(self) -> Location:
        return self.location if self.location is not None else Location(self.path)


def _manifest_items(source: Location) -> list[Item]:
    items = []
    is_jsonl = source.path.endswith(".jsonl")
    with source.open("rb") as f:
        lines = io.TextIOWrapper(f, encoding="utf-8").read().splitlines()
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or (not is_jsonl and line.startswith("#")):
            continue
        meta = None
        if is_jsonl:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}:{number}: not a JSON object ({e})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise ValueError(f'{source}:{number}: expected an object with a "path" string')
            written, item_id = entry["path"], str(entry.get("id", entry["path"]))
            meta = {k: v for k, v in entry.items() if k not in ("path", "id")}
        else:
            written = item_id = line
        # A relative path is relative to the manifest's folder, so a manifest can travel with its data.
        where = source.sibling(written)
        items.append(Item(item_id, where.url, location=where, meta=meta))
    return items


def _parquet_items(source: Location, rel: str) -> list[Item]:
    import pyarrow.parquet as pq

    try:
        with source.open("rb") as f:
            file = pq.ParquetFile(f)
            schema = file.schema_arrow
            others = [n for n in schema.names if n not in ("audio", "id")]
            if "audio" not in schema.names:
                raise ValueError(
                    f"{source}: no 'audio' column (expected the datasets layout, struct of bytes and path)"
                )
            rows = file.metadata.num_rows
            ids = _parquet_ids(f, schema)
            meta = file.read(columns=others).to_pylist() if others else [None] * rows
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{source}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    ids = ids or [None] * rows
    return [
        Item(i if i else f"{rel}/{row}", source.url, row, location=source, meta=meta[row])
        for row, i in enumerate(ids)
    ]


def _parquet_ids(f, schema) -> list | None:
    import pyarrow.parquet as pq

    if "id" in schema.names:
        return [None if v is None else str(v) for v in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    audio = schema.field("audio").type
    if hasattr(audio, "num_fields") and any(audio.field(k).name == "path" for k in range(audio.num_fields)):
        # The nested column alone: the audio bytes beside it are not read.
        return pq.read_table(f, columns=["audio.path"]).column(0).to_pylist()
    return None


@dataclasses.dataclass(frozen=True)
class TarShard:
    """A WebDataset tar shard that ``tokenize`` streams instead of listing (see :func:`list_units`)."""

    location: Location

    @property
    def name(self) -> str:
        return tars.shard_name(self.location.name)

    def items(self) -> Iterator[Item]:
        """The shard's items in member order, each with its audio bytes (``data``), from one forward
        read; a shard that is not a tar gives one item saying so."""
        where, name = self.location, self.name
        try:
            for s in tars.stream(where):
                yield _tar_item(where, name, s)
        except StorageError:
            raise
        except ValueError as e:
            yield Item(f"{self.name}/", where.url, location=where, problem=str(e))
        except Exception as e:  # a store that failed in the middle of the stream
            raise storage_error(where, e) from None


def _tar_item(where: Location, shard: str, s: tars.Sample) -> Item:
    return Item(f"{shard}/{s.key}", where.url, None, s.audio, where, s.meta or None, s.problem, s.data)


def _tar_items(source: Location) -> list[Item]:
    shard = tars.shard_name(source.name)
    return [_tar_item(source, shard, s) for s in tars.samples(source)]


def _folder_items(root: Location, stream_tars: bool) -> list[Item | TarShard]:
    def rel(loc: Location) -> str:
        return posixpath.relpath(loc.path, root.path) if root.fs else os.path.relpath(loc.path, root.path)

    parquets = root.files((".parquet",))
    if parquets:
        return [it for p in parquets for it in _parquet_items(p, rel(p))]
    shards = root.files(tars.TAR_SUFFIXES)
    if shards:
        return [TarShard(t) for t in shards] if stream_tars else [it for t in shards for it in _tar_items(t)]
    found = [Item(rel(p), p.url, location=p) for p in root.files(AUDIO_SUFFIXES)]
    if not found:
        raise ValueError(
            f"{root}: no Parquet files, no tar shards and no files ending in {', '.join(AUDIO_SUFFIXES)}"
        )
    return found


def _file_items(source: Location, stream_tars: bool) -> list[Item | TarShard]:
    name = source.path.lower()
    if name.endswith(MANIFEST_SUFFIXES):
        found = _manifest_items(source)
    elif name.endswith(".parquet"):
        found = _parquet_items(source, source.name)
    elif name.endswith(tars.TAR_SUFFIXES):
        found = [TarShard(source)] if stream_tars else _tar_items(source)
    elif name.endswith(AUDIO_SUFFIXES):
        found = [Item(source.name, source.url, location=source)]
    else:
        raise ValueError(
            f"{source}: not a directory, manifest ({', '.join(MANIFEST_SUFFIXES)}), .parquet, tar "
            f"({', '.join(tars.TAR_SUFFIXES)}) or audio file"
        )
    if not found:
        raise ValueError(f"{source}: lists no items")
    return found


def _source_items(source: Location, stream_tars: bool) -> list[Item | TarShard]:
    try:
        if source.is_dir():
            return _folder_items(source, stream_tars)
        if source.is_file():
            return _file_items(source, stream_tars)
    except ValueError:
        raise
    except Exception as e:  # a store that failed in the middle of a listing or a read
        raise storage_error(source, e) from None
    raise ValueError(f"{source}: no such file or directory")


def list_items(
    sources: str | os.PathLike | Sequence[str | os.PathLike], storage_options: dict | None = None
) -> list[Item]:
    """Every item of ``sources`` in a fixed order.

    ``sources``: local paths or URLs (globs allowed) of directories, ``.txt`` / ``.jsonl`` manifests,
    ``.parquet`` files, WebDataset tar shards (``.tar``, ``.tar.gz``, ``.tgz``; listed from their
    headers) or audio files; ``storage_options`` go to the filesystem of every URL. ValueError for a
    missing source, an empty one, a filesystem that is not installed, or ids given twice.
    """
    return _collect(sources, storage_options, stream_tars=False)


def list_units(
    sources: str | os.PathLike | Sequence[str | os.PathLike], storage_options: dict | None = None
) -> list[Item | TarShard]:
    """:func:`list_items`, but each tar shard left whole (a :class:`TarShard`, read in one pass when
    its turn comes), so listing a corpus of tars reads no tar. The shards' names must be unique (their
    items' ids start with them); the keys within a shard are checked as it streams."""
    return _collect(sources, storage_options, stream_tars=True)


def _collect(sources, storage_options: dict | None, stream_tars: bool) -> list:
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise ValueError("no sources given")
    units: list = []
    for pattern in sources:
        for source in expand(pattern, storage_options):
            units += _source_items(source, stream_tars)
    seen: dict[str, str] = {}
    for unit in units:
        key, path = (unit.id, unit.path) if isinstance(unit, Item) else (unit.name + "/", unit.location.url)
        if key in seen:
            raise ValueError(
                f"id {key!r} is given twice ({seen[key]} and {path}); ids must be unique so that a "
                "resumed job can tell items apart (give an 'id' column or field; rename one tar shard)"
            )
        seen[key] = path
    return units


# A few row groups are kept decoded per process: consecutive items of a shard share them.
_row_group_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _row_group(where: Location, group: int):
    import pyarrow.parquet as pq

    with where.open("rb") as f:
        return pq.ParquetFile(f).read_row_group(group, columns=["audio"]).column(0).to_pylist()


@functools.lru_cache(maxsize=64)
def _row_group_starts(where: Location) -> np.ndarray:
    import pyarrow.parquet as pq

    with where.open("rb") as f:
        meta = pq.ParquetFile(f).metadata
    return np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])


def _parquet_audio(item: Item) -> bytes:
    where = item.where()
    starts = _row_group_starts(where)
    group = int(np.searchsorted(starts, item.row, side="right") - 1)
    with _row_group_lock:
        cell = _row_group(where, group)[item.row - starts[group]]
    if not isinstance(cell, dict):
        raise ValueError("the audio cell is not a struct of bytes and path")
    if cell.get("bytes"):
        return cell["bytes"]
    path = cell.get("path")
    if not path:
        raise ValueError("the audio cell holds neither bytes nor a path")
    return where.sibling(path).read_bytes()


def _item_bytes(item: Item) -> bytes:
    if item.data is not None:
        return item.data
    if item.row is not None:
        return _parquet_audio(item)
    if item.member is not None:
        return tars.member_bytes(item.where(), *item.member)
    return item.where().read_bytes()


def read_item(item: Item) -> np.ndarray:
    """An item's audio as 16 kHz mono float32; ValueError (one line) when it cannot be used, its
    subclass ``StorageError`` when the store holding it cannot be reached (a job stops then)."""
    if item.problem:
        raise ValueError(item.problem)
    # Read whole, then decoded from memory: soundfile opens files under a process-wide lock, so one
    # slow (network, FIFO) file would otherwise stall every worker.
    try:
        data = _item_bytes(item)
    except ValueError:
        raise
    except Exception as e:  # OSError, pyarrow's errors ...
        if item.location is not None and not item.location.is_local and not isinstance(e, FileNotFoundError):
            raise storage_error(item.path, e) from None
        raise unreadable(e) from None
    return read_audio(io.BytesIO(data))
