"""Safetensors files without a framework: the header (names, dtypes, shapes, byte ranges) read on its
own, tensors as zero-copy views of a memory map, and pages handed back once a tensor is consumed.

Loading never reads a tensor it does not need (the original release's w2v-BERT layers 16-23 stay on
disk) and never holds the whole file in process memory: each tensor is viewed in the map, copied
once into its parameter's buffer (transposed on the way if the layout differs), and its pages are
dropped from the process with ``madvise(MADV_DONTNEED)``; the page cache keeps them for the next load.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..utils.compat.libc import populate_write
from ..utils.safetensors import TensorInfo, checkpoint_index


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

    Anonymous memory populated in one call (:func:`~xcodec2_jax.utils.compat.libc.populate_write`),
    which releases the GIL meanwhile (the loader populates while the model is traced): faulting
    gigabytes in on first write, 4 KiB at a time, costs several times more on a virtual machine.
    Huge pages are not asked for: with the kernel's default ``defrag=madvise`` they can stall the
    allocation for seconds in direct compaction when memory is fragmented.
    """
    if nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return aligned_empty((nbytes,), np.uint8)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer = np.frombuffer(mm, np.uint8)
    populate_write(buffer)  # where the kernel cannot, pages fault in on first write instead
    return buffer


def padded_size(nbytes: int, alignment: int = 64) -> int:
    return -(-nbytes // alignment) * alignment
