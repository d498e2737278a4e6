"""The parameter tree's layout: which layers are stored stacked, and which parameters stay float32.

The model scans its identical layers (16 conformer layers, 12 decoder layers) over parameters
stacked on a leading axis (``parent + ("layers", *rest)``); checkpoints keep one entry per layer
(``parent + ("layers_i", *rest)``). This module is the one place that converts between the two, for
the loaders, the Orbax writer and the tests, and the one place that says which parameters a cast
to a lower precision must leave in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Xcodec2Config
from ..utils.tree import flatten, unflatten
from .model import abstract_params

# The model's top-level modules, the first level of its parameter tree (tests check the two agree).
MODULES = (
    "semantic_encoder",
    "semantic_adapter",
    "acoustic_encoder",
    "fc_encoder",
    "quantizer",
    "acoustic_decoder",
)
# The modules before the quantizer: what a loss reaches through FSQ only with straight-through latents.
PRE_QUANTIZER_MODULES = MODULES[:4]
# Those whose parameters ``encode`` reads: all but the decoder (70% of the full model's bytes).
ENCODE_MODULES = MODULES[:-1]


def scanned_layers(config: Xcodec2Config) -> dict[tuple[str, ...], int]:
    """Parent module path -> number of identical layers stored stacked under ``parent + ("layers",)``.

    Checkpoints keep one entry per layer (``...layers.3.x``, path ``parent + ("layers_3", "x")``);
    the model's parameter tree holds them stacked on a leading axis (``parent + ("layers", "x")`` of
    shape ``(num_layers, *shape)``) so the layer is traced once and scanned. The loaders convert
    with :func:`stack_layers` / :func:`unstack_layers`.
    """
    return {
        ("semantic_encoder", "encoder"): config.semantic_model_config.num_hidden_layers,
        ("acoustic_decoder",): config.num_hidden_layers,
    }


def layer_slot(path: tuple[str, ...], stacks: Mapping[tuple[str, ...], int]):
    """(stacked path, layer index) of a checkpoint-layout path under a scanned parent, else None."""
    for parent, count in stacks.items():
        n = len(parent)
        if len(path) > n + 1 and path[:n] == parent and path[n].startswith("layers_"):
            index = path[n][len("layers_") :]
            if index.isdigit() and int(index) < count:
                return parent + ("layers",) + path[n + 1 :], int(index)
    return None


def stack_layers(flat: Mapping[tuple[str, ...], Any], config: Xcodec2Config) -> dict:
    """Flat ``{path: array}`` in checkpoint layout (``layers_i``) -> nested model parameter tree.

    Every layer of a stack must be present (the strict loaders check that first). numpy arrays stack
    on the host, jax arrays where they are.
    """
    stacks = scanned_layers(config)
    out: dict[tuple[str, ...], Any] = {}
    groups: dict[tuple[str, ...], dict[int, Any]] = {}
    for path, value in flat.items():
        slot = layer_slot(path, stacks)
        if slot is None:
            out[path] = value
        else:
            groups.setdefault(slot[0], {})[slot[1]] = value
    for path, layers in groups.items():
        values = [layers[i] for i in range(len(layers))]
        out[path] = (np if all(isinstance(v, np.ndarray) for v in values) else jnp).stack(values)
    return unflatten(out)


def unstack_layers(params: Mapping[str, Any], config: Xcodec2Config) -> dict:
    """Nested model parameter tree -> flat ``{path: array}`` in checkpoint layout (``layers_i``).

    ``jax.ShapeDtypeStruct`` leaves give per-layer ``ShapeDtypeStruct``s."""
    out = {}
    for path, value in flatten(params).items():
        parent = next((p for p in scanned_layers(config) if path[: len(p) + 1] == p + ("layers",)), None)
        if parent is None:
            out[path] = value
            continue
        rest = path[len(parent) + 1 :]
        for i in range(value.shape[0]):
            if isinstance(value, jax.ShapeDtypeStruct):
                layer = jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
            else:
                layer = value[i]
            out[parent + (f"layers_{i}",) + rest] = layer
    return out


def keeps_float32(path: tuple[str, ...]) -> bool:
    """True for a parameter of a float32 island, which a lower-precision cast of the params skips.

    FSQ (``quantizer``: its rounding boundaries and codebook rows must be exact), every norm's
    affine parameters (the norms compute in float32), SnakeBeta's ``alpha``/``beta`` (evaluated in
    float32) and the ISTFT head (exp() of its output amplifies any error).
    """
    if path[0] == "quantizer" or path[-1] in ("alpha", "beta") or path[:2] == ("acoustic_decoder", "head"):
        return True
    return any("norm" in part for part in path[:-1])


def checkpoint_shapes(config: Xcodec2Config) -> dict:
    """Flat ``{path: ShapeDtypeStruct}`` of every parameter in checkpoint layout (one entry per layer)."""
    return unstack_layers(abstract_params(config), config)


def parameter_groups(paths, stacks: Mapping[tuple[str, ...], int]) -> dict[tuple[str, ...], list]:
    """Checkpoint-layout paths -> ``{model path: [(layer index or None, checkpoint path), ...]}``.

    A path under a stacked parent (:func:`layer_slot`) becomes slice ``i`` of its stacked parameter;
    every other path is its own parameter. The loaders fill each model parameter from its group.
    """
    out: dict[tuple[str, ...], list] = {}
    for path in paths:
        slot = layer_slot(path, stacks)
        if slot is None:
            out[path] = [(None, path)]
        else:
            out.setdefault(slot[0], []).append((slot[1], path))
    return out


# Parents whose layers inference runs on per-layer arrays (see ``nn.layers.run_layers``): the
# decoder's. The conformer stays stacked: its scan's copies cost little beside its attention.
PER_LAYER_FOR_INFERENCE = (("acoustic_decoder",),)


def per_layer(params: Mapping[str, Any], parents=PER_LAYER_FOR_INFERENCE) -> dict:
    """``params`` with the stacked layers under ``parents`` given one entry per layer (``layers_i``,
    the checkpoints' layout), which the model runs without copying each layer's weights out of the
    stack on every call. Host arrays become views (nothing copied); device arrays are sliced once.
    Do it once, outside ``jit``; parents already per layer (or absent) are left as they are."""
    flat = flatten(params)
    out = {}
    for path, value in flat.items():
        parent = next((p for p in parents if path[: len(p) + 1] == p + ("layers",)), None)
        if parent is None:
            out[path] = value
            continue
        rest = path[len(parent) + 1 :]
        for i in range(value.shape[0]):
            out[parent + (f"layers_{i}",) + rest] = value[i]
    return unflatten(out)
