"""glibc's ``malloc_trim`` and Linux's ``madvise(MADV_POPULATE_WRITE)`` through ctypes.

``malloc_trim(0)`` hands the heap that a compilation freed back to the OS (glibc only; elsewhere a
no-op). ``MADV_POPULATE_WRITE`` (Linux 5.14+) faults a buffer's pages in with one call that releases
the GIL; Python's ``mmap`` module exposes the constant only from 3.12 on, so the kernel's value (23,
fixed in the Linux ABI) is used where it does not. Both report failure by their return value,
which is checked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap

import numpy as np

from . import PrivateAPIMissing

# linux/mman.h: MADV_POPULATE_WRITE (part of the kernel ABI, never renumbered).
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def malloc_trim() -> bool:
    """Return the freed heap to the OS (glibc); False where the C library has no ``malloc_trim``."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False


def populate_write(buffer: np.ndarray) -> bool:
    """Fault every page of ``buffer`` (page-aligned memory of an anonymous or shared mapping) in for
    writing, in one system call; False (nothing done) where the kernel or C library cannot."""
    libc = _libc()
    madvise = getattr(libc, "madvise", None)
    if madvise is None or buffer.nbytes == 0:
        return False
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise(buffer.ctypes.data, buffer.nbytes, _MADV_POPULATE_WRITE) == 0


def check() -> None:
    """Raise :class:`PrivateAPIMissing` if the C library lacks either function (Linux/glibc only)."""
    libc = _libc()
    missing = [name for name in ("malloc_trim", "madvise") if getattr(libc, name, None) is None]
    if missing:
        raise PrivateAPIMissing(f"the C library has no {missing}")
