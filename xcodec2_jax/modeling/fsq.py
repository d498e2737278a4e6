"""Finite scalar quantization (FSQ), as X-Codec2's single 65,536-entry codebook uses it.

Everything here runs in float32 whatever the model's compute dtype: indices reach 65,535, which
bfloat16 cannot even represent, and the rounding boundaries must match the reference bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import Xcodec2Config


def fsq_basis(levels: Sequence[int]) -> np.ndarray:
    """Mixed-radix place values: index = sum(level_index * basis)."""
    return np.cumprod([1, *levels[:-1]]).astype(np.int32)


def fsq_bound(z: jnp.ndarray, levels: Sequence[int], eps: float = 1e-3) -> jnp.ndarray:
    """Soft-clip to [-(L-1)/2, (L-1)/2] with a scaled tanh, shifted by 1/2 for even L."""
    levels_f = np.asarray(levels, np.float32)
    half_range = (levels_f - 1) * np.float32(1 + eps) / 2
    offset = np.where(np.asarray(levels) % 2 == 0, np.float32(0.5), np.float32(0.0)).astype(np.float32)
    # The reference evaluates atanh in float32 on tensors; numpy float32 gives the same rounding.
    shift = np.arctanh((offset / half_range).astype(np.float32)).astype(np.float32)
    z = z.astype(jnp.float32)
    return jnp.tanh(z + shift) * half_range - offset


@jax.custom_jvp
def round_straight_through(z: jnp.ndarray) -> jnp.ndarray:
    """``jnp.round`` (half to even, as torch) whose derivative is the identity.

    The reference writes ``z + (z.round() - z).detach()``; evaluated in floats that gives +0.0 where
    ``round`` gives -0.0 (z in (-0.5, 0)). A custom JVP keeps the forward exactly ``jnp.round``, so
    codes and latents are bit for bit those of plain rounding, with the reference's gradient.
    """
    return jnp.round(z)


@round_straight_through.defjvp
def _round_straight_through_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    return jnp.round(z), dz


def fsq_quantize(
    z: jnp.ndarray, levels: Sequence[int], straight_through: bool = True
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Bounded values -> (normalised codes in [-1, 1], int32 indices).

    Mirrors the reference's arithmetic step by step (divide by the half width, scale back, add
    the half width, weight by the basis, truncate to int32), so even odd level counts whose
    half width is not a power of two give the reference's indices. With ``straight_through`` the
    codes' gradient passes the rounding as the identity (the reference's); without, it is zero
    (``jnp.round``'s). Forward values are the same either way.
    """
    half_width = np.asarray([lv // 2 for lv in levels], np.float32)
    rounding = round_straight_through if straight_through else jnp.round
    rounded = rounding(z.astype(jnp.float32))
    codes = rounded / half_width
    code_scaled = codes * half_width + half_width
    indices = jnp.sum(code_scaled * fsq_basis(levels).astype(np.float32), axis=-1).astype(jnp.int32)
    return codes, indices


def indices_to_codes(indices: jnp.ndarray, levels: Sequence[int]) -> jnp.ndarray:
    """int indices (...) -> normalised codes (..., len(levels)), the reference's codebook rows."""
    levels_i = np.asarray(levels, np.int32)
    level_indices = (indices[..., None].astype(jnp.int32) // fsq_basis(levels)) % levels_i
    half_width = levels_i // 2
    return (level_indices - half_width).astype(jnp.float32) / half_width.astype(np.float32)


class Quantizer(nn.Module):
    """``project_in`` -> FSQ -> ``project_out``; ``from_codes`` for decoding."""

    config: Xcodec2Config
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        levels = self.config.quantization_levels
        # Both projections at HIGHEST whatever the model's precision: project_in feeds the rounding,
        # and project_out maps the exact codebook rows that the decoder starts from.
        highest = jax.lax.Precision.HIGHEST
        self.project_in = nn.Dense(len(levels), dtype=jnp.float32, precision=highest, name="project_in")
        self.project_out = nn.Dense(
            self.config.quantization_dim, dtype=self.dtype, precision=highest, name="project_out"
        )

    def __call__(
        self, hidden_states: jnp.ndarray, straight_through: bool = True
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(B, N, quantization_dim) -> (latents (B, N, quantization_dim), indices (B, N) int32).

        The latents carry straight-through gradients (see :func:`fsq_quantize`)."""
        levels = self.config.quantization_levels
        z = self.project_in(hidden_states.astype(jnp.float32))
        # The reference bounds twice: once in Xcodec2Quantizer.forward (kept for the original
        # checkpoint) and again inside the FSQ forward. Both are needed for its codes.
        z = fsq_bound(fsq_bound(z, levels), levels)
        codes, indices = fsq_quantize(z, levels, straight_through)
        return self.project_out(codes), indices

    def from_codes(self, indices: jnp.ndarray) -> jnp.ndarray:
        """(B, N) int indices -> (B, N, quantization_dim)."""
        return self.project_out(indices_to_codes(indices, self.config.quantization_levels))
