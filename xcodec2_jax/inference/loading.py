"""Checkpoints loaded for inference: laid out as the codec runs them and placed on a device, mapped
from the params cache when it holds them, with other work (compiling ahead) beside the load."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from ..checkpoint import load_checkpoint, load_prepared
from ..checkpoint.place import place_tree
from ..config import Xcodec2Config
from ..modeling.layout import per_layer
from ..utils.background import Background


def load_for_inference(
    path: str,
    config: Xcodec2Config,
    *,
    device: jax.Device,
    params_cache: str | None,
    modules: Sequence[str] | None = None,
    beside: Callable[[], Any] | None = None,
) -> dict:
    """The params of the checkpoint at ``path`` on ``device``, the decoder's layers per layer
    (``layout.per_layer``), of ``modules`` only if given.

    Loaded to the host first (memory-mapped from ``params_cache`` when it holds them: milliseconds),
    then placed: a CPU device adopts the aligned host arrays without a copy. Otherwise loaded (and
    kept in ``params_cache``) while ``beside()`` runs on a thread; its failure is a warning.
    """
    ready = (
        None
        if params_cache is None
        else load_prepared(path, config, params_cache=params_cache, modules=modules)
    )
    if ready is not None:
        return place_tree(per_layer(ready[1]), device)
    worker = None if beside is None else Background(beside, fallback="encode compiles when first called")
    try:
        params = load_checkpoint(path, config, params_cache=params_cache, modules=modules)[1]
    finally:
        if worker is not None:
            worker.join()
    return place_tree(per_layer(params), device)
