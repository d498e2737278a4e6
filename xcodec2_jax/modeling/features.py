"""X-Codec2 feature extraction: padded audio for the acoustic encoder and kaldi log-mel features for the
semantic encoder, in numpy (``Xcodec2FeatureExtractor``) and in pure JAX (``fbank_features_jax``).

Both paths reproduce transformers' ``Xcodec2FeatureExtractor`` (which calls torchaudio's
``compliance.kaldi.fbank`` once per item): 25 ms povey frames every 10 ms, DC removal, pre-emphasis 0.97,
512-point power spectrum, 80 kaldi mel bins from 20 Hz to 8 kHz, log floored at float32 eps, per-item
normalisation with the unbiased variance, padding with 1.0 and stacking of frame pairs into 160-dim vectors.
Instead of a loop per item, all items are framed over the common padded length and the frames past each
item's own length are masked out, which gives the same numbers because those frames never enter the
per-item statistics and the reference replaces them with padding anyway.
"""

from __future__ import annotations

import functools
import json
import numbers
import os

import jax
import jax.numpy as jnp
import numpy as np

from ..utils.files import atomic_write_json
from ..utils.hub import resolve_checkpoint

SAMPLING_RATE = 16000
NUM_MEL_BINS = 80
# transformers' file name for a feature extractor's settings.
PREPROCESSOR_CONFIG = "preprocessor_config.json"
SETTINGS = ("feature_size", "sampling_rate", "padding_value", "hop_length")
FRAME_LENGTH = 400  # 25 ms
FRAME_SHIFT = 160  # 10 ms
N_FFT = 512  # kaldi rounds the frame length up to a power of two
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
STRIDE = 2
# torchaudio's kaldi.fbank floors mel energies at float32 eps before the log, so silence gives log(eps)
# rather than -inf (transformers' numpy path uses the same floor).
LOG_FLOOR = float(np.finfo(np.float32).eps)
NORM_EPS = 1e-7
# Bounds the numpy path's float64 frame buffers (frames x 512) to about 35 MB per chunk of items.
_NUMPY_FRAME_BUDGET = 1 << 13


def povey_window(length: int = FRAME_LENGTH) -> np.ndarray:
    """Kaldi's povey window: a symmetric Hann window raised to 0.85, float64 of shape (length,)."""
    n = np.arange(length)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / (length - 1))) ** 0.85


