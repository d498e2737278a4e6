"""Audio in: files and arrays of any rate, channel count and sample type, as 16 kHz mono float32."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..utils import validation

SAMPLING_RATE = 16000


def prepare_audio(audio: Any, sampling_rate: Any, label: str = "audio") -> np.ndarray:
    """One item of audio as 16 kHz mono float32.

    Args:
        audio: (samples,) or (samples, channels) of any float or integer dtype (see
            :func:`xcodec2_jax.utils.validation.audio_array` for the layout and scaling rules).
        sampling_rate: its rate in Hz, 1 kHz to 768 kHz; other rates than 16 kHz are resampled (soxr).
        label: names the item in error messages (``"item 3"``, a file name).

    Returns:
        (samples at 16 kHz,) float32. Raises ``ValueError`` naming ``label`` for unusable audio.
    """
    rate = validation.sampling_rate(sampling_rate)
    a = validation.audio_array(audio, label)
    if rate != SAMPLING_RATE:
        import soxr

        a = soxr.resample(a, rate, SAMPLING_RATE).astype(np.float32)
        if a.size == 0:
            raise ValueError(f"{label}: audio is shorter than one sample at {SAMPLING_RATE} Hz")
    return a


def unreadable(error: Exception) -> ValueError:
    """The one-line ``ValueError`` for audio that cannot be read."""
    return ValueError(f"cannot read audio ({type(error).__name__}: {' '.join(str(error).split())})")


def decode_audio_file(source: Any) -> tuple[np.ndarray, int]:
    """(samples, rate) of an audio file (a path or a binary file object) as soundfile reads it;
    a one-line ``ValueError`` if it cannot be read."""
    import soundfile as sf

    try:
        return sf.read(source, dtype="float32", always_2d=False)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError ...
        raise unreadable(e) from None


def read_audio(source: Any) -> np.ndarray:
    """An audio file (a path or a binary file object) as 16 kHz mono float32 (:func:`prepare_audio`'s
    rules); a ``ValueError`` of one line says what is wrong with it."""
    audio, rate = decode_audio_file(source)
    return prepare_item(audio, rate)


def prepare_item(audio: Any, sampling_rate: Any) -> np.ndarray:
    """:func:`prepare_audio` of one item whose errors need no label (the caller names the file)."""
    try:
        return prepare_audio(audio, sampling_rate)
    except ValueError as e:
        raise ValueError(str(e).removeprefix("audio: ")) from None
