"""The Vocos-style decoder: fc, embed conv, ResNet blocks, a transformer, LayerNorm and an ISTFT head.

Channels-last (B, N, C) throughout; module names follow transformers' ``Xcodec2Decoder``.

Every stage takes an optional frame ``mask`` (B, N). Without it the decoder is the reference's. With it,
each item of a padded batch is decoded exactly as it would be alone: padded frames are zeroed before
each convolution (as the convolution's own zero padding would be), left out of GroupNorm statistics
and attention keys, and left out of the ISTFT overlap-add and its window envelope.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import Xcodec2Config
from .nn.layers import GroupNorm, RMSNorm, attention, conv1d, resolve_precision, run_layers, zero_masked


class ResNetBlock(nn.Module):
    """GroupNorm(32) -> SiLU -> conv3 -> GroupNorm(32) -> SiLU -> dropout -> conv3, plus the input.

    The dropout (``dropout_rate``, only when called with ``deterministic=False`` and a ``"dropout"``
    rng) is X-Codec-2.0's training-time one; released models decode without it.
    """

    config: Xcodec2Config
    dtype: jnp.dtype = jnp.float32
    precision: Any = None
    lowering: str = "auto"
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, mask: jnp.ndarray | None = None, deterministic: bool = True
    ) -> jnp.ndarray:
        h = self.config.hidden_size
        conv = functools.partial(
            conv1d, h, 3, padding=1, dtype=self.dtype, precision=self.precision, lowering=self.lowering
        )
        y = GroupNorm(32, 1e-6, name="norm1")(x, mask)
        y = zero_masked(nn.silu(y).astype(self.dtype), mask)
        y = conv(name="conv1")(y)
        y = GroupNorm(32, 1e-6, name="norm2")(y, mask)
        y = zero_masked(nn.silu(y).astype(self.dtype), mask)
        if self.dropout_rate > 0 and not deterministic:
            y = nn.Dropout(self.dropout_rate)(y, deterministic=False)
        y = conv(name="conv2")(y)
        return y + x


class Attention(nn.Module):
    """Bidirectional multi-head attention with grouped key/value heads.

    The reference applies RoPE with positions ``arange(num_attention_heads)``: the rotation depends
    on the head, not on time, and q and k of a head get the same rotation, so q·k is unchanged.
    It is left out here; tests check the equality against the reference with it in.
    """

    config: Xcodec2Config
    dtype: jnp.dtype = jnp.float32
    precision: Any = None
    lowering: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        cfg = self.config
        heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        groups = heads // kv_heads
        b, n, _ = x.shape

        def proj(features, name):
            return nn.Dense(
                features, use_bias=cfg.attention_bias, dtype=self.dtype, precision=self.precision, name=name
            )

        # Query heads are grouped per key/value head as repeat_kv expects: head h uses kv head h // groups.
        # Laid out (B, kv_heads, groups, N, head_dim) so the attention products batch over leading axes.
        q = proj(heads * head_dim, "q_proj")(x).reshape(b, n, kv_heads, groups, head_dim)
        k = proj(kv_heads * head_dim, "k_proj")(x).reshape(b, n, kv_heads, 1, head_dim)
        v = proj(kv_heads * head_dim, "v_proj")(x).reshape(b, n, kv_heads, 1, head_dim)
        q, k, v = (jnp.transpose(t, (0, 2, 3, 1, 4)) for t in (q, k, v))
        out = attention(
            q, k, v, scale=head_dim**-0.5, key_mask=mask, precision=self.precision, lowering=self.lowering
        )
        out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, n, heads * head_dim)
        return proj(cfg.hidden_size, "o_proj")(out)


class MLP(nn.Module):
    config: Xcodec2Config
    dtype: jnp.dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype, precision=self.precision)
        x = dense(cfg.intermediate_size, name="fc1")(x)
        return dense(cfg.hidden_size, name="fc2")(nn.silu(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer layer: RMSNorm -> attention, RMSNorm -> SiLU MLP, both residual."""

    config: Xcodec2Config
    dtype: jnp.dtype = jnp.float32
    precision: Any = None
    lowering: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        eps = self.config.rms_norm_eps
        h = RMSNorm(eps, dtype=self.dtype, name="input_layernorm")(x)
        x = x + Attention(self.config, self.dtype, self.precision, self.lowering, name="self_attn")(h, mask)
        h = RMSNorm(eps, dtype=self.dtype, name="post_attention_layernorm")(x)
        return x + MLP(self.config, self.dtype, self.precision, name="mlp")(h)


def _overlap_add(frames: jnp.ndarray, hop: int) -> jnp.ndarray:
    """(B, N, n_fft) frames -> (B, (N - 1) * hop + n_fft) summed at stride ``hop``.

    n_fft is a multiple of hop (4 × hop in X-Codec2), so each frame splits into n_fft / hop
    chunks and the sum is a handful of shifted adds instead of a scatter.
    """
    b, n, n_fft = frames.shape
    k = n_fft // hop
    chunks = frames.reshape(b, n, k, hop)
    out = jnp.zeros((b, n + k - 1, hop), frames.dtype)
    for j in range(k):
        out = out.at[:, j : j + n].add(chunks[:, :, j])
    return out.reshape(b, (n + k - 1) * hop)


def _window_envelope(squared_window: np.ndarray, hop: int, num_frames: int) -> np.ndarray:
    """Overlap-added squared window in numpy: a constant folded into the graph (shapes are static)."""
    k = squared_window.shape[0] // hop
    envelope = np.zeros((num_frames + k - 1, hop), np.float32)
    for j, chunk in enumerate(squared_window.reshape(k, hop)):
        envelope[j : j + num_frames] += chunk
    return envelope.reshape(-1)


class ISTFTHead(nn.Module):
    """Linear -> (log-magnitude, phase) -> inverse STFT with Vocos "same" padding, in float32."""

    config: Xcodec2Config

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        n_fft, hop = self.config.n_fft, self.config.hop_length
        if n_fft % hop:
            raise ValueError(f"n_fft ({n_fft}) must be a multiple of hop_length ({hop})")
        # Always float32 at HIGHEST, like the rest of the ISTFT: exp() of the log-magnitude
        # amplifies any error of this projection.
        head = nn.Dense(n_fft + 2, dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST, name="linear")
        pred = head(x.astype(jnp.float32))
        log_mag, phase = jnp.split(pred, 2, axis=-1)
        # exp clamped at 1e2 as the original release does, keeping loud frames from blowing up.
        mag = jnp.minimum(jnp.exp(log_mag), 1e2)
        spec = jax.lax.complex(mag * jnp.cos(phase), mag * jnp.sin(phase))
        # torch.hann_window's default is periodic.
        window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
        frames = jnp.fft.irfft(spec, n=n_fft, axis=-1) * window
        if mask is None:
            envelope = _window_envelope(np.square(window), hop, x.shape[1])[None]
        else:
            valid = mask[..., None].astype(jnp.float32)
            frames = frames * valid
            envelope = _overlap_add(valid * np.square(window), hop)
        audio = _overlap_add(frames, hop)
        pad = (n_fft - hop) // 2
        # The original clamps the window envelope at 1e-11 before dividing.
        envelope = jnp.maximum(envelope[:, pad:-pad], 1e-11)
        audio = audio[:, pad:-pad] / envelope
        if mask is not None:
            # An item alone ends at valid frames · hop; the overlap-add tail past it is not audio.
            audio = audio * jnp.repeat(mask, hop, axis=1)
        return audio


class Decoder(nn.Module):
    """Latents (B, N, quantization_dim) -> audio (B, N · hop).

    ``dropout_rate`` is the training-time dropout of the four ResNet blocks (X-Codec-2.0: 0.1).
    """

    config: Xcodec2Config
    dtype: jnp.dtype = jnp.float32
    precision: Any = None
    lowering: str = "auto"
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(
        self, latents: jnp.ndarray, mask: jnp.ndarray | None = None, deterministic: bool = True
    ) -> jnp.ndarray:
        """``mask`` (B, N), true on valid frames: decode each item as if alone (see module doc).
        ``deterministic=False`` applies the dropout, drawn from the ``"dropout"`` rng."""
        cfg, dtype = self.config, self.dtype
        precision = resolve_precision(self.precision, dtype)
        opts = (cfg, dtype, precision, self.lowering)
        if mask is not None:
            mask = jnp.asarray(mask).astype(bool)
        x = nn.Dense(cfg.hidden_size, dtype=dtype, precision=precision, name="fc")(latents.astype(dtype))
        embed = conv1d(cfg.hidden_size, 7, padding=3, dtype=dtype, precision=precision, name="embed")
        x = embed(zero_masked(x, mask))
        block = functools.partial(ResNetBlock, *opts, dropout_rate=self.dropout_rate)
        for i in range(2):
            x = block(name=f"prior_net_{i}")(x, mask, deterministic)
        # The layers are identical: one is traced and scanned over their stacked parameters, or run
        # one by one on per-layer parameters (layout.per_layer), which XLA:CPU reads without copies.
        x = run_layers(self, DecoderLayer, cfg.num_hidden_layers, "layers", opts, x, mask)
        for i in range(2):
            x = block(name=f"post_net_{i}")(x, mask, deterministic)
        x = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, use_fast_variance=False, name="norm")(x)
        return ISTFTHead(cfg, name="head")(x, mask)
