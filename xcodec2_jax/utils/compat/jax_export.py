"""Skipping JAX's LAPACK initialisation when lowering a call to an exported module that needs none.

``jax._src.export._export._ensure_backends_initialized`` initialises the CPU LAPACK kernels before
lowering a call to any ``jax.export.Exported``, which imports ``scipy.linalg`` (0.1-0.45 s under the
GIL, on the way to a first encode). :func:`skip_for` wraps that private hook once, so that it is
skipped while a program known to call no LAPACK kernel is lowered on the current thread. Written
for JAX 0.9-0.10; a JAX without the hook keeps its own behaviour (one warning).
"""

from __future__ import annotations

import contextlib
import functools
import threading

from . import PrivateAPIMissing, check_version, warn_missing

_state = threading.local()


def _module():
    from jax._src.export import _export

    return _export


@functools.cache
def _install() -> bool:
    import jax

    check_version("jax", jax.__version__, "0.9", "0.11")
    try:
        export = _module()
        ensure = export._ensure_backends_initialized
    except (ImportError, AttributeError):
        warn_missing("jax._src.export._export._ensure_backends_initialized", "scipy is imported as JAX does")
        return False

    def ensure_unless_skipped(*args, **kwargs):
        if getattr(_state, "skip", False):
            return None
        return ensure(*args, **kwargs)

    export._ensure_backends_initialized = ensure_unless_skipped
    return True


@contextlib.contextmanager
def lapack_init_skipped(skip: bool = True):
    """While active on this thread (and ``skip``), lowering an exported call skips the LAPACK init."""
    if skip:
        _install()
    before = getattr(_state, "skip", False)
    _state.skip = skip
    try:
        yield
    finally:
        _state.skip = before


def check() -> None:
    try:
        export = _module()
    except ImportError as e:
        raise PrivateAPIMissing(f"jax._src.export._export: {e}") from None
    if not callable(getattr(export, "_ensure_backends_initialized", None)):
        raise PrivateAPIMissing("jax._src.export._export._ensure_backends_initialized is gone")
