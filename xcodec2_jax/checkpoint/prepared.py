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
then the index are written under temporary names and renamed. The folder holds a copy of each
checkpoint in use (2.5 GB for the full model in float32); the compilation cache's switches
(``--no-cache``, ``compilation_cache=False``, ``XCODEC2_JAX_CACHE_DIR=off``) turn it off too, and
deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .io import flatten, padded_size, unflatten

PARAMS_DIR = "xcodec2_jax_params"
FORMAT_VERSION = 1
# Free space kept on the cache's disk after writing an entry.
_DISK_MARGIN = 1 << 30


def params_dir(compilation_cache_dir: str | None) -> str | None:
    """Where prepared checkpoints go for a compilation cache folder (None: no cache, nothing kept)."""
    return None if compilation_cache_dir is None else os.path.join(compilation_cache_dir, PARAMS_DIR)


def checkpoint_files(path: str, fmt: str) -> list[str]:
    """Every file whose change must invalidate the prepared copy of the checkpoint at ``path``."""
    from .io import resolve_files

    if fmt == "orbax":
        found = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            found.extend(os.path.join(dirpath, f) for f in sorted(filenames))
        return found
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
    from .. import __version__

    sources = _sources(files)
    dtype_name = "stored" if dtype is None else np.dtype(dtype).name
    identity = [FORMAT_VERSION, __version__, sources, repr(config), dtype_name]
    if modules is not None:  # a full entry keeps the key it always had
        identity.append(sorted(modules))
    identity = json.dumps(identity)
    return hashlib.sha256(identity.encode()).hexdigest()[:32], sources


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def lookup(directory: str, key: str) -> dict[str, Any] | None:
    """The prepared parameter tree (read-only views of the mapped file), or None if there is none."""
    index_file = os.path.join(directory, key + ".json")
    data_file = os.path.join(directory, key + ".params")
    try:
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
        if index.get("format") != FORMAT_VERSION or os.path.getsize(data_file) != index["size"]:
            raise ValueError("format or size mismatch")
        # Copy-on-write: a computation that donates a parameter can never write into the cache.
        data = np.memmap(data_file, np.uint8, mode="c") if index["size"] else np.zeros(0, np.uint8)
        flat = {}
        for name, (offset, shape, dtype) in index["params"].items():
            dt = _dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            flat[tuple(name.split("/"))] = (
                data[offset : offset + count * dt.itemsize].view(dt).reshape(shape)
            )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"ignoring the unreadable prepared checkpoint {index_file} ({e})", stacklevel=3)
        return None
    return unflatten(flat)


def prepare(directory: str, key: str, sources: list[list], build: Callable[[str], Any]) -> dict | None:
    """Make the entry ``key`` and return it mapped (``lookup``), or None (with a warning) if it cannot
    be kept; errors of ``build`` itself propagate.

    ``build(file)`` gives the parameter tree: views of ``file`` mapped shared, filled in place (see
    ``place.assemble``), or host arrays, which are then written into ``file``.
    """
    need = sum(s[1] for s in sources)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if shutil.disk_usage(directory).free < need + _DISK_MARGIN:
            warnings.warn(
                f"not keeping a prepared copy of the checkpoint in {directory}: "
                f"{need / 2**30:.1f} GiB would leave less than 1 GiB free",
                stacklevel=3,
            )
            return None
        _remove_stale(directory, key, sources)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        os.close(fd)
    except OSError as e:
        warnings.warn(f"cannot keep a prepared copy of the checkpoint in {directory} ({e})", stacklevel=3)
        return None
    try:
        flat = {"/".join(p): v for p, v in flatten(build(tmp)).items()}
        layout, size = _layout(tmp, flat)
        del flat  # unmaps the file written in place
        os.replace(tmp, os.path.join(directory, key + ".params"))
        index = {"format": FORMAT_VERSION, "sources": sources, "size": size, "params": layout}
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as g:
            json.dump(index, g)
        os.replace(g.name, os.path.join(directory, key + ".json"))
    except OSError as e:
        warnings.warn(f"cannot keep a prepared copy of the checkpoint in {directory} ({e})", stacklevel=3)
        return None
    finally:
        for leftover in (tmp, locals().get("g") and locals()["g"].name):
            if leftover and os.path.exists(leftover):
                os.unlink(leftover)
    return lookup(directory, key)


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


def _remove_stale(directory: str, key: str, sources: list[list]) -> None:
    """Entries prepared from the same files (by real path) at another state of them."""
    paths = sorted(s[0] for s in sources)
    for name in os.listdir(directory):
        if not name.endswith(".json") or name == key + ".json":
            continue
        file = os.path.join(directory, name)
        try:
            with open(file, encoding="utf-8") as f:
                other = json.load(f)["sources"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if sorted(s[0] for s in other) == paths and sorted(other) != sorted(sources):
            for suffix in (".json", ".params"):
                try:
                    os.unlink(file[: -len(".json")] + suffix)
                except FileNotFoundError:
                    pass
