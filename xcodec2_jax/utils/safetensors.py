"""Safetensors checkpoints read without a framework: each file's JSON header (names, dtypes, shapes,
byte ranges) and the files of a single, sharded or directory checkpoint. No tensor data is read."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _dtype(name: str, file: str, key: str) -> np.dtype:
    if name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in _DTYPES:
        raise ValueError(f"{file}: tensor {key!r} has dtype {name}, which this loader does not read")
    return np.dtype(_DTYPES[name])


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file, dtype, shape and absolute byte range."""

    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(file: str) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its JSON header alone (no tensor data is read)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{file} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file} is not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file} is not a safetensors file (header is not an object)")
    base = 8 + n
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _dtype(entry["dtype"], file, key)
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ValueError) and "dtype" in str(e):
                raise
            raise ValueError(f"{file}: malformed header entry for {key!r}: {entry!r}") from None
        if end - start != math.prod(shape) * dtype.itemsize or start < 0 or base + end > size:
            raise ValueError(
                f"{file}: tensor {key!r} has a byte range that does not fit its shape or the file"
            )
        out[key] = TensorInfo(file, dtype, shape, base + start, base + end)
    return out


def resolve_files(path: str) -> list[str]:
    """The safetensors file(s) of a checkpoint: a file, a sharded index, or a directory holding either."""
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


def checkpoint_index(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint (file, directory or sharded index), from the headers alone."""
    index: dict[str, TensorInfo] = {}
    for file in resolve_files(os.fspath(path)):
        for key, info in read_header(file).items():
            if key in index:
                raise ValueError(f"key {key!r} appears in more than one shard ({index[key].file}, {file})")
            index[key] = info
    return index
