"""Flax params -> transformers' layout (``config.json`` + ``model.safetensors``), and a w2v-BERT
checkpoint -> the codec's semantic encoder.

The export is :mod:`.transformers`' mapping run backwards: kernels transposed back to torch's
(out, in[, k]) layout, stacked layers split into ``layers.i``, Flax leaf names back to ``weight``.
transformers' ``Xcodec2Model.from_pretrained`` loads the result with no missing or unexpected key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..config import SemanticConfig, Xcodec2Config
from ..config.original import SEMANTIC_LAYERS_USED
from ..modeling.features import Xcodec2FeatureExtractor
from ..modeling.layout import checkpoint_shapes, stack_layers, unstack_layers
from ..utils.files import atomic_write, atomic_write_json
from ..utils.safetensors import SAFE_WEIGHTS_NAME
from .io import read_state_dict
from .transformers import layout_perm, map_state, path_to_torch_key

# transformers' Wav2Vec2BertModel holds SpecAugment's mask embedding (its config masks by default);
# inference never reads it and the loaders drop it, so the export writes zeros.
MASK_EMBEDDING_KEY = "semantic_encoder.masked_spec_embed"


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


def to_transformers_state(params: Mapping[str, Any], config: Xcodec2Config) -> dict[str, np.ndarray]:
    """The codec's parameter tree as transformers' state dict (float32 numpy, torch layouts).

    Args:
        params: the :class:`~xcodec2_jax.modeling.model.Xcodec2Model` tree (stacked or per-layer).
        config: its config.

    Returns:
        ``{key: array}`` with every key of transformers' ``Xcodec2Model.state_dict()``.
    """
    expected = checkpoint_shapes(config)
    flat = unstack_layers(params, config)
    missing = sorted("/".join(p) for p in expected if p not in flat)
    unknown = sorted("/".join(p) for p in flat if p not in expected)
    if missing or unknown:
        raise ValueError(f"params do not match the config: missing {missing[:5]}, unknown {unknown[:5]}")
    state = {}
    for path, value in flat.items():
        array = np.asarray(value, np.float32)
        perm = layout_perm(path[-1], array.ndim)
        state[path_to_torch_key(path)] = np.ascontiguousarray(
            array if perm is None else np.transpose(array, _inverse(perm))
        )
    hidden = config.semantic_model_config.hidden_size
    state.setdefault(MASK_EMBEDDING_KEY, np.zeros((hidden,), np.float32))
    return state


def save_transformers(directory: str | os.PathLike, params: Mapping[str, Any], config: Xcodec2Config) -> None:
    """Write ``directory/config.json``, ``directory/model.safetensors`` and
    ``directory/preprocessor_config.json`` (the feature extractor's settings) in transformers' layout."""
    from safetensors.numpy import save

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = to_transformers_state(params, config)
    data = dict(config.to_dict(), model_type="xcodec2", architectures=["Xcodec2Model"])
    blob = save(state, metadata={"format": "pt"})
    atomic_write(os.path.join(directory, SAFE_WEIGHTS_NAME), lambda f: f.write(blob))
    atomic_write_json(os.path.join(directory, "config.json"), data)
    Xcodec2FeatureExtractor(hop_length=config.hop_length).save_pretrained(directory)


def semantic_config_from(path: str | os.PathLike, layers: int = SEMANTIC_LAYERS_USED) -> SemanticConfig:
    """The codec's semantic config for a transformers ``Wav2Vec2BertModel`` checkpoint directory:
    its own shapes, the first ``layers`` layers (X-Codec2 reads ``hidden_states[16]``)."""
    with open(os.path.join(os.fspath(path), "config.json"), encoding="utf-8") as f:
        data = json.load(f)
    semantic = SemanticConfig.from_dict(data)
    return dataclasses.replace(semantic, num_hidden_layers=min(layers, semantic.num_hidden_layers))


def load_semantic_encoder(path: str | os.PathLike, config: Xcodec2Config) -> dict:
    """The ``semantic_encoder`` subtree from a transformers ``Wav2Vec2BertModel`` checkpoint.

    Layers past ``config.semantic_model_config.num_hidden_layers`` and SpecAugment's mask embedding
    are not read; every other tensor must match (strict, as the codec's loaders)."""
    layers = config.semantic_model_config.num_hidden_layers
    state = {}
    for key, value in read_state_dict(path).items():
        key = key.removeprefix("wav2vec2_bert.")
        parts = key.split(".")
        if key == "masked_spec_embed" or (parts[:2] == ["encoder", "layers"] and int(parts[2]) >= layers):
            continue
        state[f"semantic_encoder.{key}"] = value
    expected = {p: s for p, s in checkpoint_shapes(config).items() if p[0] == "semantic_encoder"}
    placed = map_state(state, expected, source=f"{os.fspath(path)} (semantic model)")
    flat = {
        p: np.ascontiguousarray(v if perm is None else np.transpose(v, perm))
        for p, (v, perm) in placed.items()
    }
    return stack_layers(flat, config)["semantic_encoder"]
