"""Safetensors files without a framework: the header (names, dtypes, shapes, byte ranges) read on its
own, tensors as zero-copy views of a memory map, and pages handed back once a tensor is consumed.

Loading never reads a tensor it does not need (the original release's w2v-BERT layers 16-23 stay on
disk) and never holds the whole file in process memory: each tensor is viewed in the map, copied
once into its parameter's buffer (transposed on the way if the layout differs), and its pages are
dropped from the process with ``madvise(MADV_DONTNEED)``; the page cache keeps them for the next load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _dtype(name: str, file: str, key: str) -> np.dtype:
    if name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in _DTYPES:
        raise ValueError(f"{file}: tensor {key!r} has dtype {name}, which this loader does not read")
    return np.dtype(_DTYPES[name])


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file, dtype, shape and absolute byte range."""

    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(file: str) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its JSON header alone (no tensor data is read)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{file} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file} is not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file} is not a safetensors file (header is not an object)")
    base = 8 + n
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _dtype(entry["dtype"], file, key)
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ValueError) and "dtype" in str(e):
                raise
            raise ValueError(f"{file}: malformed header entry for {key!r}: {entry!r}") from None
        if end - start != math.prod(shape) * dtype.itemsize or start < 0 or base + end > size:
            raise ValueError(
                f"{file}: tensor {key!r} has a byte range that does not fit its shape or the file"
            )
        out[key] = TensorInfo(file, dtype, shape, base + start, base + end)
    return out


def resolve_files(path: str) -> list[str]:
    """The safetensors file(s) of a checkpoint: a file, a sharded index, or a directory holding either."""
    if os.path.isfile(path):
        if path.endswith(".json"):
            return _files_from_index(path)
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    single = os.path.join(path, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        return _files_from_index(index)
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(found) == 1:
        return [os.path.join(path, found[0])]
    raise FileNotFoundError(
        f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {path!r}"
        + (f" (found several .safetensors files: {found})" if found else "")
    )


def _files_from_index(index_path: str) -> list[str]:
    with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    root = os.path.dirname(index_path)
    files = []
    for name in weight_map.values():
        full = os.path.join(root, name)
        if full not in files:
            files.append(full)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"shard(s) listed in {index_path} are missing: {missing}")
    return files


def checkpoint_index(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint (file, directory or sharded index), from the headers alone."""
    index: dict[str, TensorInfo] = {}
    for file in resolve_files(os.fspath(path)):
        for key, info in read_header(file).items():
            if key in index:
                raise ValueError(f"key {key!r} appears in more than one shard ({index[key].file}, {file})")
            index[key] = info
    return index


class Tensor:
    """A checkpoint tensor in its stored (torch) layout, read only when asked.

    ``load()`` gives a numpy array that may be a read-only view of the file's memory map (copy it to
    keep it); ``release()`` says the loader is done with it, so its pages can leave the process.
    """

    __slots__ = ("shape", "dtype", "_load", "_release", "_read_into")

    def __init__(
        self,
        shape,
        dtype,
        load: Callable[[], np.ndarray],
        release: Callable[[], None] | None = None,
        read_into: Callable[[np.ndarray], None] | None = None,
    ):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._load = load
        self._release = release
        self._read_into = read_into

    @classmethod
    def of(cls, value: Any) -> Tensor:
        """Wrap an in-memory array."""
        value = np.asarray(value)
        return cls(value.shape, value.dtype, lambda: value)

    def load(self) -> np.ndarray:
        return self._load()

    def read_into(self, dst: np.ndarray) -> bool:
        """Write the tensor, cast to ``dst``'s dtype, straight into ``dst`` (of its shape) if it has a
        reader that can, without holding it whole anywhere else; False, writing nothing, if not."""
        if self._read_into is None or tuple(dst.shape) != self.shape:
            return False
        self._read_into(dst)
        return True

    def release(self) -> None:
        if self._release is not None:
            self._release()

    def __array__(self, dtype=None, copy=None):
        return np.array(self.load(), dtype=dtype, copy=True)

    def __repr__(self):
        return f"Tensor(shape={self.shape}, dtype={self.dtype})"


class TensorReader:
    """Memory maps of a checkpoint's files, opened on first use and shared by its tensors."""

    def __init__(self):
        self._maps: dict[str, mmap.mmap] = {}
        self._page = mmap.PAGESIZE
        self._lock = threading.Lock()  # tensors are read from several threads

    def _map(self, file: str) -> mmap.mmap:
        with self._lock:
            if file not in self._maps:
                with open(file, "rb") as f:
                    self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return self._maps[file]

    def view(self, info: TensorInfo) -> np.ndarray:
        n = math.prod(info.shape)
        if n == 0:
            return np.empty(info.shape, info.dtype)
        return np.frombuffer(self._map(info.file), info.dtype, count=n, offset=info.start).reshape(info.shape)

    def release(self, info: TensorInfo) -> None:
        mm = self._maps.get(info.file)
        if mm is None or not hasattr(mm, "madvise"):
            return
        # Whole pages inside the tensor only; a page shared with a neighbour faults back in from the
        # page cache if that neighbour is read later.
        start = -(-info.start // self._page) * self._page
        end = info.end // self._page * self._page
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def tensor(self, info: TensorInfo) -> Tensor:
        return Tensor(info.shape, info.dtype, lambda: self.view(info), lambda: self.release(info))

    def tensors(self, index: Mapping[str, TensorInfo]) -> dict[str, Tensor]:
        return {key: self.tensor(info) for key, info in index.items()}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors checkpoint (file, directory, or sharded index) as numpy copies."""
    reader = TensorReader()
    return {key: np.array(reader.view(info)) for key, info in checkpoint_index(path).items()}


def aligned_empty(shape: tuple[int, ...], dtype: Any, alignment: int = 64) -> np.ndarray:
    """``np.empty`` at an ``alignment``-byte boundary, which XLA's CPU client can adopt without a copy."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def populated_buffer(nbytes: int) -> np.ndarray:
    """A fresh, page-aligned, writable ``uint8`` buffer of ``nbytes``, its pages already in place.

    Anonymous memory populated in one call (``MADV_POPULATE_WRITE``, Linux 5.14+), made through
    ctypes so that the GIL is released meanwhile (the loader populates while the model is traced):
    faulting gigabytes in on first write, 4 KiB at a time, costs several times more on a virtual
    machine. Huge pages are not asked for: with the kernel's default ``defrag=madvise`` they can
    stall the allocation for seconds in direct compaction when memory is fragmented.
    """
    if nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return aligned_empty((nbytes,), np.uint8)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer = np.frombuffer(mm, np.uint8)
    try:
        import ctypes

        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        madvise(buffer.ctypes.data, nbytes, getattr(mmap, "MADV_POPULATE_WRITE", 23))
    except (OSError, AttributeError):  # no libc madvise here: pages fault in on first write instead
        pass
    return buffer


def padded_size(nbytes: int, alignment: int = 64) -> int:
    return -(-nbytes // alignment) * alignment


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dict -> ``{path tuple: leaf}``."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """``{path tuple: leaf}`` -> nested dict."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree
