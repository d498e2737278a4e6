"""The semantic branch of X-Codec2: the Wav2Vec2-BERT conformer and the semantic adapter.

Mirrors transformers' ``Wav2Vec2BertModel`` (eval mode: no SpecAugment, no dropout, no LayerDrop)
with ``position_embeddings_type="relative_key"`` and no adapter, and ``Xcodec2SemanticAdapter``.
Modules are named after the torch attributes so ``checkpoint.transformers.map_state`` maps the
checkpoint by identity. Everything is channels-last (B, F, C); parameters are fp32, matmuls and convolutions
run in ``dtype``, LayerNorm and softmax in fp32.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import SemanticConfig
from .nn.layers import attention, conv1d, resolve_precision, scan_layers, zero_masked

__all__ = ["SemanticAdapter", "SemanticEncoder", "relative_distance_index"]

_ACTIVATIONS = {
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    # transformers' "gelu" is the exact (erf) form.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

_SUPPORTED_POSITIONS = ("relative_key", None)


def _activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise NotImplementedError(
            f"hidden_act {name!r} is not supported (supported: {sorted(_ACTIVATIONS)})"
        ) from None


def _check_config(config: SemanticConfig) -> None:
    if config.position_embeddings_type not in _SUPPORTED_POSITIONS:
        raise NotImplementedError(
            f"position_embeddings_type {config.position_embeddings_type!r} is not implemented "
            f"(supported: 'relative_key', None)"
        )
    if config.conv_depthwise_kernel_size % 2 == 0:
        # Same check as the reference's convolution module.
        raise ValueError(f"conv_depthwise_kernel_size must be odd, got {config.conv_depthwise_kernel_size}")
    if config.use_intermediate_ffn_before_adapter:
        # Wav2Vec2BertConfig itself rejects it without an adapter, and X-Codec2 has no adapter.
        raise ValueError(
            "use_intermediate_ffn_before_adapter=True needs an adapter, which X-Codec2 does not use"
        )
    _activation(config.hidden_act)


def relative_distance_index(length: int, left: int, right: int, first=0, num_queries: int | None = None):
    """Rows into ``distance_embedding``: key - query clamped to [-left, right], + left.

    (num_queries, length) for queries ``first, first + 1, ...`` (default: all ``length`` of them);
    ``first`` may be traced (a query chunk's offset inside ``attention``'s loop).
    """
    num_queries = length if num_queries is None else num_queries
    queries = first + jnp.arange(num_queries, dtype=jnp.int32)
    keys = jnp.arange(length, dtype=jnp.int32)
    return jnp.clip(keys[None, :] - queries[:, None], -left, right) + left


def _layer_norm(features_eps: float, name: str) -> nn.LayerNorm:
    # Normalisation statistics and affine in fp32 whatever the compute dtype. Two-pass variance: the
    # one-pass E[x²] - E[x]² cancels catastrophically on the near-constant feature vectors of silent
    # frames (mean ~3, spread ~0.03), which cost 4e-4 of peak against the reference.
    return nn.LayerNorm(
        epsilon=features_eps, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False, name=name
    )


class _FeedForward(nn.Module):
    config: SemanticConfig
    act: str
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = functools.partial(nn.Dense, dtype=self.dtype, precision=self.precision)
        x = dense(c.intermediate_size, name="intermediate_dense")(x)
        x = _activation(self.act)(x)
        return dense(c.hidden_size, name="output_dense")(x)


class _SelfAttention(nn.Module):
    config: SemanticConfig
    dtype: Any = jnp.float32
    precision: Any = None
    lowering: str = "auto"

    @nn.compact
    def __call__(self, x, key_mask):
        c = self.config
        b, f, _ = x.shape
        heads, head_dim = c.num_attention_heads, c.head_dim

        def proj(name):
            # (B, heads, F, head_dim): the two attention products then batch over leading axes,
            # which XLA:CPU runs ~1.5x faster than with heads between frames and head_dim.
            y = nn.Dense(c.hidden_size, dtype=self.dtype, precision=self.precision, name=name)(x)
            return jnp.swapaxes(y.reshape(b, f, heads, head_dim), 1, 2)

        q, k, v = proj("linear_q"), proj("linear_k"), proj("linear_v")
        # The reference scales q·k and q·E separately by head_dim**-0.5 and sums them; scaling q once
        # gives the same logits up to rounding, and bit for bit when head_dim is a power of 4 (64 here).
        q = q * jnp.asarray(head_dim**-0.5, q.dtype)
        bias = None
        if c.position_embeddings_type == "relative_key":
            left, right = c.left_max_position_embeddings, c.right_max_position_embeddings
            table = nn.Embed(left + right + 1, head_dim, name="distance_embedding").embedding
            table = table.astype(self.dtype)

            def bias(q_chunk, first):
                # The reference gathers a (F, F, head_dim) embedding and contracts it with q.
                # Contracting q with the small table first and gathering the (F, F) scores gives
                # the same dot products for far less work and memory.
                rel = jnp.einsum("bhqd,pd->bhqp", q_chunk, table, precision=self.precision)
                index = relative_distance_index(f, left, right, first, q_chunk.shape[2])
                return jnp.take_along_axis(rel, index[None, None], axis=-1)

        # The reference's bidirectional mask hides padded keys from every query, padded queries
        # included (they still attend to the valid frames); masked logits get the float32 minimum.
        out = attention(
            q, k, v, key_mask=key_mask, bias=bias, precision=self.precision, lowering=self.lowering
        )
        out = jnp.swapaxes(out, 1, 2).reshape(b, f, c.hidden_size)
        return nn.Dense(c.hidden_size, dtype=self.dtype, precision=self.precision, name="linear_out")(out)


class _CausalDepthwiseConv(nn.Module):
    """Depthwise conv, bias-free, the whole kernel span padded on the left (the reference's causal
    ``depthwise_conv``). Parameter layout as ``nn.Conv(feature_group_count=features)``: kernel
    (kernel_size, 1, features).

    Written as a sum of shifted, per-channel scaled copies (XLA fuses it into one loop) with float32
    accumulation: XLA's CPU grouped convolution runs this ~10x slower (36 ms against 4 ms per
    layer at 6 s of audio).
    """

    kernel_size: int
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (self.kernel_size, 1, self.features), jnp.float32
        )
        frames = x.shape[1]
        xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (self.kernel_size - 1, 0), (0, 0)))
        out = xp[:, :frames] * kernel[0, 0]
        for i in range(1, self.kernel_size):
            out = out + xp[:, i : i + frames] * kernel[i, 0]
        return out.astype(self.dtype)


class _ConvolutionModule(nn.Module):
    config: SemanticConfig
    dtype: Any = jnp.float32
    precision: Any = None
    lowering: str = "auto"

    @nn.compact
    def __call__(self, x, frame_mask):
        c = self.config
        h = c.hidden_size
        pointwise = functools.partial(
            conv1d, use_bias=False, dtype=self.dtype, precision=self.precision, lowering=self.lowering
        )
        x = _layer_norm(c.layer_norm_eps, "layer_norm")(x).astype(self.dtype)
        x = zero_masked(x, frame_mask)
        x = pointwise(2 * h, 1, name="pointwise_conv1")(x)
        x = x[..., :h] * jax.nn.sigmoid(x[..., h:])  # GLU over channels
        x = _CausalDepthwiseConv(c.conv_depthwise_kernel_size, h, self.dtype, name="depthwise_conv")(x)
        x = _layer_norm(c.layer_norm_eps, "depthwise_layer_norm")(x).astype(self.dtype)
        x = _activation(c.hidden_act)(x)
        return pointwise(h, 1, name="pointwise_conv2")(x)


class _EncoderLayer(nn.Module):
    config: SemanticConfig
    dtype: Any = jnp.float32
    precision: Any = None
    lowering: str = "auto"

    @nn.compact
    def __call__(self, x, frame_mask):
        c = self.config
        eps = c.layer_norm_eps
        opts = dict(dtype=self.dtype, precision=self.precision)
        ffn1 = _FeedForward(c, c.hidden_act, **opts, name="ffn1")
        x = ffn1(_layer_norm(eps, "ffn1_layer_norm")(x).astype(self.dtype)) * 0.5 + x
        attn = _SelfAttention(c, **opts, lowering=self.lowering, name="self_attn")
        x = attn(_layer_norm(eps, "self_attn_layer_norm")(x).astype(self.dtype), frame_mask) + x
        x = _ConvolutionModule(c, **opts, lowering=self.lowering, name="conv_module")(x, frame_mask) + x
        ffn2 = _FeedForward(c, c.hidden_act, **opts, name="ffn2")
        x = ffn2(_layer_norm(eps, "ffn2_layer_norm")(x).astype(self.dtype)) * 0.5 + x
        return _layer_norm(eps, "final_layer_norm")(x).astype(self.dtype)


class _FeatureProjection(nn.Module):
    config: SemanticConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        x = _layer_norm(self.config.layer_norm_eps, "layer_norm")(x).astype(self.dtype)
        dense = nn.Dense(
            self.config.hidden_size, dtype=self.dtype, precision=self.precision, name="projection"
        )
        return dense(x)


class _Encoder(nn.Module):
    config: SemanticConfig
    dtype: Any = jnp.float32
    precision: Any = None
    lowering: str = "auto"

    @nn.compact
    def __call__(self, x, frame_mask):
        c = self.config
        # The reference zeroes padded frames once, before the first layer.
        x = zero_masked(x, frame_mask)
        # The layers are identical: one is traced and scanned over their stacked parameters.
        layers = scan_layers(_EncoderLayer, c.num_hidden_layers)
        return layers(c, self.dtype, self.precision, self.lowering, name="layers")(x, frame_mask)


class SemanticEncoder(nn.Module):
    """Wav2Vec2-BERT conformer: ``(input_features (B, F, 160), attention_mask (B, F)) -> (B, F, H)``.

    ``attention_mask`` is 1/True on valid frames, 0/False on padding (trailing padding, as produced by
    the feature extractor); ``None`` means no padding. Returns ``last_hidden_state``.
    """

    config: SemanticConfig
    dtype: Any = jnp.float32
    precision: Any = None
    lowering: str = "auto"

    def __post_init__(self):
        _check_config(self.config)
        super().__post_init__()

    @nn.compact
    def __call__(self, input_features, attention_mask=None):
        c = self.config
        frame_mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        precision = resolve_precision(self.precision, self.dtype)
        x = _FeatureProjection(c, self.dtype, precision, name="feature_projection")(input_features)
        return _Encoder(c, self.dtype, precision, self.lowering, name="encoder")(x, frame_mask)


class SemanticAdapter(nn.Module):
    """``Xcodec2SemanticAdapter`` channels-last: four k=3 "same" convs, ``(B, F, H) -> (B, F, H)``."""

    config: SemanticConfig
    dtype: Any = jnp.float32
    precision: Any = None
    lowering: str = "auto"

    @nn.compact
    def __call__(self, x, frame_mask=None):
        """``frame_mask`` (B, F), optional: zero padded frames before each conv, so every item of a
        padded batch gets what it would alone (the conv's own zero padding past its end)."""
        h = self.config.hidden_size

        mask = None if frame_mask is None else jnp.asarray(frame_mask).astype(bool)

        def conv(name, bias, v):
            layer = conv1d(
                h,
                3,
                padding=1,
                use_bias=bias,
                dtype=self.dtype,
                precision=self.precision,
                lowering=self.lowering,
                name=name,
            )
            return layer(zero_masked(v, mask))

        x = jax.nn.relu(conv("conv1", False, x))
        # The reference takes the residual after the first ReLU, not at the adapter's input.
        residual = x
        x = jax.nn.relu(conv("conv2", True, x))
        x = conv("conv3", True, x) + residual
        return conv("conv4", False, x)
