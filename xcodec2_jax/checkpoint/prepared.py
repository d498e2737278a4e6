"""Checkpoints kept in the model's own layout and memory-mapped at load: the params cache.

Loading a checkpoint means copying every tensor out of its file, transposing it to the Flax layout,
casting it if asked and stacking the scanned layers (``place.assemble``): seconds for the full model,
and a host copy of all of it. ``Xcodec2Codec.from_pretrained`` and the CLI do that once per
checkpoint and keep the result beside the compilation cache (subfolder ``xcodec2_jax_params``): one
raw file of 64-byte-aligned parameters and a JSON index. A later load maps that file; XLA's CPU client
adopts aligned host memory without a copy, so "loading" costs milliseconds, and only the pages that a
computation reads are ever brought into the process: an encode never touches the decoder's weights.
On an accelerator the mapped arrays are copied over as before, minus the transposes.

An entry is keyed by the checkpoint's files (real path, size, modification time, inode), the model
config, the dtype and this module's format version, so an edited or replaced checkpoint is prepared
again (and the stale entry for the same files removed). Entries are complete or absent: the data and
then the index are written under temporary names and renamed. The compilation cache's switches
(``--no-cache``, ``compilation_cache=False``, ``XCODEC2_JAX_CACHE_DIR=off``) turn it off too, and
deleting the folder is always safe.

The folder is bounded (an entry is a copy of the checkpoint in use: 2.5 GB for the full model in
float32, 1.77 GB for its encode-only entry):

- **Size limit.** ``DEFAULT_MAX_BYTES`` (10 GiB), else ``$XCODEC2_JAX_PARAMS_CACHE_MAX_GB``, else the
  ``max_bytes`` given to ``prepare`` (the CLI's ``--params-cache-max-gb``); see ``max_bytes_setting``.
  Before an entry is written, the least recently used entries are evicted until the folder plus the
  new entry (estimated at the size of its source files) fit; after it is written, again with its true
  size. An entry that alone exceeds the limit is not kept (one warning; the load goes on without the
  cache). A limit of 0 keeps nothing: ``prepare`` empties the folder and returns None, silently.
- **Last use** is the modification time of the entry's ``<key>.json`` index: set when the entry is
  written and on every ``lookup`` that maps it (``os.utime``), so a hit never rewrites the data.
- **Dead entries** (a source file gone or changed since: such an entry can never be looked up again),
  broken ones (an index without its data, an unreadable index, a data file left without an index for
  over an hour) and temporary files over an hour old are removed by ``prune``: in ``prepare``, and in
  ``lookup`` when it misses. A hit reads nothing but its own entry.
- **Free disk space** is checked before writing: too little (the entry plus 1 GiB, counting what
  eviction would free) skips the cache with one warning.
- ``entries`` lists the folder and ``clear`` empties it or removes one entry (``xcodec2-jax cache
  list|clear``).

Several processes may share the folder: writes are renames, eviction removes the index first, files in
the making (temporary, or data whose index is not yet written) are left alone for an hour, and an
entry evicted while another process has it mapped stays readable there (POSIX unlink semantics).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..utils.dtypes import to_dtype
from ..utils.files import atomic_write_json, walk_files
from ..utils.safetensors import resolve_files
from ..utils.tree import flatten, unflatten
from ..utils.version import __version__
from .io import padded_size

PARAMS_DIR = "xcodec2_jax_params"
FORMAT_VERSION = 1
# The params cache's size limit unless set (GiB, as everywhere in this module).
DEFAULT_MAX_BYTES = 10 * 2**30
ENV_MAX_GB = "XCODEC2_JAX_PARAMS_CACHE_MAX_GB"
# Free space kept on the cache's disk after writing an entry.
_DISK_MARGIN = 1 << 30
# Files in the making (temporary files, data not yet indexed) younger than this are another
# process's work: never removed by ``prune``.
_GRACE_SECONDS = 3600.0
_INDEX, _DATA, _TMP = ".json", ".params", ".tmp"


def params_dir(compilation_cache_dir: str | None) -> str | None:
    """Where prepared checkpoints go for a compilation cache folder (None: no cache, nothing kept)."""
    return None if compilation_cache_dir is None else os.path.join(compilation_cache_dir, PARAMS_DIR)


def max_bytes_setting(max_gb: float | None = None) -> int:
    """The params cache's size limit in bytes: ``max_gb`` (GiB) if given, else
    ``$XCODEC2_JAX_PARAMS_CACHE_MAX_GB`` if set and not empty, else ``DEFAULT_MAX_BYTES`` (10 GiB).
    0 keeps nothing. A negative, non-finite or non-numeric value is a ValueError naming its origin."""
    if max_gb is not None:
        return _gib_to_bytes(max_gb, "max_gb")
    value = os.environ.get(ENV_MAX_GB, "").strip()
    return DEFAULT_MAX_BYTES if not value else _gib_to_bytes(value, f"${ENV_MAX_GB}")


def _gib_to_bytes(value: Any, origin: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        gib = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{origin} must be a size in GB (a number >= 0), got {value!r}") from None
    if not math.isfinite(gib) or gib < 0:
        raise ValueError(f"{origin} must be a size in GB (a number >= 0), got {value!r}")
    return int(gib * 2**30)


def checkpoint_files(path: str, fmt: str) -> list[str]:
    """Every file whose change must invalidate the prepared copy of the checkpoint at ``path``."""
    if fmt == "orbax":
        return walk_files(path)
    files = resolve_files(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config = os.path.join(folder, "config.json")
    return files + ([config] if os.path.isfile(config) else [])


def _sources(files: list[str]) -> list[list]:
    out = []
    for file in files:
        st = os.stat(file)
        out.append([os.path.realpath(file), st.st_size, st.st_mtime_ns, st.st_ino])
    return out


def entry_key(
    files: list[str], config: Any, dtype: Any, modules: Sequence[str] | None = None
) -> tuple[str, list[list]]:
    """(file stem of the entry, the identity of the checkpoint's files). ``modules``: the top-level
    modules the entry holds (None: all)."""
    sources = _sources(files)
    dtype_name = "stored" if dtype is None else np.dtype(dtype).name
    identity = [FORMAT_VERSION, __version__, sources, repr(config), dtype_name]
    if modules is not None:  # a full entry keeps the key it always had
        identity.append(sorted(modules))
    identity = json.dumps(identity)
    return hashlib.sha256(identity.encode()).hexdigest()[:32], sources


def lookup(directory: str, key: str) -> dict[str, Any] | None:
    """The prepared parameter tree (read-only views of the mapped file), or None if there is none.
    A hit marks the entry used now; a miss prunes the folder's dead entries (``prune``)."""
    index_file = os.path.join(directory, key + _INDEX)
    data_file = os.path.join(directory, key + _DATA)
    try:
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
        if index.get("format") != FORMAT_VERSION or os.path.getsize(data_file) != index["size"]:
            raise ValueError("format or size mismatch")
        # Copy-on-write: a computation that donates a parameter can never write into the cache.
        data = np.memmap(data_file, np.uint8, mode="c") if index["size"] else np.zeros(0, np.uint8)
        flat = {}
        for name, (offset, shape, dtype) in index["params"].items():
            dt = to_dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            flat[tuple(name.split("/"))] = data[offset : offset + count * dt.itemsize].view(dt).reshape(shape)
    except FileNotFoundError:
        _prune_quietly(directory, key)
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"ignoring the unreadable prepared checkpoint {index_file} ({e})", stacklevel=3)
        return None
    _touch(index_file)
    return unflatten(flat)


