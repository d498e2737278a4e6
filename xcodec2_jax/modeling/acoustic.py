"""The acoustic (convolutional) encoder of X-Codec2: reference `Xcodec2Encoder`, channels-last.

Waveform (B, T, 1) → conv → blocks that each run three dilated residual units, an anti-aliased
SnakeBeta and a strided conv doubling the channels → anti-aliased SnakeBeta → conv →
(B, T // hop, hidden_size). Submodules carry the reference's attribute names so that
the checkpoint loaders (``checkpoint.transformers.map_state``) map the transformers keys by identity.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import Xcodec2Config
from .nn.activations import AntiAliasedSnakeBeta
from .nn.layers import conv1d

Array = jnp.ndarray


def _conv_length(lengths: Array | None, kernel: int, stride: int, padding: int) -> Array | None:
    """Per-item output length of a conv, as for each item run alone."""
    if lengths is None:
        return None
    # floor((L + 2p - k) / s) + 1 as one truncating division of a non-negative numerator (L >= 0 and
    # k <= 2p + s for every conv that carries lengths here): jnp's floor division of signed integers
    # is ~20 operations, which XLA repeats inside every fusion that reads the lengths.
    numerator = jnp.maximum(jnp.asarray(lengths, jnp.int32) + 2 * padding - kernel + stride, 0)
    return jax.lax.div(numerator, jnp.int32(stride))


def _opts(module: nn.Module) -> dict[str, Any]:
    """What a submodule takes from its parent: compute dtype, precision and lowering."""
    return dict(dtype=module.dtype, precision=module.precision, lowering=module.lowering)


def _zero_tail(x: Array, lengths: Array | None) -> Array:
    """Zero each item past its length: the zero padding its convs would read if run alone."""
    if lengths is None:
        return x
    rows = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :, None]
    return jnp.where(rows < jnp.asarray(lengths, jnp.int32)[:, None, None], x, jnp.zeros((), x.dtype))


class ResidualUnit(nn.Module):
    """Reference `Xcodec2ResidualUnit`: x + conv2(snake2(conv1(snake1(x)))), conv1 k=7 dilated."""

    features: int
    dilation: int
    dtype: Any = jnp.float32
    precision: Any = None
    lowering: str = "auto"

    def setup(self):
        self.snake1 = AntiAliasedSnakeBeta(self.features, dtype=self.dtype)
        self.conv1 = conv1d(
            self.features, 7, dilation=self.dilation, padding=3 * self.dilation, **_opts(self)
        )
        self.snake2 = AntiAliasedSnakeBeta(self.features, dtype=self.dtype)
        self.conv2 = conv1d(self.features, 1, padding=0, **_opts(self))

    def __call__(self, x: Array, lengths: Array | None = None) -> Array:
        y = self.conv1(_zero_tail(self.snake1(x, lengths), lengths))
        y = self.conv2(self.snake2(y, lengths))
        # The reference centre-crops the skip path when the branch comes out shorter; with its
        # "same" padding that never happens, but the rule is kept.
        crop = (x.shape[1] - y.shape[1]) // 2
        if crop > 0:
            x = x[:, crop:-crop]
        return x + y


class EncoderBlock(nn.Module):
    """Reference `Xcodec2EncoderBlock`: three residual units (dilations 1, 3, 9), SnakeBeta, and a
    conv with kernel 2·stride, stride `stride`, padding ceil(stride / 2) to 2·features channels."""

    features: int
    stride: int
    dtype: Any = jnp.float32
    precision: Any = None
    lowering: str = "auto"

    def setup(self):
        self.res_unit1 = ResidualUnit(self.features, 1, **_opts(self))
        self.res_unit2 = ResidualUnit(self.features, 3, **_opts(self))
        self.res_unit3 = ResidualUnit(self.features, 9, **_opts(self))
        self.snake1 = AntiAliasedSnakeBeta(self.features, dtype=self.dtype)
        self.conv1 = conv1d(
            2 * self.features,
            2 * self.stride,
            stride=self.stride,
            padding=math.ceil(self.stride / 2),
            **_opts(self),
        )

    def __call__(self, x: Array, lengths: Array | None = None) -> Array:
        for unit in (self.res_unit1, self.res_unit2, self.res_unit3):
            x = unit(x, lengths)
        return self.conv1(_zero_tail(self.snake1(x, lengths), lengths))


class AcousticEncoder(nn.Module):
    """Reference `Xcodec2Encoder`: (B, T, 1) waveform → (B, T // hop_length, hidden_size).

    Params are float32; `dtype` is the compute dtype (SnakeBeta always evaluates in float32).
    """

    config: Xcodec2Config
    dtype: Any = jnp.float32
    precision: Any = None
    lowering: str = "auto"

    def setup(self):
        cfg = self.config
        width = cfg.encoder_hidden_size
        self.conv1 = conv1d(width, 7, padding=3, **_opts(self))
        self.block = [
            EncoderBlock(width * 2**i, stride, **_opts(self))
            for i, stride in enumerate(cfg.downsampling_ratios)
        ]
        d_model = width * 2 ** len(cfg.downsampling_ratios)
        self.snake1 = AntiAliasedSnakeBeta(d_model, dtype=self.dtype)
        self.conv2 = conv1d(cfg.hidden_size, 3, padding=1, **_opts(self))

    def __call__(self, x: Array, lengths: Array | None = None) -> Array:
        """x (B, T, 1) → (B, frames, hidden_size).

        `lengths` (B,) of valid samples, optional (an extension of the reference): item b's first
        frames then equal those of x[b, :lengths[b]] encoded alone, because every conv and
        resampler sees the zero or replicate padding it would see alone; the rest are unspecified.
        """
        if x.ndim != 3 or x.shape[-1] != 1:
            raise ValueError(f"AcousticEncoder expects a waveform of shape (batch, time, 1), got {x.shape}")
        x = self.conv1(_zero_tail(x.astype(self.dtype), lengths))
        for block in self.block:
            x = block(x, lengths)
            lengths = _conv_length(lengths, 2 * block.stride, block.stride, math.ceil(block.stride / 2))
        return self.conv2(_zero_tail(self.snake1(x, lengths), lengths))
