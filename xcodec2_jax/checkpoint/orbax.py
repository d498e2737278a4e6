"""Orbax checkpoints of the Flax params (``directory/params``) beside a transformers-style ``config.json``.

They hold the model layout (``abstract_params``: scanned layers stacked). A checkpoint written in the
unstacked, one-entry-per-layer layout is accepted too and stacked on load.

Two ways in. To the host or one device (the codec, the CLI, ``load_params`` without a sharding over
several devices): each stored array is opened with tensorstore, through Orbax's own specs, and read by
the loaders' ``place.assemble`` straight into its parameter's aligned buffer, the files memory-mapped
(tensorstore's ``file_io_mode`` ``memmap``): no buffer in between, and on a CPU device XLA adopts the
result without a copy. Over several devices: Orbax's restore, which reads each device's part.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..modeling.layout import checkpoint_shapes, keeps_float32, scanned_layers, stack_layers
from ..modeling.model import abstract_params
from ..utils.compat import orbax_tspec
from ..utils.compat.libc import malloc_trim
from ..utils.tree import flatten, unflatten
from .io import Tensor
from .place import place_tree, shardings_for
from .transformers import CheckpointMismatchError, path_to_torch_key

ORBAX_PARAMS_DIR = "params"
# Bytes restored per Orbax call (see ``_restore_in_groups``); a larger array is restored alone.
RESTORE_GROUP_BYTES = 128 << 20
# Bytes read into a parameter per tensorstore read (see ``open_arrays``).
READ_SLICE_BYTES = 32 << 20


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """A directory written by :func:`save_orbax`: ``config.json`` plus an Orbax ``params/`` tree."""
    return os.path.isfile(os.path.join(os.fspath(path), ORBAX_PARAMS_DIR, "_CHECKPOINT_METADATA"))


def save_orbax(
    directory: str | os.PathLike, params: Mapping[str, Any], config, *, overwrite: bool = False
) -> None:
    """Write ``params`` as an Orbax checkpoint under ``directory/params`` with ``directory/config.json``.

    Loading it back (``load_params``, ``Xcodec2Codec.from_pretrained``) skips the safetensors
    conversion and can restore every array straight into a given sharding.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    target = os.path.join(directory, ORBAX_PARAMS_DIR)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists (pass overwrite=True to replace it)")
    config.save_pretrained(directory)
    # Uncompressed: Orbax's default zstd saves ~8% of the size of float32 weights and costs about as
    # much CPU time again at every restore (the full model's restore took 1.7x as long compressed).
    # The on-disk format is the one StandardCheckpointer reads.
    checkpointer = ocp.PyTreeCheckpointer(use_compression=False)
    checkpointer.save(target, params, force=overwrite)


def _same_layout(stored: Mapping, expected: Mapping) -> bool:
    return stored.keys() == expected.keys() and all(
        tuple(stored[p].shape) == tuple(v.shape) for p, v in expected.items()
    )


class Stored(NamedTuple):
    """What an Orbax checkpoint's metadata files say of its arrays."""

    arrays: dict[tuple[str, ...], Any]  # path -> Orbax ArrayMetadata (name, shape, dtype)
    use_zarr3: bool


def stored_metadata(path: str | os.PathLike) -> Stored:
    """The stored arrays of the Orbax checkpoint at ``path``; reads the metadata files only."""
    import orbax.checkpoint as ocp

    target = os.path.join(os.path.abspath(os.fspath(path)), ORBAX_PARAMS_DIR)
    tree = ocp.StandardCheckpointer().metadata(target)
    tree = getattr(tree, "item_metadata", tree)
    return Stored(flatten(dict(tree)), bool(getattr(tree, "use_zarr3", False)))


def stacks_for(stored: Mapping, config, path: str) -> dict[tuple[str, ...], int]:
    """The layer stacks to build from the stored arrays: none if they hold the model layout,
    ``model.scanned_layers`` if one entry per layer; raises :class:`CheckpointMismatchError`
    (every offending key at once) if neither."""
    expected = flatten(abstract_params(config))
    if _same_layout(stored, expected):
        return {}
    if _same_layout(stored, checkpoint_shapes(config)):
        return scanned_layers(config)
    unexpected = [(path_to_torch_key(p), v.shape) for p, v in stored.items() if p not in expected]
    missing = [(path_to_torch_key(p), v.shape) for p, v in expected.items() if p not in stored]
    mismatched = [
        (path_to_torch_key(p), v.shape, v.shape, stored[p].shape)
        for p, v in expected.items()
        if p in stored and tuple(stored[p].shape) != tuple(v.shape)
    ]
    raise CheckpointMismatchError(unexpected, missing, mismatched, source=f"Orbax checkpoint {path!r}")


