"""Mapped checkpoint tensors -> the model's parameter tree, each tensor copied once.

Each parameter gets one fresh 64-byte-aligned host buffer, and each of its checkpoint tensors is
copied into it straight from the memory map, transposed to the Flax layout on the way (row blocks,
so that reads and writes both stay in cache) and cast if asked; a stacked parameter (the scanned
layers, see ``model.scanned_layers``) receives layer ``i`` in slice ``i``, without an intermediate
copy. The tensor's pages then leave the process. With a device or sharding, the buffer is handed to
``jax.device_put`` and dropped: XLA's CPU client adopts an aligned buffer without copying, and an
accelerator copies it over, after which the host memory is freed. Parameters are built on a few
threads (numpy copies release the GIL).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from ..modeling.layout import keeps_float32, parameter_groups
from ..utils.compat import numpy_mmap
from ..utils.tree import flatten, unflatten
from .io import Tensor, aligned_empty, padded_size, populated_buffer
from .transformers import path_to_torch_key


def _block(itemsize: int) -> int:
    # Rows per block: each transposed write then covers 256 bytes (four cache lines) of a
    # destination row, which kept both the reads and the writes in cache best of the sizes tried.
    return max(8, 256 // itemsize)


def copy_into(dst: np.ndarray, src: np.ndarray, perm: tuple[int, ...] | None) -> None:
    """``dst[...] = src.transpose(perm)`` (cast as needed), in row blocks of ``src``."""
    if perm is None:
        np.copyto(dst, src, casting="unsafe")
        return
    b = _block(dst.itemsize)
    if perm == (1, 0):
        for i in range(0, src.shape[0], b):
            np.copyto(dst[:, i : i + b], src[i : i + b].T, casting="unsafe")
    elif perm == (2, 1, 0):
        for i in range(0, src.shape[0], b):
            np.copyto(dst[:, :, i : i + b], src[i : i + b].transpose(2, 1, 0), casting="unsafe")
    else:
        np.copyto(dst, np.transpose(src, perm), casting="unsafe")


def _out_dtype(src_dtype: np.dtype, dtype: Any) -> np.dtype:
    if dtype is not None and np.issubdtype(src_dtype, np.floating):
        return np.dtype(dtype)
    if dtype is not None and src_dtype.kind == "V" and "bfloat16" in src_dtype.name:
        return np.dtype(dtype)
    return src_dtype


def _leaf_spec(items, placed, dtype) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the parameter assembled from ``items``."""
    value, perm = placed[items[0][1]]
    shape = tuple(value.shape) if perm is None else tuple(value.shape[i] for i in perm)
    if items[0][0] is not None:
        indices = sorted(i for i, _ in items)
        if indices != list(range(len(items))):
            raise ValueError(
                f"layers {indices} of {path_to_torch_key(items[0][1])}: expected 0..{len(items) - 1}"
            )
        shape = (len(items),) + shape
    return shape, _out_dtype(np.dtype(value.dtype), dtype)


def _nbytes(spec) -> int:
    shape, dt = spec
    return int(np.prod(shape, dtype=np.int64)) * dt.itemsize


