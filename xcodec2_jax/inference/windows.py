"""Long audio and long code sequences in overlapping windows, so memory stays bounded.

Neither half of X-Codec2 is local: the w2v-BERT encoder attends over the whole utterance and its
features are normalised per utterance, and the decoder's transformer is bidirectional. A recording
of an hour in one piece needs attention over 180,000 frames. Past ``max_window_seconds`` an item is
therefore cut into windows: each window's centre (its *core*) is kept, and ``context_seconds`` of
signal on each side let the core see what it would see in the whole. The cores tile the item
exactly, so the code count and the audio length rules are those of the one-piece codec. Windows are
ordinary items to the codec's batching: the windows of one file batch with other files' windows.

- Encode keeps each window's core codes (codes are discrete: nothing to blend). The semantic
  features are normalised per utterance (mean and variance of each mel bin over the whole item):
  a window normalised on its own statistics shifts every feature, which on the test speech changed
  over 60% of the codes. A window's features are therefore the whole item's own (its fbank frames
  cut from the item with their real neighbours, normalised with the item's statistics, which are
  accumulated chunk by chunk so memory stays bounded): only the encoders' reach past a window's edge
  differs from the one-piece encode.
- Decode blends neighbouring windows over ``crossfade_seconds`` around each core boundary with
  complementary raised-cosine weights (they sum to one), inside the overlap both windows decoded.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..modeling import features as F

# Chosen from the measurements in the README ("Long audio"): beyond these contexts the windowed
# codes / audio stop getting closer to the one-piece result.
DEFAULT_MAX_WINDOW_SECONDS = 30.0
DEFAULT_ENCODE_CONTEXT_SECONDS = 2.0
DEFAULT_DECODE_CONTEXT_SECONDS = 2.0
DEFAULT_CROSSFADE_SECONDS = 0.2


@dataclasses.dataclass(frozen=True)
class Window:
    """Codes ``[start, end)`` of item ``item`` are computed; those of ``[keep_start, keep_end)`` kept.
    Decoded audio blends with the neighbours over ``fade_left`` / ``fade_right`` samples on each
    side of the kept part's boundaries (0 at the item's ends)."""

    item: int
    start: int
    end: int
    keep_start: int
    keep_end: int
    fade_left: int = 0
    fade_right: int = 0


def to_codes(seconds: float | None, name: str, codes_per_second: float, minimum: int = 0) -> int | None:
    """A duration in seconds as a whole number of codes (None stays None: no limit)."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise ValueError(f"{name} must be a number of seconds, got {seconds!r}")
    codes = round(seconds * codes_per_second)
    if codes < minimum:
        raise ValueError(f"{name} must be at least {minimum / codes_per_second:g} s, got {seconds!r}")
    return codes