def kaldi_mel_filter_bank(
    num_bins: int = NUM_MEL_BINS,
    n_fft: int = N_FFT,
    sampling_rate: int = SAMPLING_RATE,
    low_freq: float = LOW_FREQ,
    high_freq: float | None = None,
) -> np.ndarray:
    """Kaldi's triangular mel filters (triangles in mel space, mel = 1127 ln(1 + f/700)), float64 of shape
    (n_fft // 2 + 1, num_bins), to right-multiply a power spectrum."""
    high_freq = sampling_rate / 2 if high_freq is None else high_freq

    def mel(freq):
        return 1127.0 * np.log(1.0 + np.asarray(freq, np.float64) / 700.0)

    mel_low, mel_high = mel(low_freq), mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    left = mel_low + delta * np.arange(num_bins)
    center, right = left + delta, left + 2 * delta
    bin_mel = mel(sampling_rate / n_fft * np.arange(n_fft // 2))[:, None]
    banks = np.maximum(
        0.0, np.minimum((bin_mel - left) / (center - left), (right - bin_mel) / (right - center))
    )
    # Kaldi builds the banks over n_fft/2 bins and gives the Nyquist bin zero weight.
    return np.concatenate([banks, np.zeros((1, num_bins))], axis=0)


@functools.cache
def fbank_constants() -> tuple[np.ndarray, np.ndarray]:
    """(povey window (400,), kaldi mel filters (257, 80)), float64, computed once."""
    return povey_window(), kaldi_mel_filter_bank()


def round_up(n, multiple):
    """``n`` rounded up to a multiple of ``multiple`` (ints or integer arrays)."""
    return -(-n // multiple) * multiple


def kaldi_frame_count(valid, hop_length):
    """Frames kaldi's snip_edges framing gives for ``valid`` samples padded hop/2 zeros on each side."""
    total = valid + 2 * (hop_length // 2)
    return (total >= FRAME_LENGTH) * (1 + (total - FRAME_LENGTH) // FRAME_SHIFT)


def num_feature_frames(padded_length: int, hop_length: int = 320) -> int:
    """Number F of stacked 160-dim feature frames for audio padded to ``padded_length`` samples, i.e. the
    second dimension of ``input_features``; T'/320 for the default hop."""
    return -(-int(kaldi_frame_count(padded_length, hop_length)) // STRIDE)


def _check_hop(hop_length: int) -> None:
    # A multiple of 160 keeps the padded signal a whole number of frame shifts (gather-free framing), and
    # at least 320 gives every non-empty item the two frames the unbiased variance needs.
    if hop_length < 2 * FRAME_SHIFT or hop_length % FRAME_SHIFT:
        raise ValueError(f"hop_length must be a multiple of {FRAME_SHIFT} and at least 320, got {hop_length}")


def _preemphasised(frames, xp):
    frames = frames - frames.mean(axis=-1, keepdims=True)
    # Kaldi pre-emphasises the first sample against itself (replicate padding).
    return xp.concatenate(
        [frames[..., :1] * (1.0 - PREEMPHASIS), frames[..., 1:] - PREEMPHASIS * frames[..., :-1]], axis=-1
    )


def power_spectrum_numpy(frames, window):
    """Power spectrum (..., 257) of (..., 400) frames: DC removed, pre-emphasised, windowed."""
    spectrum = np.fft.rfft(_preemphasised(frames, np) * window, n=N_FFT)
    return spectrum.real**2 + spectrum.imag**2


# In float32 the FFT's rounding error, about eps x frame energy, swamps the weak bins below ~1 kHz of
# voices with little low-frequency energy (pre-emphasis further cuts them ~30x): 6e-4 off the float64
# features on the test speech. Those bins are instead computed as one matmul with DC removal,
# pre-emphasis and window folded into the DFT matrix (rounding then scales with the small weights
# of that matrix): 3e-5.
_DFT_BINS = 32


@functools.cache
def _low_bin_dft_matrix() -> np.ndarray:
    n = FRAME_LENGTH
    ops = np.eye(n) - 1.0 / n
    ops = (ops - PREEMPHASIS * np.concatenate([ops[:1], ops[:-1]])) * povey_window(n)[:, None]
    angle = 2.0 * np.pi * np.outer(np.arange(n), np.arange(_DFT_BINS)) / N_FFT
    return ops.T @ np.concatenate([np.cos(angle), -np.sin(angle)], axis=1)


def _power_jax(frames):
    spectrum = jnp.fft.rfft(
        _preemphasised(frames, jnp) * jnp.asarray(fbank_constants()[0], jnp.float32), n=N_FFT
    )
    low = _matmul_jax(frames, jnp.asarray(_low_bin_dft_matrix(), jnp.float32))
    low = low[..., :_DFT_BINS] ** 2 + low[..., _DFT_BINS:] ** 2
    return jnp.concatenate(
        [low, spectrum.real[..., _DFT_BINS:] ** 2 + spectrum.imag[..., _DFT_BINS:] ** 2], -1
    )


def _matmul_jax(a, b):
    # The default TPU/GPU matmul precision (bf16 passes) would cost ~1e-2 on log energies.
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _features(x, lengths, hop_length, padding_value, power_fn, mel_filters, xp, matmul):
    """Shared numpy/JAX body. x: (B, T) audio, zero past ``lengths``; T a multiple of hop_length."""
    batch, length = x.shape
    x = xp.pad(x, ((0, 0), (hop_length // 2, hop_length // 2))) * 2.0**15
    # Frame j spans shifts j, j+1 and half of j+2 (400 = 2.5 x 160), so three shifted views of the
    # signal cut into 160-sample blocks build all frames without a gather.
    blocks = x.reshape(batch, -1, FRAME_SHIFT)
    num_frames = blocks.shape[1] - 2
    rest = FRAME_LENGTH - 2 * FRAME_SHIFT
    frames = xp.concatenate([blocks[:, :-2], blocks[:, 1:-1], blocks[:, 2:, :rest]], axis=-1)
    logmel = xp.log(xp.maximum(matmul(power_fn(frames), mel_filters), LOG_FLOOR))

    # The reference computes each item's fbank on its length rounded up to the hop (capped at T).
    valid = xp.minimum(round_up(lengths, hop_length), length)
    counts = kaldi_frame_count(valid, hop_length)
    mask = xp.arange(num_frames)[None, :] < counts[:, None]
    weights = mask[..., None].astype(logmel.dtype)
    n = counts[:, None, None].astype(logmel.dtype)
    # Shifting by the first frame before averaging makes constant columns (silence: log(eps) everywhere)
    # normalise to exactly 0 instead of rounding noise amplified by 1/sqrt(1e-7).
    shift = logmel[:, :1]
    mean = shift + xp.sum((logmel - shift) * weights, axis=1, keepdims=True) / xp.maximum(n, 1.0)
    centered = (logmel - mean) * weights
    var = xp.sum(centered * centered, axis=1, keepdims=True) / xp.maximum(n - 1.0, 1.0)
    normed = xp.where(mask[..., None], centered / xp.sqrt(var + NORM_EPS), padding_value)

    if num_frames % STRIDE:
        normed = xp.pad(normed, ((0, 0), (0, 1), (0, 0)), constant_values=padding_value)
        mask = xp.pad(mask, ((0, 0), (0, 1)))
    stacked = normed.reshape(batch, -1, STRIDE * NUM_MEL_BINS).astype(xp.float32)
    stacked_mask = mask.reshape(batch, -1, STRIDE).all(axis=-1).astype(xp.int32)
    return stacked, stacked_mask


@functools.partial(jax.jit, static_argnames=("hop_length", "padding_value"))
def _fbank_features_jit(x, lengths, hop_length, padding_value):
    x = jnp.where(jnp.arange(x.shape[1])[None, :] < lengths[:, None], x, 0.0)
    mel_filters = jnp.asarray(fbank_constants()[1], jnp.float32)
    return _features(x, lengths, hop_length, padding_value, _power_jax, mel_filters, jnp, _matmul_jax)


def fbank_features_jax(input_values, lengths, *, hop_length: int = 320, padding_value: float = 1.0):
    """Semantic-encoder features from already padded audio, in JAX (float32, jit-compiled).

    Args:
        input_values: (B, T) or (B, 1, T) audio in [-1, 1], T a multiple of ``hop_length`` (what
            ``Xcodec2FeatureExtractor`` returns as ``input_values``).
        lengths: (B,) valid samples per item (``padding_mask.sum(-1)``); samples past them are ignored.
            A length of 0 gives an all-padding item (features ``padding_value``, mask 0), handy for
            filling a fixed-size batch.

    Returns:
        ``(input_features, input_features_mask)``: float32 (B, F, 160) and int32 (B, F) with
        F = ``num_feature_frames(T, hop_length)``, equal to the numpy extractor's outputs.

    The computation depends on ``lengths`` only through masks, so it compiles once per (B, T) whatever the
    lengths; it can also be called inside another ``jit`` or ``vmap``-ed over a leading axis.
    """
    _check_hop(hop_length)
    x = jnp.asarray(input_values, jnp.float32)
    if x.ndim == 3 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 2 or x.shape[1] % hop_length:
        raise ValueError(
            f"expected padded audio (B, T) or (B, 1, T) with T a multiple of {hop_length}, "
            f"got shape {tuple(jnp.shape(input_values))}"
        )
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (x.shape[0],):
        raise ValueError(f"lengths must have shape ({x.shape[0]},), got {lengths.shape}")
    return _fbank_features_jit(x, lengths, hop_length=hop_length, padding_value=float(padding_value))


class Xcodec2FeatureExtractor:
    """Numpy counterpart of transformers' ``Xcodec2FeatureExtractor`` (same outputs, no torch/torchaudio).

    ``__call__`` returns a dict of numpy arrays:

    - ``input_values`` float32 (B, 1, T'): each item plus one trailing zero sample, zero-padded to the
      longest item (or to ``max_length`` with ``padding="max_length"``), then to a multiple of hop_length;
    - ``padding_mask`` int32 (B, T'): 1 over each item's samples, including the appended zero;
    - ``input_features`` float32 (B, F, 160): normalised kaldi log-mel frames stacked in pairs, F =
      ``num_feature_frames(T')``; padding frames hold ``padding_value``;
    - ``input_features_mask`` int32 (B, F): 1 where both frames of a pair are valid.

    Differences from the reference, all where it fails or gives unusable output:
    ``padding=False`` (it raises KeyError) and items longer than ``max_length`` with
    ``padding="max_length"`` and no truncation (it cannot stack them) raise ValueError; with
    ``padding="max_length"`` the reference also pads the feature frames to ``max_length`` frames, a
    sample count, which no longer lines up with the acoustic frames, so here they always number
    F = T'/320; 2-D (1, T) items, which the reference's fbank rejects, are taken as mono; and all-zero
    audio gives exactly 0 features where the reference gives float32 rounding noise (~3e-3).
    """

    model_input_names = ["input_features", "input_values", "padding_mask", "input_features_mask"]

    def __init__(self, feature_size=80, sampling_rate=16000, padding_value=1.0, hop_length=320):
        if feature_size != NUM_MEL_BINS or sampling_rate != SAMPLING_RATE:
            raise ValueError(
                f"the X-Codec2 fbank is fixed at {NUM_MEL_BINS} mel bins and {SAMPLING_RATE} Hz, got "
                f"feature_size={feature_size}, sampling_rate={sampling_rate}"
            )
        _check_hop(hop_length)
        self.feature_size = feature_size
        self.sampling_rate = sampling_rate
        self.padding_value = float(padding_value)
        self.hop_length = hop_length
        self.window, self.mel_filters = fbank_constants()

    def __repr__(self):
        return (
            f"{type(self).__name__}(feature_size={self.feature_size}, sampling_rate={self.sampling_rate}, "
            f"padding_value={self.padding_value}, hop_length={self.hop_length})"
        )

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None
    ) -> Xcodec2FeatureExtractor:
        """The extractor a checkpoint describes in its ``preprocessor_config.json`` (what transformers'
        ``save_pretrained`` writes and ``AutoFeatureExtractor.from_pretrained`` reads), from a local
        directory or a Hub repo id (downloaded as for ``Xcodec2Codec.from_pretrained``). OSError when
        the file is missing; ValueError when it names another extractor or settings this one lacks."""
        directory = resolve_checkpoint(path_or_repo_id, revision, cache_dir)
        path = os.path.join(directory, PREPROCESSOR_CONFIG)
        if not os.path.isfile(path):
            raise OSError(f"{directory}: no {PREPROCESSOR_CONFIG} (the feature extractor's settings)")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        kind = data.get("feature_extractor_type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"{path}: feature_extractor_type {kind!r}, not {cls.__name__}")
        return cls(
            **{
                k: data[k]
                for k in ("feature_size", "sampling_rate", "padding_value", "hop_length")
                if k in data
            }
        )

    def to_dict(self) -> dict:
        """The settings as transformers' ``Xcodec2FeatureExtractor`` writes them."""
        return {
            "feature_extractor_type": type(self).__name__,
            "feature_size": self.feature_size,
            "sampling_rate": self.sampling_rate,
            "padding_value": self.padding_value,
            "hop_length": self.hop_length,
            "padding_side": "right",
            "return_attention_mask": True,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``directory/preprocessor_config.json`` (see :meth:`from_pretrained`)."""
        atomic_write_json(os.path.join(os.fspath(directory), PREPROCESSOR_CONFIG), self.to_dict())

    def num_feature_frames(self, padded_length: int) -> int:
        """F, the number of stacked feature frames for ``padded_length`` samples of padded audio."""
        return num_feature_frames(padded_length, self.hop_length)

    def jax_features(self, padded_audio, lengths):
        """``input_features`` and ``input_features_mask`` in JAX; see ``fbank_features_jax``."""
        return fbank_features_jax(
            padded_audio, lengths, hop_length=self.hop_length, padding_value=self.padding_value
        )

    def _as_items(self, audio) -> list[np.ndarray]:
        if isinstance(audio, (list, tuple)):
            if len(audio) == 0:
                raise ValueError("expected audio, got an empty list")
            items = [audio] if all(isinstance(a, numbers.Real) for a in audio) else list(audio)
        else:
            items = [audio]
        out = []
        for i, item in enumerate(items):
            a = np.asarray(item)
            if a.ndim == 2 and a.shape[0] == 1:
                a = a[0]
            if a.ndim != 1:
                raise ValueError(
                    f"item {i}: expected mono audio of shape (T,) or (1, T), got shape {a.shape}"
                    " (pass a list of arrays for a batch)"
                )
            if a.size == 0:
                raise ValueError(f"item {i}: empty audio")
            if not np.issubdtype(a.dtype, np.floating):
                raise ValueError(
                    f"item {i}: expected floating-point audio in [-1, 1], got dtype {a.dtype}"
                    " (divide 16-bit PCM by 32768)"
                )
            a = a.astype(np.float32)
            if not np.isfinite(a).all():
                raise ValueError(f"item {i}: audio contains NaN or Inf")
            out.append(a)
        return out

    # long: the reference's padding and truncation rules, each with its own error message
    def __call__(self, audio, sampling_rate=16000, padding=True, max_length=None, truncation=False):
        """Pad ``audio`` (a 1-D array, a (1, T) array, or a list of them) and compute the features.

        ``padding``: True/"longest" pads to the longest item; "max_length" to ``max_length`` (samples).
        ``truncation`` with ``max_length`` cuts items (after the appended zero) to ``max_length`` rounded
        up to hop_length, as the reference does. Returns the dict described in the class docstring.
        """
        if sampling_rate != self.sampling_rate:
            raise ValueError(
                f"audio must be sampled at {self.sampling_rate} Hz, got {sampling_rate} Hz; "
                f"resample it first, e.g. soxr.resample(audio, {sampling_rate}, {self.sampling_rate})"
            )
        hop = self.hop_length
        items = self._as_items(audio)
        lengths = np.array([len(a) + 1 for a in items], np.int64)
        if truncation:
            if max_length is None:
                raise ValueError("truncation=True needs max_length")
            lengths = np.minimum(lengths, round_up(max_length, hop))
        if padding is True or padding == "longest":
            target = round_up(int(lengths.max()), hop)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError('padding="max_length" needs max_length')
            target = round_up(max_length, hop)
            for i in np.flatnonzero(lengths > target):
                raise ValueError(
                    f"item {i}: {lengths[i] - 1} samples plus the appended zero exceed max_length="
                    f"{max_length} (rounded up to {target}); pass truncation=True or a larger max_length"
                )
        else:
            raise ValueError(
                f'padding must be True, "longest" or "max_length", got {padding!r} (the model '
                f"needs audio padded to a multiple of {hop} samples)"
            )

        input_values = np.zeros((len(items), target), np.float32)
        for row, a, n in zip(input_values, items, lengths, strict=True):
            row[: min(len(a), n)] = a[:n]
        padding_mask = (np.arange(target)[None, :] < lengths[:, None]).astype(np.int32)

        power = functools.partial(power_spectrum_numpy, window=self.window)
        chunk = max(1, _NUMPY_FRAME_BUDGET // max(1, target // FRAME_SHIFT))
        outs = [
            _features(
                input_values[s : s + chunk].astype(np.float64),
                lengths[s : s + chunk],
                hop,
                self.padding_value,
                power,
                self.mel_filters,
                np,
                np.matmul,
            )
            for s in range(0, len(items), chunk)
        ]
        return {
            "input_values": input_values[:, None, :],
            "padding_mask": padding_mask,
            "input_features": np.concatenate([o[0] for o in outs]),
            "input_features_mask": np.concatenate([o[1] for o in outs]),
        }
