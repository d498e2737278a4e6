"""Reconstruction losses for codec training: multi-resolution STFT and log-mel L1, in JAX.

``multi_resolution_stft_loss`` mirrors ``auraloss.freq.MultiResolutionSTFTLoss()`` with its defaults
(FFT sizes 1024/2048/512, hops 120/240/50, windows 600/1200/240, periodic Hann, spectral convergence
+ L1 of log magnitudes, averaged over resolutions); ``mel_loss`` is the L1 distance of log mel
magnitude spectrograms, as Vocos (the decoder X-Codec2 builds on) trains with: torchaudio's
``MelSpectrogram`` defaults (power 1, HTK mel scale, no filter normalisation) and ``log(clamp(., 1e-7))``.

Both follow ``torch.stft(center=True, pad_mode="reflect")``: the signal is reflect-padded by
``fft_size // 2`` each side, and a window shorter than the FFT is zero-padded on both sides. All of
it runs in float32 whatever the model's compute dtype: the FFT and the log amplify rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MRSTFT_FFT_SIZES = (1024, 2048, 512)
MRSTFT_HOP_SIZES = (120, 240, 50)
MRSTFT_WIN_LENGTHS = (600, 1200, 240)


@functools.lru_cache(maxsize=32)
def _padded_hann(fft_size: int, win_length: int) -> np.ndarray:
    """torch.hann_window(win_length) (periodic), centred in ``fft_size`` zeros as torch.stft does."""
    if win_length > fft_size:
        raise ValueError(f"win_length {win_length} exceeds fft_size {fft_size}")
    n = np.arange(win_length)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / win_length)
    left = (fft_size - win_length) // 2
    return np.pad(window, (left, fft_size - win_length - left)).astype(np.float32)


def _as_batch(x) -> jnp.ndarray:
    """(T,), (B, T) or (B, C, T) -> (B·C, T) float32, as auraloss flattens channels into the batch."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 1:
        x = x[None]
    return x.reshape(-1, x.shape[-1])


def _spectrum(x, fft_size: int, hop_size: int, win_length: int) -> jnp.ndarray:
    """Complex one-sided STFT (B, frames, fft_size // 2 + 1), framed as torch.stft(center=True)."""
    x = _as_batch(x)
    pad = fft_size // 2
    if x.shape[-1] <= pad:
        raise ValueError(f"audio of {x.shape[-1]} samples is too short for an FFT of {fft_size}")
    x = jnp.pad(x, ((0, 0), (pad, pad)), mode="reflect")
    frames = 1 + (x.shape[-1] - fft_size) // hop_size
    index = np.arange(frames)[:, None] * hop_size + np.arange(fft_size)[None, :]
    return jnp.fft.rfft(x[:, index] * jnp.asarray(_padded_hann(fft_size, win_length)), axis=-1)


def stft_magnitude(x, fft_size: int, hop_size: int, win_length: int | None = None, eps: float = 1e-8):
    """|STFT| of (B, T) audio, (B, fft_size // 2 + 1, frames), clamped as auraloss: sqrt(max(|X|², eps))."""
    spec = _spectrum(x, fft_size, hop_size, fft_size if win_length is None else win_length)
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    return jnp.swapaxes(jnp.sqrt(jnp.maximum(power, eps)), -1, -2)


def _safe_norm(a):
    """Frobenius norm with a zero gradient at zero (torch's), where sqrt's would be NaN."""
    s = jnp.sum(a * a)
    positive = s > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)


def stft_loss(x, y, fft_size: int = 1024, hop_size: int = 256, win_length: int = 1024):
    """auraloss ``STFTLoss`` (defaults): spectral convergence over the whole batch + mean L1 of log |STFT|.

    ``x`` is the prediction, ``y`` the target; both (T,), (B, T) or (B, C, T)."""
    x_mag = stft_magnitude(x, fft_size, hop_size, win_length)
    y_mag = stft_magnitude(y, fft_size, hop_size, win_length)
    sc = _safe_norm(y_mag - x_mag) / _safe_norm(y_mag)
    log_mag = jnp.mean(jnp.abs(jnp.log(x_mag) - jnp.log(y_mag)))
    return sc + log_mag


def multi_resolution_stft_loss(
    x,
    y,
    fft_sizes: Sequence[int] = MRSTFT_FFT_SIZES,
    hop_sizes: Sequence[int] = MRSTFT_HOP_SIZES,
    win_lengths: Sequence[int] = MRSTFT_WIN_LENGTHS,
):
    """auraloss ``MultiResolutionSTFTLoss()``: :func:`stft_loss` averaged over the resolutions."""
    if not len(fft_sizes) == len(hop_sizes) == len(win_lengths) or not fft_sizes:
        raise ValueError("fft_sizes, hop_sizes and win_lengths must be non-empty and of equal length")
    losses = [stft_loss(x, y, f, h, w) for f, h, w in zip(fft_sizes, hop_sizes, win_lengths, strict=True)]
    return sum(losses) / len(losses)


