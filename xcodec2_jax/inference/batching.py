"""Batching plans: items cut into windows, sorted by length, grouped into batches whose row count
and padded length are rounded up to a few buckets, and each batch's inputs padded.

Bucketing keeps a stream of varied inputs on a handful of compiled programs. Padding never changes
a result: the model runs padded batches with masks that make every item compute exactly what it
would alone. The codec, the corpus job and the tests all plan and pad through this module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..modeling.features import Xcodec2FeatureExtractor
from ..utils import validation
from . import windows
from .audio import SAMPLING_RATE


def length_bucket(n: int, minimum: int = 8) -> int:
    """Round a code count up to 2^k · {1, 1.25, 1.5, 1.75}: at most 25% padding, 4 shapes per octave."""
    n = max(int(n), minimum)
    octave = 1 << (n.bit_length() - 1)  # the largest power of two <= n, a multiple of 4 here
    return next(octave * q // 4 for q in (4, 5, 6, 7, 8) if octave * q // 4 >= n)


def batch_bucket(n: int, batch_size: int) -> int:
    """Round a batch size up to a power of two, capped at ``batch_size``."""
    return min(batch_size, 1 << max(int(n) - 1, 0).bit_length())


def num_codes(samples: int, hop_length: int) -> int:
    """Codes of an item of ``samples`` samples: ceil((T + 1) / hop), as the reference gives it."""
    return math.ceil((int(samples) + 1) / hop_length)


@dataclasses.dataclass(frozen=True)
class Batch:
    """Pieces ``pieces`` (indices into the plan's pieces) run as ``rows`` rows of ``codes`` codes."""

    pieces: list[int]
    rows: int
    codes: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """How items are run: each item's code count, the pieces (windows) it is cut into, the batches."""

    num_codes: list[int]
    pieces: list[windows.Window]
    batches: list[Batch]

    def piece_codes(self, j: int) -> int:
        w = self.pieces[j]
        return w.end - w.start

    def is_whole(self, j: int) -> bool:
        """True when piece ``j`` is its item whole (no windows)."""
        return self.piece_codes(j) == self.num_codes[self.pieces[j].item]


def plan_pieces(
    n_codes: Sequence[int],
    hop_length: int,
    max_window_seconds: float | None,
    context_seconds: float,
    fade: int = 0,
) -> list[windows.Window]:
    """Every item's windows (:func:`windows.plan`), for items of these code counts; ``fade`` samples
    of crossfade at each window boundary (decode)."""
    rate = SAMPLING_RATE / hop_length
    window = windows.to_codes(max_window_seconds, "max_window_seconds", rate, minimum=1)
    context = windows.to_codes(context_seconds, "context_seconds", rate)
    return [w for i, n in enumerate(n_codes) for w in windows.plan(i, n, window, context, hop_length, fade)]


def plan(
    n_codes: Sequence[int],
    hop_length: int,
    batch_size: int,
    max_window_seconds: float | None,
    context_seconds: float,
    fade: int = 0,
) -> Plan:
    """Items of these code counts in windows and bucketed batches of at most ``batch_size`` pieces,
    longest first."""
    pieces = plan_pieces(n_codes, hop_length, max_window_seconds, context_seconds, fade)
    lengths = [w.end - w.start for w in pieces]
    order = sorted(range(len(pieces)), key=lambda j: -lengths[j])
    batches = [
        Batch(group, batch_bucket(len(group), batch_size), length_bucket(max(lengths[j] for j in group)))
        for group in (order[s : s + batch_size] for s in range(0, len(order), batch_size))
    ]
    return Plan(list(n_codes), pieces, batches)


def piece_inputs(
    extractor: Xcodec2FeatureExtractor, audio: np.ndarray, w: windows.Window, stats: tuple | None
) -> dict[str, np.ndarray]:
    """The model inputs (a batch of one) of piece ``w`` of ``audio``: the whole item through the
    feature extractor, or, with the whole item's feature ``stats`` (``windows.feature_stats``), one
    window of it. :func:`pad_batch` pads pieces into a batch."""
    hop, n = extractor.hop_length, w.end - w.start
    if stats is None:
        return extractor([audio], padding="max_length", max_length=n * hop)
    return windows.window_inputs(audio, w, hop, stats, n, extractor.padding_value)


def pad_batch(
    parts: Sequence[dict], codes: int, rows: int, hop_length: int, fill: float
) -> dict[str, np.ndarray]:
    """Items' model inputs (each a batch of one, of at most ``codes`` codes) as one batch of ``rows``
    items of ``codes`` codes: each padded as the feature extractor pads (audio and masks 0, features
    ``fill``), then all-padding rows appended."""
    samples = codes * hop_length
    inputs = {}
    # (key, time axis, padded length, fill)
    for key, axis, width, value in (
        ("input_values", 2, samples, 0),
        ("padding_mask", 1, samples, 0),
        ("input_features", 1, codes, fill),
        ("input_features_mask", 1, codes, 0),
    ):
        padded = []
        for part in parts:
            a = part[key]
            pad = [(0, 0)] * a.ndim
            pad[axis] = (0, width - a.shape[axis])
            padded.append(np.pad(a, pad, constant_values=value) if pad[axis][1] else a)
        if rows > len(parts):
            a = padded[0]
            padded.append(np.full((rows - len(parts), *a.shape[1:]), value, a.dtype))
        inputs[key] = np.concatenate(padded)
    return inputs


def silent_batch(extractor: Xcodec2FeatureExtractor, codes: int, rows: int) -> dict[str, np.ndarray]:
    """A batch of ``rows`` items of ``codes`` codes, laid out as :func:`pad_batch` lays real ones out
    (shapes and dtypes), from silence: what compiling a program ahead needs."""
    hop = extractor.hop_length
    part = extractor([np.zeros(codes * hop - 1, np.float32)], padding="max_length", max_length=codes * hop)
    return pad_batch([part], codes, rows, hop, extractor.padding_value)


def pad_codes(items: Sequence[np.ndarray], pieces: Sequence[windows.Window], batch: Batch):
    """(codes, mask), both int32 (rows, codes): the batch's pieces of the code sequences ``items``,
    zero-padded, the mask 1 on real codes."""
    codes = np.zeros((batch.rows, batch.codes), np.int32)
    mask = np.zeros((batch.rows, batch.codes), np.int32)
    for row, j in enumerate(batch.pieces):
        w = pieces[j]
        codes[row, : w.end - w.start] = items[w.item][w.start : w.end]
        mask[row, : w.end - w.start] = 1
    return codes, mask


@dataclasses.dataclass
class EncodedAudio:
    """Codes of a batch: ``codes`` (B, N) int32 zero-padded past ``lengths`` (B,) valid codes."""

    codes: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        """Item ``i``'s valid codes, (lengths[i],) int32."""
        return self.codes[i, : self.lengths[i]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def to_list(self) -> list[np.ndarray]:
        return list(self)


def code_items(codes: Any, lengths: Any, codebook_size: int) -> tuple[list[np.ndarray], bool]:
    """(each item's codes, whether decode returns a list) from ``Xcodec2Codec.decode``'s ``codes`` and
    ``lengths``, each item checked (one ``ValueError`` naming the item)."""
    if isinstance(codes, EncodedAudio):
        codes, lengths = codes.codes, codes.lengths
    as_list = lengths is not None or isinstance(codes, (list, tuple))
    if isinstance(codes, (list, tuple)):
        items = [np.asarray(c) for c in codes]
        if any(c.ndim != 1 for c in items):
            raise ValueError("a list of codes must hold 1-D arrays")
    else:
        arr = np.asarray(codes)
        arr = arr[None] if arr.ndim == 1 else arr
        if arr.ndim != 2:
            raise ValueError(f"codes must be (N,) or (B, N), got shape {arr.shape}")
        items = list(arr)
        if lengths is not None:
            lengths = np.asarray(lengths)
            if lengths.shape != (arr.shape[0],) or (lengths < 1).any() or (lengths > arr.shape[1]).any():
                raise ValueError(f"lengths must be (B,) = ({arr.shape[0]},) values in [1, {arr.shape[1]}]")
            items = [arr[i, : lengths[i]] for i in range(arr.shape[0])]
    for i, c in enumerate(items):
        if c.size == 0:
            raise ValueError(f"item {i}: no codes")
        items[i] = validation.codes(c, codebook_size, f"item {i}: codes")
    return items, as_list
