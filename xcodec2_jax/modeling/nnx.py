"""The codec for Flax NNX code: :class:`Xcodec2Model` wrapped by ``flax.nnx.bridge.ToNNX``.

The NNX module holds the parameters as ``nnx.Param`` state and calls the Linen model's methods on
them, so it computes exactly what the Linen model computes (same codes, same audio, same gradients)
and composes with NNX modules, ``nnx.grad``, ``nnx.jit`` and ``nnx.Optimizer``::

    codec = to_nnx(config, params)
    out = codec.encode(input_values, input_features)          # Xcodec2EncoderOutput
    audio = codec.decode(out.audio_codes).audio_values
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import Xcodec2Config
from .model import Xcodec2Model


def to_nnx(
    config: Xcodec2Config,
    params: Mapping[str, Any] | None = None,
    *,
    dtype: Any = jnp.float32,
    seed: int = 0,
) -> nnx.Module:
    """An NNX module of the codec.

    Args:
        config: the model's shapes.
        params: the Linen parameter tree (``load_params``); None: random parameters from ``seed``.
        dtype: compute dtype, as :class:`Xcodec2Model`'s.
        seed: of the random parameters.

    Returns:
        A ``ToNNX`` module whose ``encode``, ``decode``, ``encoder_hidden_states`` ... are the Linen
        model's methods, and whose ``nnx.state(module, nnx.Param)`` mirrors ``params``.
    """
    hop = config.hop_length
    values = jnp.zeros((1, 1, 2 * hop), jnp.float32)
    features = jnp.zeros((1, 2, config.semantic_model_config.feature_projection_input_dim), jnp.float32)

    def build():
        module = nnx.bridge.ToNNX(Xcodec2Model(config, dtype=dtype), rngs=nnx.Rngs(seed))
        return nnx.bridge.lazy_init(module, values, features)

    if params is None:
        return nnx.jit(build)()
    # Shapes only (no parameter computed), then the given arrays put in place.
    module = nnx.eval_shape(build)
    module.to_nnx__rngs = None  # abstract random streams; the codec draws no random numbers when applied
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, dict(params)))
    nnx.update(module, state)
    return module
