"""The name of JAX's monitoring event recorded after each backend compilation.

JAX records ``BACKEND_COMPILE_EVENT`` (``jax._src.dispatch``; no public constant) after every
compilation and every load from the persistent compilation cache. The name is read from JAX, not
copied, so a renamed event fails :func:`check` instead of never firing.
"""

from __future__ import annotations

from . import PrivateAPIMissing


def backend_compile_event() -> str | None:
    """The event's name, or None if this JAX has none."""
    try:
        from jax._src import dispatch
    except ImportError:
        return None
    return getattr(dispatch, "BACKEND_COMPILE_EVENT", None)


def check() -> None:
    if not backend_compile_event():
        raise PrivateAPIMissing("jax._src.dispatch.BACKEND_COMPILE_EVENT is gone")