def plan(
    item: int, num_codes: int, window: int | None, context: int, hop: int = 1, fade: int = 0
) -> list[Window]:
    """Windows of at most ``window`` codes whose cores tile ``[0, num_codes)``, with ``context``
    codes on each side of a core where the item has them. One window if the item fits. ``fade``
    (samples, ``hop`` per code) is the crossfade wanted at each core boundary; it is shortened where
    the overlap or a core is shorter."""
    if window is None or num_codes <= window:
        return [Window(item, 0, num_codes, 0, num_codes)]
    core = window - 2 * context
    if core < 1:
        raise ValueError(
            f"a window of {window} codes leaves no core between two contexts of {context} codes: "
            "use a longer max_window_seconds or a shorter context_seconds"
        )
    count = math.ceil(num_codes / core)
    # Evenly spread boundaries: every core is at most `core` long and windows share a length bucket.
    bounds = [round(j * num_codes / count) for j in range(count + 1)]
    # Both windows at a boundary must use the same fade so their weights sum to one: the shortest of
    # the wanted fade, twice each side's decoded overlap, and each neighbouring core.
    halves = [0] * (count + 1)
    for j in range(1, count):
        b = bounds[j]
        overlap = min(min(num_codes, b + context) - b, b - max(0, b - context))
        shortest_core = min(b - bounds[j - 1], bounds[j + 1] - b)
        halves[j] = min(fade // 2, overlap * hop, shortest_core * hop // 2)
    return [
        Window(item, max(0, lo - context), min(num_codes, hi + context), lo, hi, halves[j], halves[j + 1])
        for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]


def window_audio(audio: np.ndarray, w: Window, hop: int) -> np.ndarray:
    """The samples a window encodes: codes ``[start, end)`` cover samples ``[start·hop, end·hop)``, the
    last window ending where the audio does (a view, nothing copied)."""
    return audio[w.start * hop : w.end * hop]


def add_decoded(out: np.ndarray, audio: np.ndarray, w: Window, hop: int) -> None:
    """Add window ``w``'s decoded ``audio`` (its ``(end - start)·hop`` samples) into the item's ``out``,
    weighted to blend with its neighbours (complementary weights: they sum to one)."""
    lo, hi = w.keep_start * hop - w.fade_left, w.keep_end * hop + w.fade_right
    weight = np.ones(hi - lo, np.float32)
    if w.fade_left:
        weight[: 2 * w.fade_left] = _ramp(2 * w.fade_left)
    if w.fade_right:
        weight[-2 * w.fade_right :] = 1.0 - _ramp(2 * w.fade_right)
    offset = w.start * hop
    out[lo:hi] += weight * audio[lo - offset : hi - offset]


def _ramp(n: int) -> np.ndarray:
    """Raised-cosine rise over ``n`` samples; the neighbour's fall is exactly ``1 - ramp``."""
    return (np.sin(0.5 * np.pi * (np.arange(n) + 0.5) / n) ** 2).astype(np.float32)


# Fbank frames per chunk while accumulating an item's statistics: float64 frames x 512, ~80 MB.
_STATS_CHUNK_FRAMES = 20000


def _logmel(audio: np.ndarray, first: int, last: int) -> np.ndarray:
    """Log-mel energies (last - first, 80) of the fbank frames [first, last) the extractor computes
    for ``audio`` alone: frame j covers samples [j·shift - hop/2, ... + 400) of the zero-extended
    item (the extractor pads hop/2 = 160 zeros in front)."""
    shift = F.FRAME_SHIFT
    lo, hi = first * shift - shift, (last + 2) * shift - shift
    x = np.zeros(hi - lo, np.float64)
    a, b = max(lo, 0), min(hi, len(audio))
    if b > a:
        x[a - lo : b - lo] = audio[a:b]
    blocks = (x * 2.0**15).reshape(-1, shift)
    rest = F.FRAME_LENGTH - 2 * shift
    frames = np.concatenate([blocks[:-2], blocks[1:-1], blocks[2:, :rest]], axis=-1)
    window, mel_filters = F.fbank_constants()
    return np.log(np.maximum(F.power_spectrum_numpy(frames, window) @ mel_filters, F.LOG_FLOOR))


def _frame_count(audio: np.ndarray, hop: int) -> int:
    """The item's fbank frames: the extractor appends one zero and pads to a multiple of the hop."""
    return int(F.kaldi_frame_count(F.round_up(len(audio) + 1, hop), hop))


def feature_stats(audio: np.ndarray, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, 1 / sqrt(unbiased variance + eps)) per mel bin over the item's fbank frames, as the
    extractor normalises the item alone, in chunks of bounded size."""
    count = _frame_count(audio, hop)
    shift = _logmel(audio, 0, 1)[0]
    total = np.zeros_like(shift)
    squares = np.zeros_like(shift)
    for first in range(0, count, _STATS_CHUNK_FRAMES):
        # As the extractor, relative to the first frame: silent bins then normalise to exactly 0.
        d = _logmel(audio, first, min(count, first + _STATS_CHUNK_FRAMES)) - shift
        total += d.sum(axis=0)
        squares += (d * d).sum(axis=0)
    var = np.maximum(squares - total * total / count, 0.0) / max(count - 1, 1)
    return shift + total / count, 1.0 / np.sqrt(var + F.NORM_EPS)


def window_inputs(
    audio: np.ndarray, w: Window, hop: int, stats: tuple[np.ndarray, np.ndarray], codes: int, pad: float
) -> dict[str, np.ndarray]:
    """The encoder's inputs for window ``w`` of ``audio``, padded to ``codes`` codes, as the feature
    extractor lays out one item: its audio, and the whole item's features for codes [start, end)."""
    count = _frame_count(audio, hop)
    n = w.end - w.start
    first, last = F.STRIDE * w.start, F.STRIDE * w.end
    logmel = _logmel(audio, first, last)
    valid = np.arange(first, last) < count
    normed = np.where(valid[:, None], (logmel - stats[0]) * stats[1], pad)
    feats = np.full((1, codes, F.STRIDE * F.NUM_MEL_BINS), pad, np.float32)
    feats[0, :n] = normed.reshape(n, -1)
    feats_mask = np.zeros((1, codes), np.int32)
    feats_mask[0, :n] = valid.reshape(n, F.STRIDE).all(axis=-1)
    piece = window_audio(audio, w, hop)
    values = np.zeros((1, 1, codes * hop), np.float32)
    values[0, 0, : len(piece)] = piece
    padding_mask = np.zeros((1, codes * hop), np.int32)
    # The extractor counts the zero it appends to an item as valid.
    padding_mask[0, : len(piece) + (w.start * hop + len(piece) == len(audio))] = 1
    return {
        "input_values": values,
        "padding_mask": padding_mask,
        "input_features": feats,
        "input_features_mask": feats_mask,
    }
