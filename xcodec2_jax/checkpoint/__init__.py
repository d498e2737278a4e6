"""X-Codec2 checkpoints -> Flax params (numpy and safetensors' file format; no torch).

Three formats, told apart in one place (:func:`detect_format`):

- ``"transformers"``: ``config.json`` + ``model.safetensors`` (or a sharded index) as transformers'
  ``Xcodec2Model.save_pretrained`` writes them (``HKUSTAudio/xcodec2-hf``);
- ``"original"``: the original release's ``model.safetensors`` (``HKUSTAudio/xcodec2``, detected by
  its key names), with its ``BigCodecConfig`` ``config.json`` or none; the config comes from the
  tensors' shapes in the safetensors header;
- ``"orbax"``: a directory written by :func:`save_orbax` / ``python -m convert``.

``Xcodec2Config.from_pretrained(path)`` and :func:`load_checkpoint` give the same config for all three.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..config import Xcodec2Config, config_dict, is_original_format
from ..modeling.layout import MODULES, checkpoint_shapes, scanned_layers
from ..utils.safetensors import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, checkpoint_index, resolve_files
from .io import Tensor, TensorReader, populated_buffer, read_state_dict
from .orbax import (
    ORBAX_PARAMS_DIR,
    is_orbax_checkpoint,
    open_arrays,
    reads_whole_arrays,
    restore_sharded,
    save_orbax,
    stacks_for,
    stored_metadata,
)
from .original import OriginalCheckpointError, fold_weight_norm, original_to_transformers, to_transformers
from .place import assemble, host_bytes, place_tree, stays_on_host
from .prepared import checkpoint_files, entry_key, lookup, prepare
from .transformers import (
    UNUSED_KEYS,
    CheckpointMismatchError,
    convert_state_dict,
    map_state,
    path_to_torch_key,
    torch_key_to_path,
)

__all__ = [
    "ORBAX_PARAMS_DIR",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "CheckpointMismatchError",
    "OriginalCheckpointError",
    "Tensor",
    "checkpoint_index",
    "config_for",
    "convert_state_dict",
    "detect_format",
    "fold_weight_norm",
    "is_orbax_checkpoint",
    "load_checkpoint",
    "load_params",
    "load_prepared",
    "original_to_transformers",
    "path_to_torch_key",
    "read_state_dict",
    "resolve_files",
    "save_orbax",
    "torch_key_to_path",
]


def _inspect(path: str):
    """(format, safetensors index or None)."""
    if os.path.isdir(path) and is_orbax_checkpoint(path):
        return "orbax", None
    index = checkpoint_index(path)
    return ("original" if is_original_format(index) else "transformers"), index


def detect_format(path: str | os.PathLike) -> str:
    """``"transformers"``, ``"original"`` or ``"orbax"``; reads at most the safetensors headers."""
    return _inspect(os.fspath(path))[0]


def config_for(path: str | os.PathLike, inspected=None) -> Xcodec2Config:
    """The ``Xcodec2Config`` of the checkpoint at ``path``, whatever its format (see
    :func:`xcodec2_jax.config.config_dict`); the same as ``Xcodec2Config.from_pretrained(path)``."""
    index = None if inspected is None else inspected[1]
    return Xcodec2Config.from_dict(config_dict(path, index))


def load_checkpoint(
    path: str | os.PathLike,
    config=None,
    *,
    dtype: Any = None,
    sharding: Any = None,
    device: Any = None,
    params_cache: str | os.PathLike | None = None,
    modules: Sequence[str] | None = None,
):
    """``(config, params)`` of a checkpoint; see :func:`load_params` for the arguments.

    ``params_cache``: a folder of prepared checkpoints (see :mod:`.prepared`): the checkpoint is read
    from there, memory-mapped, when it holds this one, else loaded and then kept there.
    """
    path, inspected, config, placement, modules = _arguments(path, config, sharding, device, modules)
    if params_cache is None:
        return config, _load(path, inspected, config, dtype, placement, modules=modules)
    directory = os.fspath(params_cache)
    key, sources, params = _prepared(path, inspected, config, dtype, directory, modules)
    if params is None:

        def build(file):
            return _load(path, inspected, config, dtype, None, file, modules)

        params = prepare(directory, key, sources, build)
    if params is None:  # could not be kept: loaded as without the cache
        return config, _load(path, inspected, config, dtype, placement, modules=modules)
    return config, params if placement is None else place_tree(params, placement)


def _arguments(path, config, sharding, device, modules):
    """(path, (format, index), config, placement, modules) from a loader's arguments, checked."""
    if sharding is not None and device is not None:
        raise ValueError("pass either sharding or device, not both")
    if modules is not None:
        if isinstance(modules, str) or not modules:
            raise ValueError(f"modules must be a non-empty list of module names, got {modules!r}")
        unknown = sorted(set(modules) - set(MODULES))
        if unknown:
            raise ValueError(f"unknown module(s) {unknown}: the model's are {list(MODULES)}")
        modules = None if set(modules) == set(MODULES) else tuple(m for m in MODULES if m in modules)
    path = os.fspath(path)
    inspected = _inspect(path)
    placement = sharding if sharding is not None else device
    config = config_for(path, inspected) if config is None else config
    return path, inspected, config, placement, modules


