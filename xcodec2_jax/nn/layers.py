"""Convolution and normalisation layers shared by the modules, channels-last."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


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
) -> nn.Conv:
    """A torch ``Conv1d`` with symmetric zero padding, on (B, T, C) inputs (``name`` only outside setup)."""
    return nn.Conv(
        features,
        (kernel_size,),
        strides=(stride,),
        padding=[(padding, padding)],
        kernel_dilation=(dilation,),
        feature_group_count=groups,
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
