"""Orbax's tensorstore specs for reading one stored array, to read it straight into a given buffer.

``type_handlers.get_json_tspec_read``, ``get_ts_context``, ``is_ocdbt_checkpoint`` and ``ParamInfo``
are exported by ``orbax.checkpoint.type_handlers`` (0.12) but serve Orbax's own handlers, and
``get_json_tspec_read`` is deprecated in favour of ``build_array_read_spec(...).json``, which lives
in a private module: the newer name is used where it exists, the older otherwise.
"""

from __future__ import annotations

from typing import Any

from . import PrivateAPIMissing, check_version


def _handlers():
    import orbax.checkpoint as ocp

    check_version("orbax-checkpoint", ocp.__version__, "0.12", "0.13")
    return ocp.type_handlers


def read_spec(info: Any, use_ocdbt: bool) -> dict[str, Any]:
    """The JSON tensorstore spec that Orbax reads the array described by ``info`` (a ParamInfo) with."""
    try:
        from orbax.checkpoint._src.serialization.tensorstore_utils import build_array_read_spec
    except ImportError:
        return _handlers().get_json_tspec_read(info, use_ocdbt=use_ocdbt)
    return build_array_read_spec(info, use_ocdbt=use_ocdbt).json


def context(use_ocdbt: bool):
    """Orbax's tensorstore context for a checkpoint (OCDBT or not)."""
    return _handlers().get_ts_context(use_ocdbt=use_ocdbt)


def param_info(**kwargs: Any):
    return _handlers().ParamInfo(**kwargs)


def is_ocdbt(path: Any) -> bool:
    return _handlers().is_ocdbt_checkpoint(path)


def check() -> None:
    handlers = _handlers()
    missing = [n for n in ("get_ts_context", "ParamInfo", "is_ocdbt_checkpoint") if not hasattr(handlers, n)]
    try:
        from orbax.checkpoint._src.serialization.tensorstore_utils import build_array_read_spec  # noqa: F401
    except ImportError:
        if not hasattr(handlers, "get_json_tspec_read"):
            missing.append("build_array_read_spec / get_json_tspec_read")
    if missing:
        raise PrivateAPIMissing(f"orbax.checkpoint.type_handlers lacks {missing}")
