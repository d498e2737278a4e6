"""SnakeBeta and its anti-aliased form (kaiser-sinc ×2 upsample → SnakeBeta → ×2 downsample).

Layout is channels-last (B, T, C) throughout. The resampling filters are constants computed in
numpy at trace time, never parameters, as the reference recomputes its non-persistent buffers.

Speed: the reference spends most of its encoder time on CPU here, in grouped and transposed
convolutions that run far below peak. Instead every resampler is a short sum of shifted slices
times scalar taps (polyphase for the upsampler, so no zero-stuffed sample is ever multiplied),
which XLA fuses into one vectorised loop, and the upsample → SnakeBeta → downsample chain never
builds the 2T-long signal. Three details matter a lot under XLA:CPU (see `_upsample_phases`): the
replicate pads must not be fused into those loops, the activation must be materialised once rather
than fused into every tap that reads it, and `jnp.sin` compiles to scalar code, so sin² uses a
vectorisable polynomial as accurate as the library sine (~1e-7).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jnp.ndarray
Taps = Sequence[tuple[int, float]]  # (offset, coefficient) pairs

# SnakeBeta's guard against division by zero in 1 / beta, as in the reference.
_NO_DIV_BY_ZERO = 1e-9
# Gathers whose indices are clipped in range already: JAX's default mode adds a bounds mask and a
# negative-index wrap to each, which XLA repeats inside every fusion that reads the indices.
_IN_BOUNDS = "promise_in_bounds"


def kaiser_sinc_filter1d(cutoff: float, half_width: float, kernel_size: int) -> np.ndarray:
    """Kaiser-windowed sinc low-pass filter, shape (kernel_size,), float32, summing to 1."""
    is_even = kernel_size % 2 == 0
    half_size = kernel_size // 2
    delta_f = 4 * half_width
    attenuation = 2.285 * (half_size - 1) * math.pi * delta_f + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    if cutoff == 0:
        return np.zeros((kernel_size,), np.float32)
    # np.kaiser is torch.kaiser_window(periodic=False); computing in float64 and rounding once
    # lands within an ulp of the reference's float32 filter.
    window = np.kaiser(kernel_size, beta)
    t = np.arange(-half_size, half_size) + 0.5 if is_even else np.arange(kernel_size) - half_size
    f = 2 * cutoff * window * np.sinc(2 * cutoff * t)
    return (f / f.sum()).astype(np.float32)


def _filter(ratio: int, kernel_size: int) -> np.ndarray:
    return kaiser_sinc_filter1d(0.5 / ratio, 0.6 / ratio, kernel_size)


def _span(taps_per_source: Sequence[Taps]) -> tuple[int, int]:
    offsets = [o for taps in taps_per_source for o, _ in taps]
    return min(0, *offsets), max(0, *offsets)


def _scalar(value: float, dtype) -> np.ndarray:
    # A numpy scalar: lax ops take it as a literal, and tracing skips jnp's dispatch (the 36
    # activations' few thousand element-wise ops were most of the encoder's trace time).
    return np.asarray(value, dtype)[()]


def _broadcast_rows(row: Array, n: int) -> Array:
    return lax.broadcast_in_dim(row, (row.shape[0], n, row.shape[2]), (0, 1, 2))


def _extend(x: Array, left: int, right: int, left_fill: Array, right_fill: Array) -> Array:
    parts = [_broadcast_rows(left_fill, left)] if left else []
    parts.append(x)
    if right:
        parts.append(_broadcast_rows(right_fill, right))
    return lax.concatenate(parts, 1) if len(parts) > 1 else x


def _slice_sum(sources: Sequence[tuple[Array, Taps]], start: int, n: int) -> Array:
    """sum over sources and taps of coef · x[:, start + offset : start + offset + n]."""
    out = None
    for x, taps in sources:
        for offset, coef in taps:
            window = lax.slice_in_dim(x, start + offset, start + offset + n, axis=1)
            term = lax.mul(window, _scalar(coef, x.dtype))
            out = term if out is None else lax.add(out, term)
    return out


def _upsample_taps(ratio: int, kernel_size: int) -> list[list[tuple[int, float]]]:
    """Taps of each output phase p (outputs p, p + ratio, ...) on the input, scaled by ratio.

    The reference replicate-pads by `pad`, runs a transposed conv and crops `crop` samples; so
    output ratio·j + p is ratio · sum of filt[k] · x[j + (p + crop - k) / ratio - pad] over the
    taps k with (p + crop - k) divisible by ratio.
    """
    filt = _filter(ratio, kernel_size)
    pad = kernel_size // ratio - 1
    crop = pad * ratio + (kernel_size - ratio) // 2
    return [
        [
            ((p + crop - k) // ratio - pad, ratio * float(filt[k]))
            for k in range((p + crop) % ratio, kernel_size, ratio)
        ]
        for p in range(ratio)
    ]


def _downsample_taps(ratio: int, kernel_size: int) -> list[list[tuple[int, float]]]:
    """Taps of the strided filter on each input phase: output j reads phase p at frame j + offset.

    The reference replicate-pads kernel_size//2 - 1 (even kernel) samples on the left, so tap k
    reads input ratio·j + k - pad_left, i.e. phase (k - pad_left) % ratio.
    """
    filt = _filter(ratio, kernel_size)
    pad_left = kernel_size // 2 - int(kernel_size % 2 == 0)
    taps: list[list[tuple[int, float]]] = [[] for _ in range(ratio)]
    for k in range(kernel_size):
        d = k - pad_left
        taps[d % ratio].append((d // ratio, float(filt[k])))
    return taps


def _upsample_phases(
    x: Array,
    ratio: int,
    kernel_size: int,
    act: Callable[[Array], Array] | None = None,
    extend: tuple[int, int] = (0, 0),
    lengths: Array | None = None,
) -> list[Array]:
    """act(upsampled x) as its `ratio` phases, each (B, extend[0] + T + extend[1], C).

    The extension replicates the first sample of phase 0 on the left and the last sample of the
    last phase on the right, which is replicate padding of the interleaved signal.

    x is replicate-padded into a buffer written by a dynamic_update_slice, each phase is one loop
    over unpadded slices of that buffer, written into its extended buffer by another, and the
    extensions are written over its ends. On XLA:CPU that form matters: a pad fused into the
    filter loop costs ~10x, and the update-slices make XLA materialise the padded input and
    act(phase) once instead of fusing (and recomputing) them into every tap that reads them.

    ``lengths`` (B,): item b's phases on frames below lengths[b] are then those of x[b, :lengths[b]]
    alone, and so are the next extend[1] frames (what the downsampler reads for outputs below
    lengths[b]); later frames are unspecified (see :func:`_hold_item_ends`).
    """
    act = act or (lambda v: v)
    taps = _upsample_taps(ratio, kernel_size)
    lo, hi = _span(taps)
    b, t, c = x.shape
    e0, _ = extend
    edges = _extend(lax.full((b, t, c), 0, x.dtype), -lo, hi, x[:, :1], x[:, -1:])
    padded = lax.dynamic_update_slice_in_dim(edges, x, -lo, axis=1)
    ends = None
    if lengths is not None:
        padded, ends = _hold_item_ends(x, padded, taps, lengths, act, lo, hi)
    zeros = lax.full((b, e0 + t + extend[1], c), 0, x.dtype)
    phases = []
    for pt in taps:
        phase = act(_slice_sum([(padded, pt)], -lo, t))
        phases.append(lax.dynamic_update_slice_in_dim(zeros, phase, e0, axis=1))
    return _write_extensions(phases, padded, taps, act, lo, extend, ends)


def _hold_item_ends(x: Array, padded: Array, taps, lengths: Array, act, lo: int, hi: int):
    """(padded with each item's replicate padding, (ends (B, 1), each item's last upsampled sample)).

    Each item's replicate pads are written over the few frames past its end that its valid outputs
    read: x's last frame into the padded buffer (the upsampler's taps reach ``hi`` frames past the
    end); the last upsampled sample, from one small gather, goes into each phase buffer later."""
    t = x.shape[1]
    end = jnp.clip(jnp.asarray(lengths, jnp.int32), 1, t)[:, None]  # (B, 1); empty items: unspecified
    # x at the frames that the last phase's taps read at the item's frame end - 1, with the
    # item's replicate padding, then at end - 1 itself.
    offsets = np.asarray([o for o, _ in taps[-1]] + [0], np.int32)
    frames = jnp.clip(end - 1 + offsets[None, :], 0, end - 1)
    window = jnp.take_along_axis(x, frames[:, :, None], axis=1, mode=_IN_BOUNDS)
    last = act(_slice_sum([(window, [(i, coef) for i, (_, coef) in enumerate(taps[-1])])], 0, 1))
    if hi:  # item i alone reads x[i, end - 1] at frames end .. end + hi - 1
        padded = _write_rows(padded, _broadcast_rows(window[:, -1:], hi), end[:, 0] - lo)
    return padded, (end, last)


def _write_extensions(phases: list[Array], padded: Array, taps, act, lo: int, extend, ends) -> list[Array]:
    """The phases with their extensions: the interleaved signal's first sample (phase 0 at frame 0)
    on the left, its last one on the right. With ``ends`` (from :func:`_hold_item_ends`) the left one
    is computed from its few frames of ``padded`` (slicing a phase there made XLA fuse the whole
    phase into the fill), and each item's last sample is written at its frames end .. end + e1 - 1."""
    e0, e1 = extend
    t = phases[0].shape[1] - e0 - e1
    fills = []
    if e0:
        if ends is None:
            first = phases[0][:, e0 : e0 + 1]
        else:
            first = act(_slice_sum([(padded, [(o, coef) for o, coef in taps[0]])], -lo, 1))
        fills.append((_broadcast_rows(first, e0), 0))
    if e1 and ends is None:
        fills.append((_broadcast_rows(phases[-1][:, e0 + t - 1 : e0 + t], e1), e0 + t))
    out = []
    for phase in phases:
        for fill, at in fills:
            phase = lax.dynamic_update_slice_in_dim(phase, fill, at, axis=1)
        if ends is not None and e1:
            phase = _write_rows(phase, _broadcast_rows(ends[1], e1), ends[0][:, 0] + e0)
        out.append(phase)
    return out