@functools.lru_cache(maxsize=16)
def mel_filter_bank(
    sample_rate: int, fft_size: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None
) -> np.ndarray:
    """(fft_size // 2 + 1, n_mels) triangular HTK-scale filters, unnormalised (torchaudio's
    ``melscale_fbanks`` defaults): triangles spaced evenly in mel, evaluated on the FFT bins in Hz."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, f_max={f_max}")
    bins = np.linspace(0, sample_rate / 2, fft_size // 2 + 1)

    def to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    mels = np.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2)
    hz = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    slopes = hz[None, :] - bins[:, None]  # (bins, n_mels + 2)
    widths = np.diff(hz)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(down, up)).astype(np.float32)


def mel_spectrogram(
    x, sample_rate: int = 16000, fft_size: int = 1024, hop_size: int = 256, n_mels: int = 100
):
    """Mel magnitude spectrogram (power 1), (B, n_mels, frames), of (T,), (B, T) or (B, C, T) audio."""
    spec = _spectrum(x, fft_size, hop_size, fft_size)
    # The magnitude's gradient at an exactly zero bin is NaN; the tiny floor keeps it finite and is
    # far below the log's 1e-7 clamp.
    magnitude = jnp.sqrt(jnp.real(spec) ** 2 + jnp.imag(spec) ** 2 + 1e-20)
    fb = jnp.asarray(mel_filter_bank(sample_rate, fft_size, n_mels))
    mel = jnp.einsum("btf,fm->bmt", magnitude, fb, precision=jax.lax.Precision.HIGHEST)
    return mel


def mel_loss(x, y, sample_rate: int = 16000, fft_size: int = 1024, hop_size: int = 256, n_mels: int = 100):
    """Mean L1 distance of log(clamp(mel, 1e-7)) of prediction ``x`` and target ``y`` (Vocos's mel loss)."""

    def log_mel(a):
        return jnp.log(jnp.maximum(mel_spectrogram(a, sample_rate, fft_size, hop_size, n_mels), 1e-7))

    return jnp.mean(jnp.abs(log_mel(x) - log_mel(y)))


# ---------------------------------------------------------------------------------------------------
# X-Codec2's GAN training recipe (X-Codec-2.0's criterions/ and lightning_module.py): the
# multi-resolution mel loss, LSGAN adversarial losses and feature matching.
# ---------------------------------------------------------------------------------------------------

# criterions/mel_loss.py's MultiResolutionMelSpectrogramLoss defaults: hop = window / 4, FFT = window.
MEL_LOSS_N_MELS = (5, 10, 20, 40, 80, 160, 320)
MEL_LOSS_WINDOW_LENGTHS = (32, 64, 128, 256, 512, 1024, 2048)

# The Slaney (Auditory Toolbox) mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic above
# (27 mels per factor 6.4).
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = np.log(6.4) / 27.0


def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, np.float64)
    log_part = (
        _SLANEY_BREAK_MEL + np.log(np.maximum(hz, _SLANEY_BREAK_HZ) / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP
    )
    return np.where(hz >= _SLANEY_BREAK_HZ, log_part, hz / _SLANEY_HZ_PER_MEL)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    log_part = _SLANEY_BREAK_HZ * np.exp(
        _SLANEY_LOG_STEP * (np.maximum(mel, _SLANEY_BREAK_MEL) - _SLANEY_BREAK_MEL)
    )
    return np.where(mel >= _SLANEY_BREAK_MEL, log_part, mel * _SLANEY_HZ_PER_MEL)


@functools.lru_cache(maxsize=32)
def slaney_mel_filter_bank(
    sample_rate: int, fft_size: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None
) -> np.ndarray:
    """torchaudio's ``melscale_fbanks(norm="slaney", mel_scale="slaney")``, as its ``MelSpectrogram``
    builds it, computed in float64.

    Triangles spaced evenly on the Slaney mel scale between ``f_min`` and ``f_max`` (default
    ``sample_rate // 2``), evaluated at the FFT bins (spread over 0 .. ``sample_rate // 2`` Hz, integer
    division as torchaudio's), each scaled by 2 / (its width in Hz) so that all have equal area.

    Returns:
        (fft_size // 2 + 1, n_mels) float32.
    """
    f_max = float(sample_rate // 2) if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, f_max={f_max}")
    bins = np.linspace(0, sample_rate // 2, fft_size // 2 + 1)
    hz = _slaney_mel_to_hz(np.linspace(_hz_to_slaney_mel(f_min), _hz_to_slaney_mel(f_max), n_mels + 2))
    slopes = hz[None, :] - bins[:, None]  # (bins, n_mels + 2)
    widths = np.diff(hz)
    triangles = np.maximum(0.0, np.minimum(-slopes[:, :-2] / widths[:-1], slopes[:, 2:] / widths[1:]))
    return (triangles * (2.0 / (hz[2:] - hz[:-2]))).astype(np.float32)


def _log10_mel(x, sample_rate: int, window_length: int, n_mels: int, clamp_eps: float) -> jnp.ndarray:
    """log10(clamp(mel, clamp_eps)) of torchaudio's ``MelSpectrogram(n_fft=window_length,
    hop_length=window_length // 4, power=1, center=True, norm="slaney", mel_scale="slaney")``;
    (B, n_mels, frames)."""
    spec = _spectrum(x, window_length, window_length // 4, window_length)
    # The magnitude's gradient at an exactly zero bin is NaN; the tiny floor keeps it finite and is
    # far below the clamp.
    magnitude = jnp.sqrt(jnp.real(spec) ** 2 + jnp.imag(spec) ** 2 + 1e-20)
    fb = jnp.asarray(slaney_mel_filter_bank(sample_rate, window_length, n_mels))
    mel = jnp.einsum("btf,fm->bmt", magnitude, fb, precision=jax.lax.Precision.HIGHEST)
    return jnp.log10(jnp.maximum(mel, clamp_eps))


def multi_resolution_mel_loss(
    x,
    y,
    sample_rate: int = 16000,
    n_mels: Sequence[int] = MEL_LOSS_N_MELS,
    window_lengths: Sequence[int] = MEL_LOSS_WINDOW_LENGTHS,
    clamp_eps: float = 1e-5,
):
    """X-Codec-2.0's ``MultiResolutionMelSpectrogramLoss``: the mean L1 distance of log10 mel
    magnitudes, summed (not averaged) over the resolutions.

    Args:
        x: prediction, (T,), (B, T) or (B, C, T); T must exceed max(window_lengths) // 2.
        y: target, same shape.
        sample_rate: of the audio (the mel scale's Hz).
        n_mels, window_lengths: per resolution, the mel bands and the window (= FFT size; hop = window // 4).
        clamp_eps: floor of the mel magnitudes before the log.

    Returns:
        Scalar float32.
    """
    if len(n_mels) != len(window_lengths) or not n_mels:
        raise ValueError("n_mels and window_lengths must be non-empty and of equal length")
    loss = jnp.float32(0.0)
    for bands, window in zip(n_mels, window_lengths, strict=True):
        log_x = _log10_mel(x, sample_rate, window, bands, clamp_eps)
        log_y = _log10_mel(y, sample_rate, window, bands, clamp_eps)
        loss = loss + jnp.mean(jnp.abs(log_x - log_y))
    return loss


def _logits(output) -> jnp.ndarray:
    """A sub-discriminator's logits: the output itself, or the last of its list of layer outputs."""
    return jnp.asarray(output[-1] if isinstance(output, (list, tuple)) else output, jnp.float32)


def lsgan_discriminator_loss(real_outputs: Sequence, fake_outputs: Sequence):
    """LSGAN discriminator loss, as X-Codec-2.0's ``compute_disc_loss``: the sum over sub-discriminators
    of mean((D(real) - 1)²) + mean(D(fake)²), each mean over that sub-discriminator's logits.

    Args:
        real_outputs: per sub-discriminator, its logits on real audio, or its list of layer outputs
            (the last being the logits), as the discriminators return them.
        fake_outputs: the same on generated audio (the caller stops its gradient to the generator).

    Returns:
        Scalar float32 (the recipe's ``real_loss + fake_loss``, before ``lambda_disc``).
    """
    if len(real_outputs) != len(fake_outputs):
        raise ValueError(f"{len(real_outputs)} real outputs but {len(fake_outputs)} fake ones")
    loss = jnp.float32(0.0)
    for real, fake in zip(real_outputs, fake_outputs, strict=True):
        loss = loss + jnp.mean((_logits(real) - 1.0) ** 2) + jnp.mean(_logits(fake) ** 2)
    return loss


def lsgan_generator_loss(fake_outputs: Sequence):
    """LSGAN generator (adversarial) loss: the sum over sub-discriminators of mean((D(fake) - 1)²).

    Args:
        fake_outputs: per sub-discriminator, logits or list of layer outputs on generated audio.

    Returns:
        Scalar float32 (the recipe's ``adv_loss``, before ``lambda_adv``).
    """
    loss = jnp.float32(0.0)
    for fake in fake_outputs:
        loss = loss + jnp.mean((_logits(fake) - 1.0) ** 2)
    return loss


def feature_matching_loss(real_features: Sequence[Sequence], fake_features: Sequence[Sequence]):
    """Feature matching, as X-Codec-2.0's ``fm_loss``: the sum over sub-discriminators and their layers
    but the last (the logits) of mean |fake - real|; no gradient flows into the real features.

    Args:
        real_features: per sub-discriminator, its list of layer outputs on real audio.
        fake_features: the same on generated audio, with equal shapes.

    Returns:
        Scalar float32 (MPD's ``fm_loss`` + ``spec_fm_loss`` when both discriminators' lists are passed).
    """
    if len(real_features) != len(fake_features):
        raise ValueError(f"{len(real_features)} real feature lists but {len(fake_features)} fake ones")
    loss = jnp.float32(0.0)
    for real, fake in zip(real_features, fake_features, strict=True):
        if len(real) != len(fake):
            raise ValueError(f"a sub-discriminator has {len(real)} real layer outputs but {len(fake)} fake")
        for r, f in zip(real[:-1], fake[:-1], strict=True):
            r = jax.lax.stop_gradient(jnp.asarray(r, jnp.float32))
            loss = loss + jnp.mean(jnp.abs(jnp.asarray(f, jnp.float32) - r))
    return loss
