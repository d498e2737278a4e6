"""The items of a corpus: listed from directories, manifests and Parquet files, then read one by one.

Listing reads no audio (only names, manifest lines and Parquet ``id`` / ``audio.path`` columns), so
every process of a multi-host job lists the same items in the same order cheaply. Reading an item
(:func:`read_item`) decodes, downmixes and resamples it to 16 kHz mono float32; anything wrong with
one item is a ``ValueError`` naming the problem, recorded by the caller, never fatal to the job.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import threading
from collections.abc import Sequence

import numpy as np

from ..inference.audio import prepare_item, read_audio, unreadable
from ..utils.files import AUDIO_SUFFIXES, walk_files

MANIFEST_SUFFIXES = (".txt", ".lst", ".jsonl")


@dataclasses.dataclass(frozen=True)
class Item:
    """One utterance: ``path`` an audio file, or a Parquet file with ``row`` set (its audio column)."""

    id: str
    path: str
    row: int | None = None


def _manifest_items(path: str) -> list[Item]:
    base = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or (not path.endswith(".jsonl") and line.startswith("#")):
                continue
            if path.endswith(".jsonl"):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not a JSON object ({e})") from None
                if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                    raise ValueError(f'{path}:{number}: expected an object with a "path" string')
                written, item_id = entry["path"], entry.get("id", entry["path"])
                if not isinstance(item_id, str):
                    item_id = str(item_id)
            else:
                written = item_id = line
            # A relative path is relative to the manifest's folder, so a manifest can travel with its data.
            items.append(Item(item_id, os.path.join(base, written)))
    return items


def _parquet_items(path: str, rel: str) -> list[Item]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    if "audio" not in schema.names:
        raise ValueError(
            f"{path}: no 'audio' column (expected the datasets layout, struct of bytes and path)"
        )
    rows = pq.ParquetFile(path).metadata.num_rows
    ids: list | None = None
    if "id" in schema.names:
        ids = [None if v is None else str(v) for v in pq.read_table(path, columns=["id"])["id"].to_pylist()]
    elif "path" in getattr(schema.field("audio").type, "names", []) or _has_child(schema, "path"):
        ids = pq.read_table(path, columns=["audio.path"]).column(0).to_pylist()
    ids = ids or [None] * rows
    return [Item(i if i else f"{rel}/{row}", path, row) for row, i in enumerate(ids)]


def _has_child(schema, name: str) -> bool:
    t = schema.field("audio").type
    return hasattr(t, "num_fields") and any(t.field(k).name == name for k in range(t.num_fields))


def list_items(sources: Sequence[str | os.PathLike]) -> list[Item]:
    """Every item of ``sources`` (directories, ``.txt`` / ``.jsonl`` manifests, ``.parquet`` files),
    in a fixed order; ValueError for a missing source, an empty one, or ids given twice."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise ValueError("no sources given")
    items: list[Item] = []
    for source in map(os.fspath, sources):
        if os.path.isdir(source):
            root = os.path.normpath(source)
            parquets = walk_files(root, (".parquet",))
            if parquets:
                found = [it for p in parquets for it in _parquet_items(p, os.path.relpath(p, root))]
            else:
                found = [Item(os.path.relpath(p, root), p) for p in walk_files(root, AUDIO_SUFFIXES)]
            if not found:
                raise ValueError(
                    f"{source}: no Parquet files and no files ending in {', '.join(AUDIO_SUFFIXES)}"
                )
        elif os.path.isfile(source):
            if source.endswith(MANIFEST_SUFFIXES):
                found = _manifest_items(source)
            elif source.endswith(".parquet"):
                found = _parquet_items(source, os.path.basename(source))
            elif source.lower().endswith(AUDIO_SUFFIXES):
                found = [Item(os.path.basename(source), source)]
            else:
                raise ValueError(
                    f"{source}: not a directory, manifest ({', '.join(MANIFEST_SUFFIXES)}), .parquet "
                    "or audio file"
                )
            if not found:
                raise ValueError(f"{source}: lists no items")
        else:
            raise ValueError(f"{source}: no such file or directory")
        items += found
    seen: dict[str, Item] = {}
    for item in items:
        if item.id in seen:
            raise ValueError(
                f"id {item.id!r} is given twice ({seen[item.id].path} and {item.path}); ids must be unique "
                "so that a resumed job can tell items apart (give an 'id' column or field)"
            )
        seen[item.id] = item
    return items


# A few row groups are kept decoded per process: consecutive items of a shard share them.
_row_group_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _row_group(path: str, group: int):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=["audio"]).column(0).to_pylist()


@functools.lru_cache(maxsize=64)
def _row_group_starts(path: str) -> np.ndarray:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    return np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])


def _parquet_audio(item: Item):
    import soundfile as sf

    starts = _row_group_starts(item.path)
    group = int(np.searchsorted(starts, item.row, side="right") - 1)
    with _row_group_lock:
        cell = _row_group(item.path, group)[item.row - starts[group]]
    if not isinstance(cell, dict):
        raise ValueError("the audio cell is not a struct of bytes and path")
    if cell.get("bytes"):
        return sf.read(io.BytesIO(cell["bytes"]), dtype="float32", always_2d=False)
    path = cell.get("path")
    if not path:
        raise ValueError("the audio cell holds neither bytes nor a path")
    if not os.path.isabs(path):
        path = os.path.join(os.path.dirname(item.path), path)
    return sf.read(path, dtype="float32", always_2d=False)


def read_item(item: Item) -> np.ndarray:
    """An item's audio as 16 kHz mono float32; ValueError (one line) when it cannot be used."""
    if item.row is None:
        # Read whole, then decoded from memory: soundfile opens files under a process-wide lock,
        # so one slow (network, FIFO) file would otherwise stall every worker.
        try:
            with open(item.path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise unreadable(e) from None
        return read_audio(io.BytesIO(data))
    try:
        audio, rate = _parquet_audio(item)
    except ValueError:
        raise
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError ...
        raise unreadable(e) from None
    return prepare_item(audio, rate)
