"""Convolution and normalisation layers shared by the modules, channels-last."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Conv1d(nn.Module):
    """A torch ``Conv1d`` on (B, T, C) inputs with symmetric zero padding.

    Parameters as ``flax.linen.Conv``: ``kernel`` (kernel_size, in_features // groups, features) and
    ``bias`` (features,), float32, cast to ``dtype`` for the compute. The lowering is picked per
    shape, measured under XLA:CPU (2 cores, full config): a 1-wide kernel is a plain matmul (the
    convolution op is ~30% slower there); a 2- or 3-wide one is one matmul over the concatenated
    shifted inputs (up to 1.5x faster than the convolution op on 1024 channels); wider, strided or
    grouped kernels use ``lax.conv_general_dilated``, which is at the matmul rate for those.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        in_features = x.shape[-1]
        if in_features % self.groups or self.features % self.groups:
            raise ValueError(
                f"channels ({in_features} in, {self.features} out) must be divisible by "
                f"groups ({self.groups})"
            )
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (self.kernel_size, in_features // self.groups, self.features),
            jnp.float32,
        ).astype(self.dtype)
        x = x.astype(self.dtype)
        k, pad, dil = self.kernel_size, self.padding, self.dilation
        if self.groups == 1 and self.stride == 1 and k <= 3:
            if pad:
                x = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
            n = x.shape[1] - dil * (k - 1)
            if k > 1:
                x = jnp.concatenate([x[:, i * dil : i * dil + n] for i in range(k)], axis=-1)
            y = jnp.dot(x, kernel.reshape(k * in_features, self.features))
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                (self.stride,),
                [(pad, pad)],
                rhs_dilation=(dil,),
                dimension_numbers=("NWC", "WIO", "NWC"),
                feature_group_count=self.groups,
            )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def conv1d(
    features: int,
    kernel_size: int,
    *,
    padding: int = 0,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    use_bias: bool = True,
    dtype=jnp.float32,
    name: str | None = None,
) -> Conv1d:
    """A torch ``Conv1d`` with symmetric zero padding, on (B, T, C) inputs (``name`` only outside setup)."""
    return Conv1d(
        features,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        use_bias=use_bias,
        dtype=dtype,
        name=name,
    )


class RMSNorm(nn.Module):
    """T5-style RMSNorm; the statistics run in float32 and the scale multiplies after the cast back."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (scale * x32.astype(x.dtype)).astype(self.dtype)


class GroupNorm(nn.Module):
    """torch ``GroupNorm`` on (B, T, C), in float32, with optional per-frame validity.

    With ``mask`` (B, T), the statistics cover only the valid frames, so a padded item is normalised
    exactly as it would be alone. Variance is two-pass (biased, as torch) for accuracy.
    """

    num_groups: int = 32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        b, t, c = x.shape
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        g = x.astype(jnp.float32).reshape(b, t, self.num_groups, c // self.num_groups)
        if mask is None:
            mean = jnp.mean(g, axis=(1, 3), keepdims=True)
            var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
        else:
            m = mask.astype(jnp.float32)[:, :, None, None]
            count = jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0) * (c // self.num_groups)
            mean = jnp.sum(g * m, axis=(1, 3), keepdims=True) / count
            var = jnp.sum(jnp.square(g - mean) * m, axis=(1, 3), keepdims=True) / count
        y = ((g - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(b, t, c)
        return y * scale + bias