def _write_rows(x: Array, rows: Array, starts: Array) -> Array:
    """x (B, T, C) with rows (B, n, C) written at frames starts[b] .. starts[b] + n - 1 of each item
    (starts in range). One item: a dynamic_update_slice; several: one scatter, since an update-slice
    per item grows the acoustic encoder's compile time with the batch size."""
    if x.shape[0] == 1:
        return lax.dynamic_update_slice(x, rows, (jnp.int32(0), starts[0], jnp.int32(0)))
    items = np.arange(x.shape[0], dtype=np.int32)[:, None]
    frames = starts[:, None] + np.arange(rows.shape[1], dtype=np.int32)[None, :]
    return x.at[items, frames].set(rows, mode=_IN_BOUNDS, unique_indices=True)


def upsample1d(x: Array, ratio: int = 2, kernel_size: int | None = None) -> Array:
    """Reference `Xcodec2UpSample1d`: (B, T, C) → (B, ratio·T, C)."""
    if kernel_size is None:
        kernel_size = int(6 * ratio // 2) * 2
    b, t, c = x.shape
    return jnp.stack(_upsample_phases(x, ratio, kernel_size), axis=2).reshape(b, t * ratio, c)


def downsample1d(x: Array, ratio: int = 2, kernel_size: int = 12) -> Array:
    """Reference `Xcodec2DownSample1d`: (B, L, C) → (B, (L - 1) // ratio + 1, C)."""
    length = x.shape[1]
    t = -(-length // ratio)
    first, last = x[:, :1], x[:, -1:]
    # Past the end the reference's replicate pad reads the last sample again.
    x = _extend(x, 0, t * ratio - length, first, last)
    taps = _downsample_taps(ratio, kernel_size)
    lo, hi = _span(taps)
    sources = [(_extend(x[:, p::ratio], -lo, hi, first, last), pt) for p, pt in enumerate(taps)]
    return _slice_sum(sources, -lo, t)


def sin_squared(y: Array) -> Array:
    """sin(y)², float32, max abs error ~1.2e-7 (the library sine's is ~1e-7), vectorisable.

    Reduction by π/2 with a four-part Cody-Waite split (each part's product with the quotient is
    exact for |y| up to ~1e5), then the Cephes sinf polynomial on [-π/4, π/4]; odd quotients take
    cos² = 1 - sin², written as |odd - s²| to avoid an integer parity test that blocks
    vectorisation.
    """
    f32 = np.float32
    q = lax.round(lax.mul(y, f32(2 / np.pi)), lax.RoundingMethod.TO_NEAREST_EVEN)
    r = y
    for part in (1.5703125, 4.837512969970703e-4, 7.549533620476723e-8, 2.5632829192545614e-12):
        r = lax.sub(r, lax.mul(q, f32(part)))
    z = lax.mul(r, r)
    poly = lax.add(
        f32(-1.6666654611e-1), lax.mul(z, lax.add(f32(8.3321608736e-3), lax.mul(z, f32(-1.9515295891e-4))))
    )
    s = lax.add(r, lax.mul(lax.mul(r, z), poly))
    odd = lax.sub(q, lax.mul(f32(2), lax.floor(lax.mul(q, f32(0.5)))))
    return lax.abs(lax.sub(odd, lax.mul(s, s)))


def snake_scales(alpha: Array, beta: Array) -> tuple[Array, Array]:
    """Per-channel (exp(alpha), 1 / (exp(beta) + 1e-9)) in float32, as the reference computes."""
    alpha = alpha.astype(jnp.float32)
    beta = beta.astype(jnp.float32)
    return jnp.exp(alpha), 1.0 / (jnp.exp(beta) + _NO_DIV_BY_ZERO)


def snake_beta_scaled(x: Array, freq: Array, inv_mag: Array) -> Array:
    """x + inv_mag · sin(freq · x)², evaluated in float32 (the sine's range reduction needs it)."""
    x32 = x.astype(jnp.float32)
    return (x32 + inv_mag * sin_squared(x32 * freq)).astype(x.dtype)


def snake_beta(x: Array, alpha: Array, beta: Array) -> Array:
    """Reference SnakeBeta: x + 1/(exp(beta) + 1e-9) · sin(exp(alpha) · x)², channels last."""
    return snake_beta_scaled(x, *snake_scales(alpha, beta))


def anti_aliased(
    x: Array,
    act: Callable[[Array], Array],
    ratio: int = 2,
    kernel_size: int = 12,
    lengths: Array | None = None,
) -> Array:
    """Reference `Xcodec2AntiAliasedActivation1d` with equal up/down ratios and kernels, fused.

    The activation runs on the `ratio` phases of the upsampled signal and the strided
    downsampler reads those phases directly, so the ratio·T signal is never interleaved. The
    phases come already extended by the downsampler's replicate pad, so the output is a single
    loop over unpadded slices.

    `lengths` (B,), optional: item b's first lengths[b] outputs are then those of x[b, :lengths[b]]
    run alone; both replicate pads are re-applied at that end. Later outputs are unspecified (a
    caller zeroes them before a convolution reads them, as the acoustic encoder does). The
    re-paddings write a few frames past each item's end into buffers built anyway (see
    `_upsample_phases`), so exact padding adds no pass over the signal.
    """
    taps = _downsample_taps(ratio, kernel_size)
    lo, hi = _span(taps)
    phases = _upsample_phases(x, ratio, kernel_size, act, extend=(-lo, hi), lengths=lengths)
    return _slice_sum(list(zip(phases, taps, strict=True)), -lo, x.shape[1])


class SnakeBeta(nn.Module):
    """Reference `Xcodec2SnakeBeta` on (..., C); params `alpha`, `beta` (C,), log-scale, init 0."""

    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.alpha = self.param("alpha", nn.initializers.zeros, (self.features,), jnp.float32)
        self.beta = self.param("beta", nn.initializers.zeros, (self.features,), jnp.float32)

    def scales(self) -> tuple[Array, Array]:
        return snake_scales(self.alpha, self.beta)

    def __call__(self, x: Array) -> Array:
        return snake_beta_scaled(x.astype(self.dtype), *self.scales())


class AntiAliasedSnakeBeta(nn.Module):
    """Reference `Xcodec2AntiAliasedActivation1d(Xcodec2SnakeBeta(C))`; params live under `act`."""

    features: int
    ratio: int = 2
    kernel_size: int = 12
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.act = SnakeBeta(self.features, dtype=self.dtype)

    def __call__(self, x: Array, lengths: Array | None = None) -> Array:
        # The activation is applied to several pieces; its per-channel scales are computed once.
        freq, inv_mag = self.act.scales()
        if self.is_initializing():
            # Initialisation only creates parameters, and none depends on this output, whose shape
            # is x's: skipping the resamplers halves the trace behind the loaders' shape check.
            return x.astype(self.dtype)
        return anti_aliased(
            x.astype(self.dtype),
            lambda u: snake_beta_scaled(u, freq, inv_mag),
            self.ratio,
            self.kernel_size,
            lengths,
        )