def _touch(index_file: str) -> None:
    """Marks an entry used now (its index's mtime; a clock finer than the file system's own)."""
    now = time.time_ns()
    try:
        os.utime(index_file, ns=(now, now))
    except OSError:  # a read-only folder, or evicted meanwhile: the entry is used all the same
        pass


def _prune_quietly(directory: str, keep: str | None) -> None:
    try:
        prune(directory, None, keep=keep)
    except OSError:
        pass


# long: space check, eviction, atomic write and the post-write size check in one transaction
def prepare(
    directory: str,
    key: str,
    sources: list[list],
    build: Callable[[str], Any],
    max_bytes: int | None = None,
) -> dict | None:
    """Make the entry ``key`` and return it mapped (``lookup``), or None if it is not kept (with a
    one-line warning, unless ``max_bytes`` is 0); errors of ``build`` itself propagate.

    ``build(file)`` gives the parameter tree: views of ``file`` mapped shared, filled in place (see
    ``place.assemble``), or host arrays, which are then written into ``file``. ``max_bytes``: the
    folder's size limit (None: ``max_bytes_setting()``); less recently used entries are evicted to
    keep the folder, this entry included, under it (see the module's doc).
    """
    if max_bytes is None:
        max_bytes = max_bytes_setting()
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    need = sum(s[1] for s in sources)  # the entry's size, estimated
    try:
        found = _scan(directory) if os.path.isdir(directory) else []
        if max_bytes == 0 or need > max_bytes:  # keep nothing, or not this: dead entries go all the same
            _apply(directory, _plan(found, max_bytes if max_bytes == 0 else None))
            if max_bytes:
                _skip(directory, f"{_gib(need)} would exceed the params cache's limit of {_gib(max_bytes)}")
            return None
        dead, evict = plan = _plan(found, max_bytes, incoming=need)
        freed = sum(e.size for e in dead + evict)
        freed += sum(e.size for e in found if e.key == key and e not in dead + evict)  # replaced
        if shutil.disk_usage(_existing_ancestor(directory)).free + freed < need + _DISK_MARGIN:
            _skip(directory, f"{_gib(need)} would leave less than 1 GiB free")
            return None
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _apply(directory, plan)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=_TMP)
        os.close(fd)
    except OSError as e:
        _skip(directory, str(e))
        return None
    data_file = os.path.join(directory, key + _DATA)
    index_file = os.path.join(directory, key + _INDEX)
    try:
        flat = {"/".join(p): v for p, v in flatten(build(tmp)).items()}
        layout, size = _layout(tmp, flat)
        del flat  # unmaps the file written in place
        # The index of an older, unreadable entry goes first: an index never meets foreign data.
        _unlink(index_file)
        os.replace(tmp, data_file)
        index = {"format": FORMAT_VERSION, "sources": sources, "size": size, "params": layout}
        atomic_write_json(index_file, index, sync=False)
        _touch(index_file)
    except OSError as e:
        _skip(directory, str(e))
        return None
    finally:
        _unlink(tmp)
    params = lookup(directory, key)
    if params is None:  # evicted by another process meanwhile
        return None
    try:  # the true size may differ from the estimate (a cast, a subset of the modules)
        prune(directory, max_bytes, keep=key)
        own = os.path.getsize(data_file) + os.path.getsize(index_file)
        if own > max_bytes:  # not kept, though mapped here (an unlinked file stays mapped)
            _remove_entry(directory, key)
            _skip(directory, f"its {_gib(own)} exceed the params cache's limit of {_gib(max_bytes)}")
    except OSError:
        pass
    return params


