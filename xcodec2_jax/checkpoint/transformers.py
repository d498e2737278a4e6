"""transformers' key names and layouts -> the Flax parameter paths (strict, numpy only).

The Flax modules are named after the transformers attributes, so a transformers key maps to a
parameter path almost by identity: ``acoustic_decoder.layers.3.self_attn.q_proj.weight`` becomes
``('acoustic_decoder', 'layers_3', 'self_attn', 'q_proj', 'kernel')``. Only the layouts change:
linear weights (out, in) become kernels (in, out), conv weights (out, in/groups, k) become
(k, in/groups, out), and norm weights become ``scale``.

Matching is strict: every checkpoint key must land on a parameter of the expected shape and every
parameter must be filled, otherwise one :class:`CheckpointMismatchError` lists all the problems.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..utils.tree import flatten, unflatten
from .io import Tensor

# Checkpoint entries the inference model has no use for. They are recognised and dropped so that
# strictness still catches every genuinely unknown key.
UNUSED_KEYS = ("semantic_encoder.masked_spec_embed",)

_WEIGHT_LEAVES = ("kernel", "scale", "embedding", "weight")


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


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """``a.layers.3.b.weight`` -> ``('a', 'layers_3', 'b', 'weight')`` (leaf name not yet mapped)."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def path_to_torch_key(path: tuple[str, ...]) -> str:
    """Inverse of :func:`torch_key_to_path`, with Flax leaf names turned back into ``weight``."""
    parts = []
    for p in path[:-1]:
        head, _, tail = p.rpartition("_")
        parts += [head, tail] if head and tail.isdigit() else [p]
    leaf = path[-1]
    parts.append("weight" if leaf in _WEIGHT_LEAVES else leaf)
    return ".".join(parts)


def layout_perm(leaf: str, ndim: int) -> tuple[int, ...] | None:
    """Axis permutation from the torch layout to the Flax one (None: same layout)."""
    if leaf == "kernel":
        if ndim == 2:  # Linear (out, in) -> Dense (in, out)
            return (1, 0)
        if ndim == 3:  # Conv1d (out, in/groups, k) -> Conv (k, in/groups, out)
            return (2, 1, 0)
    return None


def map_state(
    state: Mapping[str, Any],
    expected: Mapping[tuple[str, ...], Any],
    *,
    ignore: tuple[str, ...] = UNUSED_KEYS,
    source: str = "checkpoint",
) -> dict[tuple[str, ...], tuple[Any, tuple[int, ...] | None]]:
    """Place each transformers key of ``state`` on a path of ``expected``, by shapes alone.

    ``state`` maps keys to anything with a ``.shape`` in the torch layout (arrays, :class:`Tensor`);
    ``expected`` maps flat checkpoint-layout paths to ``ShapeDtypeStruct``-likes. Returns
    ``{path: (value, perm)}``, ``perm`` being the transpose to the Flax layout; raises
    :class:`CheckpointMismatchError` listing every unexpected key, unfilled parameter and wrong shape.
    """
    leaves_of: dict[tuple[str, ...], set[str]] = {}
    for path in expected:
        leaves_of.setdefault(path[:-1], set()).add(path[-1])

    out: dict[tuple[str, ...], tuple[Any, tuple[int, ...] | None]] = {}
    seen: set[tuple[str, ...]] = set()  # paths with a checkpoint tensor of the wrong shape
    unexpected, mismatched = [], []
    for key, value in state.items():
        if key in ignore:
            continue
        shape = tuple(np.shape(value)) if not hasattr(value, "shape") else tuple(value.shape)
        path = torch_key_to_path(key)
        parent, leaf = path[:-1], path[-1]
        if leaf == "weight":
            names = leaves_of.get(parent, set())
            leaf = next((n for n in _WEIGHT_LEAVES if n in names), "weight")
        full = parent + (leaf,)
        if full not in expected:
            unexpected.append((key, shape))
            continue
        perm = layout_perm(leaf, len(shape))
        flax_shape = shape if perm is None else tuple(shape[i] for i in perm)
        want = tuple(expected[full].shape)
        if flax_shape != want:
            torch_shape = want[::-1] if leaf == "kernel" and len(want) in (2, 3) else want
            mismatched.append((key, want, torch_shape, shape))
            seen.add(full)
            continue
        out[full] = (value, perm)

    missing = [(path_to_torch_key(p), expected[p].shape) for p in expected if p not in out and p not in seen]
    if unexpected or missing or mismatched:
        raise CheckpointMismatchError(unexpected, missing, mismatched, source=source)
    return out


def convert_state_dict(
    state: Mapping[str, Any],
    target: Mapping[Any, Any],
    *,
    ignore: tuple[str, ...] = UNUSED_KEYS,
    source: str = "checkpoint",
    dtype: Any = None,
) -> dict[str, Any]:
    """Map a transformers-layout state dict onto the parameter tree ``target``, in host memory.

    ``target`` is a nested tree of arrays or ``ShapeDtypeStruct`` giving every expected path and
    shape, e.g. ``jax.eval_shape`` of a module's ``init``, or a flat ``{path: leaf}`` dict such as
    ``model.checkpoint_shapes(config)``. Returns numpy arrays (Flax layout, cast to ``dtype`` if
    floating) shaped like ``target``: nested, or flat (which ``model.stack_layers`` turns into the
    model's tree). Strict, as :func:`map_state`. The loaders place tensors one by one instead; this
    is for sub-modules and tests.
    """
    is_flat = any(isinstance(k, tuple) for k in target)
    expected = target if is_flat else flatten(target)
    placed = map_state(state, expected, ignore=ignore, source=source)
    out = {}
    for path, (value, perm) in placed.items():
        array = value.load() if isinstance(value, Tensor) else np.asarray(value)
        array = array if perm is None else np.transpose(array, perm)
        if dtype is not None and np.issubdtype(array.dtype, np.floating):
            array = array.astype(dtype)
        out[path] = np.array(array, order="C", copy=True)
    return out if is_flat else unflatten(out)