class _Arena:
    """One allocation for every parameter, carved into 64-byte-aligned views.

    For parameters that stay in host memory (no placement, or a CPU device): one populated allocation
    (see ``populated_buffer``) instead of page faults spread over every copy. ``buffer``, if given and
    large enough, is used instead of a new one (``load_checkpoint`` populates it during the trace).
    With ``file``, the allocation is that file, mapped shared: each parameter's pages leave the
    process once it is written (``drop``), and the file holds every parameter at the end.
    """

    def __init__(self, specs, buffer: np.ndarray | None = None, file: str | None = None):
        self.specs, self.offsets, total = specs, {}, 0
        for path, spec in specs.items():
            self.offsets[path] = total
            total += padded_size(_nbytes(spec))
        self.mapped = None
        if file is not None:
            self.buffer = self.mapped = np.memmap(file, np.uint8, mode="w+", shape=(max(total, 1),))
            _no_readahead(self.mapped)
        elif buffer is not None and buffer.size >= total:
            self.buffer = buffer
        else:
            self.buffer = populated_buffer(total)

    def view(self, path) -> np.ndarray:
        shape, dt = self.specs[path]
        start = self.offsets[path]
        return self.buffer[start : start + _nbytes(self.specs[path])].view(dt).reshape(shape)

    def drop(self, path) -> None:
        """With a file: the written parameter's whole pages leave the process (not the file)."""
        if self.mapped is None:
            return
        page = mmap.PAGESIZE
        start = -(-self.offsets[path] // page) * page
        end = (self.offsets[path] + _nbytes(self.specs[path])) // page * page
        numpy_mmap.advise(self.mapped, mmap.MADV_DONTNEED, start, end - start)


def _no_readahead(mapped: np.memmap) -> None:
    """Page faults on this (new, sparse) file mapping read one page, not ahead.

    The copies write the file through the mapping; each first write to a page faults it in, and with
    readahead the kernel allocates large page-cache folios for the file's holes and zero-fills them.
    On a virtual machine whose host has taken back the guest's free memory, those high-order
    allocations cost far more than single pages: that zero-filling took over a third of a slow
    first-ever ``xcodec2-jax encode``."""
    if hasattr(mmap, "MADV_RANDOM"):
        numpy_mmap.advise(mapped, mmap.MADV_RANDOM)


def _fill(buf: np.ndarray, items, placed) -> None:
    for i, path in items:
        value, perm = placed[path]
        dst = buf if i is None else buf[i]
        if not (perm is None and isinstance(value, Tensor) and value.read_into(dst)):
            array = value.load() if isinstance(value, Tensor) else np.asarray(value)
            copy_into(dst, array, perm)
            del array
        if isinstance(value, Tensor):
            value.release()


def host_bytes(tensors: Mapping[tuple[str, ...], Any], dtype: Any = None) -> int:
    """The arena that ``assemble`` carves for these tensors (keyed by checkpoint path, all of them
    placed), or a little more (its padding is per parameter, this per tensor)."""
    total = 0
    for path, t in tensors.items():
        target = dtype if dtype is None or not keeps_float32(path) else np.float32
        total += padded_size(
            int(np.prod(t.shape, dtype=np.int64)) * _out_dtype(np.dtype(t.dtype), target).itemsize
        )
    return total


def stays_on_host(placement: Any) -> bool:
    """True if parameters placed by ``placement`` live in this process's memory (None or one CPU)."""
    if placement is None:
        return True
    if isinstance(placement, jax.Device):
        return placement.platform == "cpu"
    return isinstance(placement, jax.sharding.Sharding) and _on_one_cpu(placement)


def _on_one_cpu(sharding) -> bool:
    devices = sharding.device_set
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def shardings_for(placement: Any, leaves):
    """``{model path: Sharding}`` for ``placement``: a device, one sharding, or a tree of them."""
    if isinstance(placement, jax.Device):
        placement = jax.sharding.SingleDeviceSharding(placement)
    if isinstance(placement, jax.sharding.Sharding):
        return dict.fromkeys(leaves, placement)
    if isinstance(placement, Mapping):
        flat = flatten(placement)
        missing = [p for p in leaves if p not in flat]
        if missing:
            raise ValueError(
                f"the sharding tree has no entry for {len(missing)} parameter(s), e.g. {missing[:3]}"
            )
        return flat
    raise TypeError(
        f"expected a jax.Device, a jax.sharding.Sharding or a tree of them, got {type(placement)}"
    )


def assemble(
    placed: Mapping[tuple[str, ...], tuple[Any, tuple[int, ...] | None]],
    stacks: Mapping[tuple[str, ...], int],
    *,
    dtype: Any = None,
    placement: Any = None,
    workers: int | None = None,
    buffer: np.ndarray | None = None,
    file: str | None = None,
) -> dict[str, Any]:
    """``{checkpoint path: (tensor, perm)}`` (from ``map_state``) -> the nested model parameter tree.

    Host numpy arrays without ``placement`` (views of one shared buffer); else ``jax.Array`` s placed
    by it (a ``jax.Device``, a ``Sharding``, or a tree of them in the model layout), each host buffer
    dropped once placed (on a CPU device, adopted by XLA without a copy). With ``file`` (and no
    placement): the parameters are written into that file, mapped, and come back as views of it.
    """
    groups = parameter_groups(placed, stacks)

    # A cast to a lower precision skips the float32 islands (FSQ, norms, SnakeBeta, ISTFT head).
    island = None if dtype is None else np.float32
    specs = {
        p: _leaf_spec(items, placed, island if keeps_float32(p) else dtype) for p, items in groups.items()
    }
    if file is not None and placement is not None:
        raise ValueError("assemble writes to a file only without a placement")
    shardings = None if placement is None else shardings_for(placement, groups)
    arena = None
    if shardings is None or all(_on_one_cpu(shardings[p]) for p in groups):
        arena = _Arena(specs, buffer, file)

    def build(path):
        buf = arena.view(path) if arena is not None else aligned_empty(*specs[path])
        _fill(buf, groups[path], placed)
        if arena is not None:
            arena.drop(path)
        if shardings is None:
            return buf
        return jax.device_put(buf, shardings[path], may_alias=True)

    workers = workers or min(4, os.cpu_count() or 1)
    # Biggest first, so the threads finish together.
    order = sorted(groups, key=lambda p: -_nbytes(specs[p]))
    with ThreadPoolExecutor(workers) as pool:
        leaves = dict(zip(order, pool.map(build, order), strict=True))
    if shardings is not None:
        jax.block_until_ready(list(leaves.values()))
    return unflatten({p: leaves[p] for p in groups})


def place_tree(params: Mapping[str, Any], placement: Any) -> dict[str, Any]:
    """``jax.device_put`` of every leaf by ``placement`` (see ``assemble``); aligned host arrays are
    adopted without a copy on a CPU device."""
    flat = flatten(params)
    shardings = shardings_for(placement, flat)
    placed = {p: jax.device_put(v, shardings[p], may_alias=True) for p, v in flat.items()}
    jax.block_until_ready(list(placed.values()))
    return unflatten(placed)
