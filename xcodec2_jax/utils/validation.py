"""Every check of user input, in one place: each failure is one ``ValueError`` naming the argument,
the item or the file, what was wrong, and what is expected."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Plausible audio sampling rates: below 1 kHz or above 768 kHz is a mistake (a rate given in kHz,
# or samples passed as the rate), and a wrong rate silently turns seconds into minutes.
MIN_SAMPLING_RATE = 1_000
MAX_SAMPLING_RATE = 768_000
# A 2-D array is (samples, channels); this many channels at most.
MAX_CHANNELS = 16


def is_int(value: Any) -> bool:
    """True for Python and numpy integers, not for booleans."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int if it is a positive integer, else a ``ValueError`` naming ``name``."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def int_at_least(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int if it is an integer >= ``minimum``."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def finite_number(value: Any, name: str) -> float:
    """``value`` as a float if it is a finite real number (not a boolean)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def sampling_rate(value: Any, name: str = "sampling_rate") -> float:
    """A sampling rate in Hz within [1 kHz, 768 kHz]."""
    rate = finite_number(value, name)
    if not MIN_SAMPLING_RATE <= rate <= MAX_SAMPLING_RATE:
        raise ValueError(
            f"{name} must be an audio rate in Hz between {MIN_SAMPLING_RATE} and {MAX_SAMPLING_RATE}, "
            f"got {value!r}"
        )
    return rate


def audio_array(audio: Any, label: str = "audio") -> np.ndarray:
    """One item of audio as float32 mono in [-1, 1] (before resampling); ``label`` names it in errors.

    Integer PCM is scaled by its full range (int16 by 32768, int32 by 2^31, uint8 centred on 128).
    A 2-D array is (samples, channels) with at most :data:`MAX_CHANNELS` channels, or (channels,
    samples) when it has at most that many rows and more columns; channels are averaged. A 2-D
    shape that fits neither (more than 16 of both) is refused rather than guessed.
    """
    a = np.asarray(audio)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{label}: audio must be numeric, got dtype {a.dtype}")
    if a.ndim == 0 or a.ndim > 2:
        raise ValueError(
            f"{label}: audio must be 1-D (samples,) or 2-D (samples, channels), got shape {a.shape}"
        )
    if a.ndim == 2:
        a = _samples_by_channels(a, label)
    if a.size == 0:
        raise ValueError(f"{label}: audio is empty")
    if a.dtype.kind == "u":
        half = 2.0 ** (8 * a.dtype.itemsize - 1)
        a = (a.astype(np.float64) - half) / half
    elif a.dtype.kind == "i":
        a = a.astype(np.float64) / 2.0 ** (8 * a.dtype.itemsize - 1)
    a = a.astype(np.float32, copy=False)  # float32 input is read, never written: no copy of an hour
    if a.ndim == 2:
        a = a.mean(axis=1, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{label}: audio contains NaN or Inf")
    return a


def _samples_by_channels(a: np.ndarray, label: str) -> np.ndarray:
    rows, cols = a.shape
    if cols <= MAX_CHANNELS and rows >= cols:
        return a
    if rows <= MAX_CHANNELS and cols > rows:
        return a.T
    raise ValueError(
        f"{label}: cannot tell samples from channels in a 2-D array of shape {a.shape}: pass "
        f"(samples, channels) with at most {MAX_CHANNELS} channels, or a 1-D array of mono samples"
    )


def codes(values: Any, codebook_size: int, name: str = "codes") -> np.ndarray:
    """Integer codes in [0, ``codebook_size``) as an int32 array of the same shape; an empty array
    passes. The error names the first code out of range and its position."""
    arr = np.asarray(values)
    if arr.size == 0:
        return arr.astype(np.int32)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must have an integer dtype, got {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= codebook_size))
    if bad.size:
        i = int(bad[0])
        position = np.unravel_index(i, arr.shape) if arr.ndim > 1 else i
        raise ValueError(
            f"{name} must lie in [0, {codebook_size}): code {int(arr.reshape(-1)[i])} at position "
            f"{position} is outside ({bad.size} such codes; values found in [{arr.min()}, {arr.max()}])"
        )
    return arr.astype(np.int32)


def codebook_size(value: Any) -> int:
    return positive_int(value, "codebook_size")