def _skip(directory: str, reason: str) -> None:
    # stacklevel 4: the caller of load_checkpoint (prepare <- load_checkpoint <- caller).
    warnings.warn(f"not keeping a prepared copy of the checkpoint in {directory}: {reason}", stacklevel=4)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _existing_ancestor(path: str) -> str:
    """``path`` or its nearest existing parent: a folder whose disk the entry will go to."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _mapped_file(array: Any) -> np.memmap | None:
    """The memmap that owns ``array``'s memory (its views are memmaps too), or None."""
    if not isinstance(array, np.ndarray):
        return None
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array if isinstance(array, np.memmap) and array.filename is not None else None


def _layout(file: str, flat: Mapping[str, Any]) -> tuple[dict, int]:
    """``{name: [offset, shape, dtype]}`` and the size of ``file`` holding ``flat``: read off the views
    of a file written in place, else written into it here, each array at a 64-byte boundary."""
    roots = [_mapped_file(v) for v in flat.values()] if flat else [None]
    root = roots[0]
    if root is not None and all(r is root for r in roots) and os.path.samefile(root.filename, file):
        base = root.ctypes.data
        layout = {n: [v.ctypes.data - base, list(v.shape), v.dtype.name] for n, v in flat.items()}
        return layout, int(root.size)
    layout, size = {}, 0
    with open(file, "wb") as f:
        for name, value in flat.items():
            value = np.ascontiguousarray(value)
            layout[name] = [size, list(value.shape), value.dtype.name]
            f.seek(size)
            if value.nbytes:
                f.write(memoryview(value.reshape(-1).view(np.uint8)))
            size += padded_size(value.nbytes)
        f.truncate(size)
    return layout, size


