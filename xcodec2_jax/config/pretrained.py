"""A checkpoint's config as a transformers-style dict, whatever the checkpoint's format.

transformers and Orbax checkpoints carry a ``config.json``; the original release's carries a
``BigCodecConfig`` (or none), so its sizes are read off the tensors' shapes in the safetensors header.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..utils.safetensors import TensorInfo, checkpoint_index
from .original import config_from_original, is_original_format

CONFIG_NAME = "config.json"


def read_json(file: str) -> dict[str, Any]:
    """A JSON object from ``file``; a ``ValueError`` naming the file if it is not one."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a JSON object (got {type(data).__name__})")
    return data


def is_original_config(data: dict[str, Any]) -> bool:
    """True for the original release's ``config.json`` (a ``BigCodecConfig``, model_type ``xcodec``)."""
    if any(k in data for k in ("semantic_model_config", "acoustic_model_config", "quantization_dim")):
        return False  # transformers' Xcodec2Config, or X-Codec (v1), whose model_type is also "xcodec"
    keys = ("semantic_hidden_size", "codec_encoder_hidden_size", "codec_decoder_hidden_size", "use_vocos")
    return data.get("model_type") == "xcodec" or any(k in data for k in keys)


def config_json(path: str) -> tuple[str, dict | None]:
    """(path of the checkpoint's ``config.json``, its contents or None if there is none)."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    file = os.path.join(directory, CONFIG_NAME)
    return file, read_json(file) if os.path.isfile(file) else None


def config_dict(path: str | os.PathLike, index: dict[str, TensorInfo] | None = None) -> dict[str, Any]:
    """The transformers-style config dict of the checkpoint at ``path`` (directory, weights file or a
    ``config.json`` file). ``index``: its safetensors header, if already read.

    A transformers-style ``config.json`` is taken as given (beside original weights too). Otherwise
    the weights must be the original release's: their shapes give the sizes, cross-checked with its
    ``BigCodecConfig`` if there is one. A directory holding only a ``config.json`` gives that config.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".json") and not path.endswith(".index.json"):
        return read_json(path)
    file, data = config_json(path)
    if data is not None and not is_original_config(data):
        return data
    try:
        index = checkpoint_index(path) if index is None else index
    except FileNotFoundError as e:
        if data is None:
            raise FileNotFoundError(f"no {CONFIG_NAME} and no checkpoint at {path!r} ({e})") from None
        raise
    if is_original_format(index):
        return config_from_original(data, index)
    if data is None:
        raise FileNotFoundError(f"no {CONFIG_NAME} beside {path!r} ({file}): pass config=Xcodec2Config(...)")
    return data  # a BigCodecConfig beside non-original weights: from_dict says what is wrong
