"""Load PyTorch safetensors checkpoints of X-Codec2 into Flax parameter trees (numpy only, no torch).

The Flax modules are named after the transformers attributes, so a transformers key maps to a
parameter path almost by identity: ``acoustic_decoder.layers.3.self_attn.q_proj.weight`` becomes
``('acoustic_decoder', 'layers_3', 'self_attn', 'q_proj', 'kernel')``. Only the layouts change:
linear weights (out, in) become kernels (in, out), conv weights (out, in/groups, k) become
(k, in/groups, out), and norm weights become ``scale``.

Loading is strict: every checkpoint key must land on a parameter of the expected shape and every
parameter must be filled, otherwise one :class:`CheckpointMismatchError` lists all the problems.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Checkpoint entries the inference model has no use for. They are recognised and dropped so that
# strictness still catches every genuinely unknown key.
_UNUSED_KEYS = ("semantic_encoder.masked_spec_embed",)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the model: unknown keys, missing parameters or wrong shapes."""

    def __init__(self, unexpected=(), missing=(), mismatched=(), source: str = "checkpoint"):
        self.unexpected = list(unexpected)
        self.missing = list(missing)
        self.mismatched = list(mismatched)
        lines = [f"{source} does not match the model:"]
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected key(s) (no parameter to receive them):")
            lines += [f"    {k} {tuple(shape)}" for k, shape in self.unexpected]
        if self.missing:
            lines.append(f"  {len(self.missing)} parameter(s) not filled by the checkpoint:")
            lines += [f"    {k} expected {tuple(shape)}" for k, shape in self.missing]
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} shape mismatch(es):")
            lines += [
                f"    {k}: expected {tuple(exp)} (torch layout {tuple(texp)}), found {tuple(found)}"
                for k, exp, texp, found in self.mismatched
            ]
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------------
# Reading safetensors with numpy


