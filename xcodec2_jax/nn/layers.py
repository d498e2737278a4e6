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
    name: str,
) -> nn.Conv:
    """A torch ``Conv1d`` with symmetric zero padding, on (B, T, C) inputs."""
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

