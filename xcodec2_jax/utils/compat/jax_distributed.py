"""A barrier between the processes of a ``jax.distributed`` job, through its coordination service.

JAX's public barrier (``multihost_utils.sync_global_devices``) is a device collective: it compiles a
program and needs cross-process collectives on the backend (CPU has none without extra setup). The
coordination service's own barrier needs neither; its client is reachable only through
``jax._src.distributed.global_state.client`` (JAX 0.4-0.10).
"""

from __future__ import annotations

from . import PrivateAPIMissing, check_version


def _client():
    import jax
    from jax._src import distributed

    check_version("jax", jax.__version__, "0.4", "0.11")
    client = getattr(getattr(distributed, "global_state", None), "client", None)
    if client is None or not hasattr(client, "wait_at_barrier"):
        raise PrivateAPIMissing(
            "jax._src.distributed.global_state.client.wait_at_barrier is not available "
            "(is jax.distributed initialized?)"
        )
    return client


def barrier(name: str, timeout_s: float) -> None:
    """Wait until every process reached the barrier ``name`` (at most ``timeout_s`` seconds)."""
    _client().wait_at_barrier(name, int(timeout_s * 1000))


def check() -> None:
    from jax._src import distributed

    if not hasattr(getattr(distributed, "global_state", None), "client"):
        raise PrivateAPIMissing("jax._src.distributed.global_state.client is gone")