def open_arrays(path: str | os.PathLike, stored: Stored) -> dict:
    """``{path: io.Tensor}`` for the stored arrays (:func:`stored_metadata`, or some of them): each
    opened with tensorstore (on its threads: this returns at once), read on demand, whole, straight
    into a given buffer.

    The specs are Orbax's (OCDBT or not, zarr2 or zarr3, compressed or not); the context is Orbax's
    plus ``file_io_mode: memmap``: the files are mapped, so a raw chunk is copied once, from the page
    cache into its destination; with reads into buffers of their own (the default ``pread``), a
    load took several times as long and up to 1.8x the checkpoint's bytes in peak RSS.
    """
    import tensorstore as ts
    from etils import epath

    target = epath.Path(os.path.abspath(os.fspath(path))) / ORBAX_PARAMS_DIR
    use_ocdbt = orbax_tspec.is_ocdbt(target)
    context = ts.Context(
        ts.Context.Spec({"file_io_mode": {"mode": "memmap"}}), orbax_tspec.context(use_ocdbt)
    )
    opening = {}
    for p, meta in stored.arrays.items():
        info = orbax_tspec.param_info(
            name=meta.name, parent_dir=target, use_zarr3=stored.use_zarr3, ts_context=context
        )
        spec = orbax_tspec.read_spec(info, use_ocdbt)
        opening[p] = ts.open(spec, open=True, read=True, context=context)

    def tensor(meta, opened) -> Tensor:
        def read_into(dst):
            # In slices along the first axis: the mapped pages a read touches count in the process's
            # RSS until it ends, and a stacked parameter is one chunk of up to 270 MB. A cast (to a
            # lower compute dtype) goes through a slice-sized array and numpy's rounding, as the
            # other formats' loads do.
            store = opened.result()
            pieces = [(dst, store)]
            if dst.ndim:
                n = dst.shape[0]
                step = max(1, READ_SLICE_BYTES * n // max(1, dst.nbytes))
                starts = range(0, n, step)
                pieces = [(dst[i : i + step], store[ts.d[0][i : min(i + step, n)]]) for i in starts]
            for part, source in pieces:
                if part.dtype == source.dtype.numpy_dtype:
                    ts.array(part, copy=False, write=True).write(source).result()
                else:
                    np.copyto(part, source.read().result(), casting="unsafe")

        return Tensor(meta.shape, meta.dtype, lambda: opened.result().read().result(), read_into=read_into)

    return {p: tensor(stored.arrays[p], f) for p, f in opening.items()}


def reads_whole_arrays(placement: Any) -> bool:
    """True if ``placement`` (None, a device, a sharding or a tree of them) puts each parameter whole
    on one device or on the host, where :func:`open_arrays` serves; False for several devices, where
    Orbax reads each device's part (:func:`restore_sharded`)."""
    if placement is None or isinstance(placement, jax.Device):
        return True
    if isinstance(placement, Mapping):
        return all(map(reads_whole_arrays, flatten(placement).values()))
    return isinstance(placement, jax.sharding.Sharding) and len(placement.device_set) == 1


def _groups(specs: Mapping[tuple[str, ...], Any], limit: int) -> list[list[tuple[str, ...]]]:
    """The paths of ``specs`` in groups of at most ``limit`` bytes (a larger array alone), biggest first."""

    def nbytes(p):
        return int(np.prod(specs[p].shape, dtype=np.int64)) * np.dtype(specs[p].dtype).itemsize

    groups, size = [], 0
    for p in sorted(specs, key=nbytes, reverse=True):
        if not groups or size + nbytes(p) > limit:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += nbytes(p)
    return groups


def _restore_in_groups(target: str, expected: Mapping, shardings: Mapping) -> dict[str, Any]:
    """Every array of the checkpoint at ``target`` (model layout), restored a group of at most
    ``RESTORE_GROUP_BYTES`` at a time: jax.Arrays placed by ``shardings``.

    In one call Orbax reads every array at once, and tensorstore holds each one's file bytes beside
    its destination until it is copied: peak RSS 1.5-1.6x the checkpoint for the full model. A group
    at a time (the biggest arrays first, and the freed heap handed back after each) bounds that to
    the last groups' bytes, which are small."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()

    def restore_group(group):
        item = {
            p: jax.ShapeDtypeStruct(expected[p].shape, expected[p].dtype, sharding=shardings[p])
            for p in group
        }
        args = {
            p: ocp.ArrayRestoreArgs(
                sharding=shardings[p], global_shape=expected[p].shape, dtype=expected[p].dtype
            )
            for p in group
        }
        request = ocp.args.PyTreeRestore(
            item=unflatten(item), restore_args=unflatten(args), partial_restore=True
        )
        out = checkpointer.restore(target, args=request)
        malloc_trim()
        return flatten(out)

    restored: dict[tuple[str, ...], Any] = {}
    for group in _groups(expected, RESTORE_GROUP_BYTES):
        restored.update(restore_group(group))
    return unflatten({p: restored[p] for p in expected})


def restore_sharded(
    path: str, config, stored: Stored, *, dtype: Any = None, placement: Any, modules=None
) -> dict[str, Any]:
    """The params of the Orbax checkpoint at ``path`` placed over several devices by Orbax's restore
    (``stored`` from :func:`stored_metadata`, checked against ``config``'s model); of the top-level
    ``modules`` only, if given."""
    import orbax.checkpoint as ocp

    target = os.path.join(os.path.abspath(path), ORBAX_PARAMS_DIR)
    if stacks_for(stored.arrays, config, path):
        flat = flatten(ocp.StandardCheckpointer().restore(target))
        params = stack_layers(flat, config)
        if modules is not None:
            params = {m: v for m, v in params.items() if m in modules}
        params = place_tree(params, placement)
    else:
        expected = flatten(abstract_params(config))
        wanted = expected if modules is None else {p: v for p, v in expected.items() if p[0] in modules}
        params = _restore_in_groups(target, wanted, shardings_for(placement, wanted))
    if dtype is not None:

        def cast(path, x):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                return x
            names = tuple(getattr(k, "key", k) for k in path)
            return x.astype(jnp.float32 if keeps_float32(names) else dtype)

        params = jax.tree_util.tree_map_with_path(cast, params)
    return params