# ---- the folder: listing, pruning, clearing -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry of the params cache, as ``entries`` reports it.

    ``size``: bytes on disk (data and index). ``sources``: the real paths of the checkpoint files it
    was prepared from. ``last_used``: when it was written or last mapped (seconds since the epoch; its
    index's mtime). ``missing_sources``: a source file is gone or changed since, so the entry can never
    be loaded again (``prune`` removes it). ``complete``: False for a broken or half-written entry (an
    index without data or the reverse, an unreadable index, a size mismatch). ``modules``: the model's
    top-level modules it holds. ``files``: the names of its files in the folder."""

    key: str
    size: int
    sources: tuple[str, ...]
    last_used: float
    missing_sources: bool
    complete: bool = True
    modules: tuple[str, ...] = ()
    files: tuple[str, ...] = dataclasses.field(default=(), repr=False, compare=False)

    @property
    def source(self) -> str:
        """The checkpoint's folder (the sources' common folder), or its one file; "" if unknown."""
        if not self.sources:
            return ""
        if len(self.sources) == 1:
            return self.sources[0]
        try:
            return os.path.commonpath(self.sources)
        except ValueError:
            return self.sources[0]


def entries(directory: str | os.PathLike) -> list[Entry]:
    """The entries of the params cache folder ``directory`` (none if it does not exist), most recently
    used first. Temporary files are not entries."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    return sorted(_scan(directory), key=lambda e: (-e.last_used, e.key))


def _scan(directory: str) -> list[Entry]:
    names: dict[str, list[str]] = {}
    for name in os.listdir(directory):
        for suffix in (_INDEX, _DATA):
            if name.endswith(suffix) and not name.startswith("."):
                names.setdefault(name[: -len(suffix)], []).append(name)
    found = []
    for key, files in names.items():
        entry = _read_entry(directory, key, tuple(sorted(files)))
        if entry is not None:
            found.append(entry)
    return found