def _resolve_files(path: str) -> list[str]:
    if os.path.isfile(path):
        if path.endswith(".json"):
            return _files_from_index(path)
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    single = os.path.join(path, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        return _files_from_index(index)
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(found) == 1:
        return [os.path.join(path, found[0])]
    raise FileNotFoundError(
        f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {path!r}"
        + (f" (found several .safetensors files: {found})" if found else "")
    )


def _files_from_index(index_path: str) -> list[str]:
    with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    root = os.path.dirname(index_path)
    files = []
    for name in weight_map.values():
        full = os.path.join(root, name)
        if full not in files:
            files.append(full)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"shard(s) listed in {index_path} are missing: {missing}")
    return files


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors checkpoint (file, directory, or sharded index) as numpy."""
    from safetensors.numpy import load_file

    state: dict[str, np.ndarray] = {}
    for file in _resolve_files(os.fspath(path)):
        try:
            tensors = load_file(file)
        except TypeError:
            # bf16 tensors have no numpy dtype in older safetensors; go through ml_dtypes via flax.
            tensors = _load_file_bf16(file)
        for key, value in tensors.items():
            if key in state:
                raise ValueError(f"key {key!r} appears in more than one shard ({file})")
            state[key] = value
    return state


def _load_file_bf16(file: str) -> dict[str, np.ndarray]:
    import ml_dtypes
    from safetensors import safe_open

    out = {}
    with safe_open(file, framework="flax") as f:
        for key in f.keys():
            out[key] = np.asarray(f.get_tensor(key)).astype(ml_dtypes.bfloat16)
    return out


# --------------------------------------------------------------------------------------------------
# Key and layout mapping


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """``a.layers.3.b.weight`` -> ``('a', 'layers_3', 'b', 'weight')`` (leaf name not yet mapped)."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """Torch layout -> Flax layout for a parameter whose Flax leaf name is ``leaf``."""
    if leaf == "kernel":
        if value.ndim == 2:  # Linear (out, in) -> Dense (in, out)
            return value.T
        if value.ndim == 3:  # Conv1d (out, in/groups, k) -> Conv (k, in/groups, out)
            return value.transpose(2, 1, 0)
    return value


_WEIGHT_LEAVES = ("kernel", "scale", "embedding", "weight")


def convert_state_dict(
    state: Mapping[str, np.ndarray],
    target: Mapping[str, Any],
    *,
    ignore: tuple[str, ...] = _UNUSED_KEYS,
    source: str = "checkpoint",
    dtype: Any = None,
) -> dict[str, Any]:
    """Map a transformers-layout state dict onto the parameter tree ``target``.

    ``target`` is a tree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape`` of the
    module's ``init``) giving every expected path and shape. Returns a tree of numpy arrays with the
    same structure. Raises :class:`CheckpointMismatchError` listing every unexpected key, unfilled
    parameter and shape mismatch at once.
    """
    expected = _flatten(target)
    # Parent module path -> names of its leaves, to choose what "weight" maps to.
    leaves_of: dict[tuple[str, ...], set[str]] = {}
    for path in expected:
        leaves_of.setdefault(path[:-1], set()).add(path[-1])

    out: dict[tuple[str, ...], np.ndarray] = {}
    seen: set[tuple[str, ...]] = set()  # paths with a checkpoint tensor of the wrong shape
    unexpected, mismatched = [], []
    for key, value in state.items():
        if key in ignore:
            continue
        value = np.asarray(value)
        path = torch_key_to_path(key)
        parent, leaf = path[:-1], path[-1]
        names = leaves_of.get(parent, set())
        if leaf == "weight":
            leaf = next((n for n in _WEIGHT_LEAVES if n in names), "weight")
        full = parent + (leaf,)
        if full not in expected:
            unexpected.append((key, value.shape))
            continue
        converted = to_flax_layout(leaf, value)
        want = tuple(expected[full].shape)
        if converted.shape != want:
            torch_shape = want[::-1] if leaf == "kernel" and len(want) in (2, 3) else want
            mismatched.append((key, want, torch_shape, value.shape))
            seen.add(full)
            continue
        if dtype is not None and np.issubdtype(converted.dtype, np.floating):
            converted = converted.astype(dtype)
        out[full] = np.ascontiguousarray(converted)

    missing = [(path_to_torch_key(p), expected[p].shape) for p in expected if p not in out and p not in seen]
    if unexpected or missing or mismatched:
        raise CheckpointMismatchError(unexpected, missing, mismatched, source=source)
    return _unflatten(out)


def path_to_torch_key(path: tuple[str, ...]) -> str:
    """Inverse of :func:`torch_key_to_path`, with Flax leaf names turned back into ``weight``."""
    parts = []
    for p in path[:-1]:
        head, _, tail = p.rpartition("_")
        parts += [head, tail] if head and tail.isdigit() else [p]
    leaf = path[-1]
    parts.append("weight" if leaf in _WEIGHT_LEAVES else leaf)
    return ".".join(parts)


def _config_for(path: str, original_state: Mapping[str, np.ndarray] | None = None):
    from .config import Xcodec2Config
    from .original import config_from_original, is_original_config

    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config_file = os.path.join(directory, "config.json")
    data = None
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            data = json.load(f)
    if original_state is not None or (data is not None and is_original_config(data)):
        # The original release's config.json carries almost no shapes; its weights give the rest.
        return Xcodec2Config.from_dict(config_from_original(data, original_state))
    if data is None:
        raise FileNotFoundError(
            f"no config.json beside {path!r}: pass config=Xcodec2Config(...) to load_params"
        )
    return Xcodec2Config.from_dict(data)


ORBAX_PARAMS_DIR = "params"


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """A directory written by :func:`save_orbax`: ``config.json`` plus an Orbax ``params/`` tree."""
    return os.path.isfile(os.path.join(os.fspath(path), ORBAX_PARAMS_DIR, "_CHECKPOINT_METADATA"))


def save_orbax(
    directory: str | os.PathLike, params: Mapping[str, Any], config, *, overwrite: bool = False
) -> None:
    """Write ``params`` as an Orbax checkpoint under ``directory/params`` with ``directory/config.json``.

    Loading it back (:func:`load_params`, ``Xcodec2Codec.from_pretrained``) skips the safetensors
    conversion and can restore every array straight into a given sharding.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    target = os.path.join(directory, ORBAX_PARAMS_DIR)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists (pass overwrite=True to replace it)")
    config.save_pretrained(directory)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, params, force=overwrite)
    checkpointer.wait_until_finished()