def _prepared(path: str, inspected, config, dtype, directory: str, modules):
    """(entry key, sources, the mapped params or None) of the checkpoint in the params cache."""
    key, sources = entry_key(checkpoint_files(path, inspected[0]), config, dtype, modules)
    return key, sources, lookup(directory, key)


def load_prepared(
    path: str | os.PathLike,
    config=None,
    *,
    dtype: Any = None,
    sharding: Any = None,
    device: Any = None,
    params_cache: str | os.PathLike,
    modules: Sequence[str] | None = None,
):
    """``load_checkpoint(..., params_cache=...)`` when the folder holds the checkpoint already
    (milliseconds: the prepared file is mapped), else None, without loading or preparing anything."""
    path, inspected, config, placement, modules = _arguments(path, config, sharding, device, modules)
    params = _prepared(path, inspected, config, dtype, os.fspath(params_cache), modules)[2]
    if params is None:
        return None
    return config, params if placement is None else place_tree(params, placement)


def _load(path: str, inspected, config, dtype, placement, file: str | None = None, modules=None):
    """The params (of ``modules`` only, if given); with ``file``, written into that file, mapped. The
    strict check covers the whole checkpoint either way."""
    fmt, index = inspected
    if fmt == "orbax":
        stored = stored_metadata(path)
        if not reads_whole_arrays(placement):
            return restore_sharded(path, config, stored, dtype=dtype, placement=placement, modules=modules)
        wanted = {p: v for p, v in stored.arrays.items() if modules is None or p[0] in modules}
        # Opened by tensorstore's threads while the model is traced below.
        tensors = needed = open_arrays(path, stored._replace(arrays=wanted))
    else:
        tensors = TensorReader().tensors(index)
        if fmt == "original":
            tensors = to_transformers(tensors)
        tensors = {k: v for k, v in tensors.items() if k not in UNUSED_KEYS}
        needed = tensors if modules is None else _in_modules(tensors, modules)
        needed = {torch_key_to_path(k): v for k, v in needed.items()}
    # The host buffer is populated on another thread while the model is traced for its shapes.
    with ThreadPoolExecutor(1) as pool:
        on_host = stays_on_host(placement) and file is None
        buffer = pool.submit(populated_buffer, host_bytes(needed, dtype)) if on_host else None
        if fmt == "orbax":
            stacks = stacks_for(stored.arrays, config, path)
            placed = {p: (t, None) for p, t in tensors.items()}
        else:
            stacks = scanned_layers(config)
            placed = map_state(tensors, checkpoint_shapes(config), source=f"checkpoint {path!r}")
            if modules is not None:
                placed = {p: v for p, v in placed.items() if p[0] in modules}
        buffer = None if buffer is None else buffer.result()
    return assemble(placed, stacks, dtype=dtype, placement=placement, buffer=buffer, file=file)


def _in_modules(tensors: dict, modules) -> dict:
    """The transformers-named tensors that belong to these top-level modules."""
    return {k: v for k, v in tensors.items() if torch_key_to_path(k)[0] in modules}


def load_params(
    path: str | os.PathLike,
    config=None,
    *,
    dtype: Any = None,
    sharding: Any = None,
    device: Any = None,
    params_cache: str | os.PathLike | None = None,
    modules: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Load an X-Codec2 checkpoint into the Flax parameter tree of :class:`Xcodec2Model`.

    ``path`` is a checkpoint directory (``config.json`` with ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``, or an Orbax checkpoint written by :func:`save_orbax` or
    ``python -m convert``), a ``.safetensors`` file, or an index file, in any format of
    :func:`detect_format` (original release: weight norm folded, fused qkv split, w2v-BERT layers past
    16 never read). ``config`` defaults to :func:`config_for`.

    Without ``device``/``sharding``: a nested dict of numpy arrays in host memory (cast to ``dtype``
    if given). With ``device`` (a ``jax.Device``) or ``sharding`` (one ``jax.sharding.Sharding`` for
    every leaf, or a tree of them shaped like the params): ``jax.Array`` s placed there, each tensor
    copied once from the memory-mapped file and its host copy released as soon as it is placed (an
    Orbax checkpoint is read straight into its shards). Host arrays are copied to the device on every
    jitted call they are passed to: for repeated calls, pass ``device`` (or ``jax.device_put`` once).

    Strict: raises :class:`CheckpointMismatchError` (or, for original checkpoints with keys it
    cannot map, :class:`OriginalCheckpointError`) listing every offending key at once.

    ``params_cache``: a folder where the checkpoint is kept prepared in this layout, and mapped from on
    later loads (see :mod:`xcodec2_jax.checkpoint.prepared`).

    ``modules``: top-level modules of the model (``model.MODULES``) whose parameters are loaded,
    the rest skipped (``model.ENCODE_MODULES``: what ``encode`` reads, 70% of the full model's
    bytes); the whole checkpoint is still checked strictly. None: all of them.
    """
    return load_checkpoint(
        path,
        config,
        dtype=dtype,
        sharding=sharding,
        device=device,
        params_cache=params_cache,
        modules=modules,
    )[1]
