"""The generator of X-Codec2's training recipe: the codec plus its two training-only parts.

X-Codec-2.0's ``lightning_module.py`` trains, beside the codec the checkpoints ship, ``fc_post_s``
(a linear map from the quantized latents, ``quantization_dim`` wide, to the semantic width) and a
``SemanticDecoder`` (the semantic adapter's mirror: the same four-convolution block), whose output
is regressed (MSE) on the frozen semantic encoder's ``hidden_states[16]``. Released checkpoints drop
both; they are initialised fresh when training starts from one.

The forward pass is the training repo's: the acoustic encoder reads the crop itself (T a multiple of
the hop, T / hop codes), the semantic encoder the features of the crop (padded by half a hop on each
side, as that repo's data module does), the decoder the straight-through latents, and the output is
T samples long. The decoder's ResNet blocks apply X-Codec-2.0's training-time dropout when a
``dropout_key`` is given.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ..config import Xcodec2Config
from ..modeling.decoder import Decoder
from ..modeling.features import fbank_features_jax
from ..modeling.model import Xcodec2Model
from ..modeling.nn.layers import resolve_precision
from ..modeling.semantic import SemanticAdapter

TRAINING_ONLY = ("fc_post_s", "semantic_decoder")


class SemanticReconstruction(nn.Module):
    """``fc_post_s`` then ``semantic_decoder``: latents (B, N, quantization_dim) -> (B, N, semantic width)."""

    config: Xcodec2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, latents: jnp.ndarray) -> jnp.ndarray:
        semantic = self.config.semantic_model_config
        precision = resolve_precision(None, self.dtype)
        x = nn.Dense(semantic.hidden_size, dtype=self.dtype, precision=precision, name="fc_post_s")(latents)
        return SemanticAdapter(semantic, dtype=self.dtype, precision=precision, name="semantic_decoder")(x)


@flax.struct.dataclass
class GeneratorOutput:
    """``audio`` (B, T) float32 reconstruction; ``semantic`` (B, N, H) the semantic decoder's output and
    ``semantic_target`` the frozen encoder's (float32); ``codes`` (B, N) int32."""

    audio: jnp.ndarray
    semantic: jnp.ndarray
    semantic_target: jnp.ndarray
    codes: jnp.ndarray


class Generator:
    """The codec and its training-only parts as one function of one flat parameter tree.

    The tree is the codec's (``semantic_encoder``, ``acoustic_encoder``, ..., ``acoustic_decoder``)
    plus ``fc_post_s`` and ``semantic_decoder``. ``dtype`` is the compute dtype (the float32 islands
    of inference stay float32; outputs are float32). ``dropout`` is the rate of the decoder's
    training-time dropout.
    """

    def __init__(self, config: Xcodec2Config, dtype: Any = jnp.float32, dropout: float = 0.0):
        self.config = config
        self.model = Xcodec2Model(config, dtype=dtype)
        self.decoder = Decoder(config, dtype=dtype, dropout_rate=dropout)
        self.heads = SemanticReconstruction(config, dtype=dtype)

    def init_training_parts(self, key: jax.Array) -> dict:
        """Fresh ``fc_post_s`` and ``semantic_decoder`` parameters (float32)."""
        latents = jnp.zeros((1, 2, self.config.quantization_dim), jnp.float32)
        return dict(jax.jit(SemanticReconstruction(self.config).init)(key, latents)["params"])

    def __call__(
        self,
        params: dict,
        audio: jnp.ndarray,
        with_semantic: bool = True,
        dropout_key: jax.Array | None = None,
    ) -> GeneratorOutput:
        """Reconstruct (B, T) float32 ``audio`` (T a multiple of the hop) through the codec.

        ``with_semantic`` False skips the semantic decoder (its outputs are then zero-sized);
        ``dropout_key`` (a PRNG key) turns the decoder's dropout on, None leaves it off."""
        codec = {k: v for k, v in params.items() if k not in TRAINING_ONLY}
        variables = {"params": codec}
        b, t = audio.shape
        features, _ = fbank_features_jax(
            audio, jnp.full((b,), t, jnp.int32), hop_length=self.config.hop_length
        )
        target = self.model.apply(variables, features, method=Xcodec2Model.semantic_hidden_states)
        hidden = self.model.apply(
            variables,
            audio[:, None],
            features,
            semantic_hidden_states=target,
            method=Xcodec2Model.encoder_hidden_states,
        )
        latents, codes = self.model.apply(variables, hidden, method=Xcodec2Model.quantize)
        recon = self.decoder.apply(
            {"params": codec["acoustic_decoder"]},
            latents,
            deterministic=dropout_key is None,
            rngs=None if dropout_key is None else {"dropout": dropout_key},
        )
        recon = recon[:, :t].astype(jnp.float32)
        if with_semantic:
            heads = {"params": {k: params[k] for k in TRAINING_ONLY}}
            semantic = self.heads.apply(heads, latents).astype(jnp.float32)
        else:
            semantic = jnp.zeros((b, 0, 0), jnp.float32)
        return GeneratorOutput(recon, semantic, target.astype(jnp.float32), codes)
