"""The ``mmap.mmap`` behind a ``numpy.memmap`` (its private ``_mmap`` attribute), to ``madvise`` it.

numpy offers no public access to the mapping object of a memmap; ``_mmap`` has been there since
numpy 1.x and is checked by the test suite (``check``). Where it is missing, callers skip their
``madvise`` hints, which change memory use and speed, never results.
"""

from __future__ import annotations

import mmap

import numpy as np

from . import PrivateAPIMissing, warn_missing


def mapping(array: np.memmap) -> mmap.mmap | None:
    """The ``mmap.mmap`` object of ``array`` (a ``np.memmap`` owning its map), or None."""
    mm = getattr(array, "_mmap", None)
    if mm is None and isinstance(array, np.memmap) and array.base is None:
        warn_missing("numpy.memmap._mmap", "madvise hints on memory-mapped files are skipped")
    return mm if isinstance(mm, mmap.mmap) else None


def advise(array: np.memmap, advice: int, start: int = 0, length: int | None = None) -> None:
    """``madvise(advice)`` on a byte range of ``array``'s mapping, if it can be reached."""
    mm = mapping(array)
    if mm is None or not hasattr(mm, "madvise"):
        return
    if length is None:
        mm.madvise(advice)
    elif length > 0:
        mm.madvise(advice, start, length)


def check() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        probe = np.memmap(f"{folder}/probe", np.uint8, mode="w+", shape=(1,))
        found = isinstance(getattr(probe, "_mmap", None), mmap.mmap)
        del probe
    if not found:
        raise PrivateAPIMissing(f"numpy {np.__version__}: numpy.memmap no longer keeps its mmap in _mmap")