def _restore_orbax(path: str, config, sharding: Any) -> dict[str, Any]:
    import jax
    import orbax.checkpoint as ocp

    from .model import abstract_params

    target = os.path.join(os.path.abspath(path), ORBAX_PARAMS_DIR)
    expected = abstract_params(config)
    checkpointer = ocp.StandardCheckpointer()
    stored = checkpointer.metadata(target)
    stored = getattr(stored, "item_metadata", stored)
    stored_flat = _flatten(dict(stored))
    expected_flat = _flatten(expected)
    unexpected = [(path_to_torch_key(p), v.shape) for p, v in stored_flat.items() if p not in expected_flat]
    missing = [(path_to_torch_key(p), v.shape) for p, v in expected_flat.items() if p not in stored_flat]
    mismatched = [
        (path_to_torch_key(p), v.shape, v.shape, stored_flat[p].shape)
        for p, v in expected_flat.items()
        if p in stored_flat and tuple(stored_flat[p].shape) != tuple(v.shape)
    ]
    if unexpected or missing or mismatched:
        raise CheckpointMismatchError(unexpected, missing, mismatched, source=f"Orbax checkpoint {path!r}")
    if sharding is None:
        return checkpointer.restore(target)
    shardings = sharding if isinstance(sharding, Mapping) else jax.tree.map(lambda _: sharding, expected)
    abstract = jax.tree.map(
        lambda leaf, shard: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=shard), expected, shardings
    )
    return checkpointer.restore(target, abstract)


def load_checkpoint(path: str | os.PathLike, config=None, *, dtype: Any = None, sharding: Any = None):
    """``(config, params)`` of a checkpoint; see :func:`load_params` for the arguments."""
    import jax
    import jax.numpy as jnp

    from .model import abstract_params
    from .original import is_original_format, original_to_transformers

    path = os.fspath(path)
    if os.path.isdir(path) and is_orbax_checkpoint(path):
        if config is None:
            config = _config_for(path)
        params = _restore_orbax(path, config, sharding)
        if dtype is not None:
            params = jax.tree.map(
                lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
            )
        return config, params
    state = read_state_dict(path)
    original = is_original_format(state)
    if config is None:
        config = _config_for(path, state if original else None)
    if original:
        state = original_to_transformers(state)
    params = convert_state_dict(state, abstract_params(config), source=f"checkpoint {path!r}", dtype=dtype)
    if sharding is not None:
        params = jax.device_put(params, sharding)
    return config, params


def load_params(
    path: str | os.PathLike, config=None, *, dtype: Any = None, sharding: Any = None
) -> dict[str, Any]:
    """Load an X-Codec2 checkpoint into the Flax parameter tree of :class:`Xcodec2Model`.

    ``path`` is a checkpoint directory (``config.json`` with ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``, or an Orbax checkpoint written by :func:`save_orbax` or
    ``python -m convert``), a ``.safetensors`` file, or an index file, in either key format:
    transformers' (``HKUSTAudio/xcodec2-hf``) or the original release's (``HKUSTAudio/xcodec2``,
    detected from its key names; weight norm folded, fused qkv split, w2v-BERT layers past 16
    dropped). ``config`` defaults to the ``config.json`` found there (for the original format, to
    shapes read off the weights). Returns a nested dict of numpy arrays in host memory, cast to
    ``dtype`` if given; with ``sharding`` (one ``jax.sharding.Sharding`` for every leaf, or a tree of
    them shaped like the params), jax arrays placed accordingly, an Orbax checkpoint being read
    straight into its shards. Host arrays are copied to the device on every jitted call they are
    passed to: for repeated calls, ``jax.device_put`` them once (or pass ``sharding``).

    Strict: raises :class:`CheckpointMismatchError` (or, for original checkpoints with keys it
    cannot map, ``OriginalCheckpointError``) listing every offending key at once.
    """
    return load_checkpoint(path, config, dtype=dtype, sharding=sharding)[1]