def _read_entry(directory: str, key: str, names: tuple[str, ...]) -> Entry | None:
    """The entry ``key`` (None if it vanished meanwhile, removed by another process)."""
    stats = {}
    for name in names:
        try:
            stats[name] = os.stat(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    if not stats:
        return None
    size = sum(st.st_size for st in stats.values())
    index_stat = stats.get(key + _INDEX)
    data_stat = stats.get(key + _DATA)
    if index_stat is None:  # data without an index: in the making if recent
        return Entry(key, size, (), data_stat.st_mtime_ns / 1e9, False, False, (), tuple(stats))
    last_used = index_stat.st_mtime_ns / 1e9
    try:
        with open(os.path.join(directory, key + _INDEX), encoding="utf-8") as f:
            index = json.load(f)
        sources = [list(s) for s in index["sources"]]
        paths = tuple(str(s[0]) for s in sources)
        modules = tuple(sorted({name.split("/", 1)[0] for name in index["params"]}))
        complete = (
            index.get("format") == FORMAT_VERSION
            and data_stat is not None
            and data_stat.st_size == index["size"]
        )
    except FileNotFoundError:
        return _read_entry(directory, key, names) if data_stat is not None else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return Entry(key, size, (), last_used, False, False, (), tuple(stats))
    return Entry(key, size, paths, last_used, _sources_gone(sources), complete, modules, tuple(stats))


def _sources_gone(sources: list[list]) -> bool:
    """True if a source file no longer exists as it was (path, size, mtime, inode)."""
    for source in sources:
        try:
            st = os.stat(source[0])
        except OSError:
            return True
        if [st.st_size, st.st_mtime_ns, st.st_ino] != list(source[1:4]):
            return True
    return False


def _dead(entry: Entry, now: float | None = None) -> bool:
    """An entry that can never be looked up again, or a broken one; data written without an index
    yet is another process's work until it is an hour old."""
    if entry.missing_sources:
        return True
    if entry.complete:
        return False
    in_the_making = entry.files == (entry.key + _DATA,)
    now = time.time() if now is None else now
    return not in_the_making or now - entry.last_used > _GRACE_SECONDS


def _total(found: list[Entry]) -> int:
    return sum(e.size for e in found)


def prune(
    directory: str | os.PathLike, max_bytes: int | None, keep: str | None = None, incoming: int = 0
) -> list[str]:
    """Remove the dead entries of the params cache (a source file gone or changed, broken entries;
    see ``Entry``) and temporary files over an hour old, then, unless ``max_bytes`` is None, the least
    recently used entries until the folder's total plus ``incoming`` bytes is at most ``max_bytes``.
    The entry ``keep`` is never removed. Returns the removed entries' keys."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    dead, evict = plan = _plan(_scan(directory), max_bytes, keep, incoming)
    _apply(directory, plan)
    return [e.key for e in dead + evict]


def _plan(
    found: list[Entry], max_bytes: int | None, keep: str | None = None, incoming: int = 0
) -> tuple[list[Entry], list[Entry]]:
    """(dead entries, least recently used entries to evict) of ``prune``."""
    now = time.time()
    dead = [e for e in found if e.key != keep and _dead(e, now)]
    live = [e for e in found if e not in dead]
    if max_bytes is None:
        return dead, []
    room = max_bytes - incoming - _total([e for e in live if e.key == keep])
    total, evict = _total(live) - _total([e for e in live if e.key == keep]), []
    for entry in sorted((e for e in live if e.key != keep), key=lambda e: (e.last_used, e.key)):
        if total <= room:
            break
        evict.append(entry)
        total -= entry.size
    return dead, evict


def _apply(directory: str, plan: tuple[list[Entry], list[Entry]]) -> None:
    if not os.path.isdir(directory):
        return
    for entry in plan[0] + plan[1]:
        _remove_entry(directory, entry.key, entry.files)
    _remove_temporary(directory, older_than=_GRACE_SECONDS)


def clear(directory: str | os.PathLike, key: str | None = None) -> list[str]:
    """Remove every entry of the params cache folder and its temporary files (``key`` None), or the
    one entry ``key`` (or the one whose key starts with it). Returns the removed keys; an unknown or
    ambiguous ``key`` is a ValueError. A load that is writing an entry meanwhile only fails to keep it."""
    directory = os.fspath(directory)
    found = entries(directory)
    if key is None:
        for entry in found:
            _remove_entry(directory, entry.key, entry.files)
        if os.path.isdir(directory):
            _remove_temporary(directory, older_than=None)
        return [e.key for e in found]
    matches = [e for e in found if e.key == key] or [e for e in found if key and e.key.startswith(key)]
    if len(matches) != 1:
        problem = "no" if not matches else "more than one"
        raise ValueError(
            f"{problem} params cache entry {key!r} in {directory}: `xcodec2-jax cache list` lists them"
        )
    _remove_entry(directory, matches[0].key, matches[0].files)
    return [matches[0].key]


def format_entries(found: Sequence[Entry]) -> str:
    """A table of ``entries`` for ``xcodec2-jax cache list``: key, size, last use, source."""
    if not found:
        return "no prepared checkpoints"
    lines = [f"{'KEY':32}  {'SIZE':>9}  {'LAST USED':16}  SOURCE"]
    for e in found:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        note = " (source gone)" if e.missing_sources else "" if e.complete else " (incomplete)"
        modules = f" [{', '.join(e.modules)}]" if e.modules else ""
        lines.append(f"{e.key:32}  {_gib(e.size):>9}  {used:16}  {e.source or '?'}{modules}{note}")
    lines.append(f"{len(found)} entries, {_gib(_total(list(found)))} in all")
    return "\n".join(lines)


def _remove_entry(directory: str, key: str, names: Sequence[str] = ()) -> None:
    """Remove an entry's files, its index first (so a concurrent reader never maps a half entry)."""
    names = set(names) | {key + _INDEX, key + _DATA}
    for name in sorted(names, key=lambda n: not n.endswith(_INDEX)):
        _unlink(os.path.join(directory, name))


def _remove_temporary(directory: str, older_than: float | None) -> None:
    now = time.time()
    for name in os.listdir(directory):
        if not name.endswith(_TMP):
            continue
        file = os.path.join(directory, name)
        try:
            if older_than is None or now - os.stat(file).st_mtime > older_than:
                os.unlink(file)
        except FileNotFoundError:
            pass


def _unlink(file: str) -> None:
    try:
        os.unlink(file)
    except FileNotFoundError:
        pass
