"""Streaming decode: codes arrive a few at a time (an LLM generating speech tokens), audio comes out as
soon as it is final.

X-Codec2's decoder is not causal: its transformer attends over the whole sequence in both directions
and the ISTFT overlaps neighbouring frames. A chunk of audio is therefore computed from a fixed
window of codes around it: ``context`` codes before the chunk, the ``chunk`` codes themselves and
``lookahead`` codes after it. Only that chunk's audio is kept, so each push costs one decoder call
of a fixed shape (``batch_size`` rows × ``context + chunk + lookahead`` codes), compiled once per
stream configuration however many pushes follow. Near the start and the end of a stream the window
holds fewer codes (there are no codes before the first one, and after a flush none after the last);
the decoder's masks make the padded part of the window invisible, so the result is what a decode of
just those codes gives.

What a chunk's window holds depends only on its position and, at the end, on the stream's length,
never on how the codes were split across pushes: streamed audio is the same for any push sizes, and
with ``context`` and ``lookahead`` covering the whole stream it equals the one-piece decode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..config import Xcodec2Config
from ..utils import validation

# Chosen from the measurements in the README ("Streaming decode"): 1 s chunks (half the per-push
# overhead of 0.5 s chunks, and closer to the one-piece decode at the same context); lookahead stops
# paying at 5-10 codes; context keeps helping by about 1.5 dB per doubling, and 2 s of it makes a
# push decode 3.2 chunks' worth of codes.
DEFAULT_CHUNK = 50
DEFAULT_LOOKAHEAD = 10
DEFAULT_CONTEXT = 100


@dataclasses.dataclass
class _Stream:
    """One stream's codes from ``base`` (its global index) on, and how far its audio is final."""

    codes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    base: int = 0
    received: int = 0
    emitted: int = 0
    flushed: bool = False


class DecodeStream:
    """Incremental decode of ``batch_size`` concurrent code streams (see the module docstring).

    ``push(codes, stream=i)`` appends codes to stream ``i`` and returns its audio that became final
    (float32, 16 kHz, possibly empty); ``flush(stream=i)`` ends the stream and returns the rest. The
    audio of a stream of N codes has exactly N · hop samples in all. ``push_batch`` / ``flush_batch``
    step several streams as one batch, which is what serving many requests at once wants.

    Args:
        decode: the decode program, ``decode(params, codes, mask)`` with (B, N) int32 codes and mask
            -> (B, N · hop) audio (``Xcodec2Codec.programs.decode``; ``Xcodec2Codec.decode_stream``
            builds the stream).
        params: the parameters it takes.
        config: the model's config (hop length, codebook size).
        chunk, lookahead, context: codes per chunk and codes after and before it in its window.
        batch_size: concurrent streams, decoded as one batch.
    """

    def __init__(
        self,
        decode: Callable,
        params: Any,
        config: Xcodec2Config,
        *,
        chunk: int = DEFAULT_CHUNK,
        lookahead: int = DEFAULT_LOOKAHEAD,
        context: int = DEFAULT_CONTEXT,
        batch_size: int = 1,
    ):
        self.chunk = validation.positive_int(chunk, "chunk")
        self.lookahead = validation.int_at_least(lookahead, "lookahead", 0)
        self.context = validation.int_at_least(context, "context", 0)
        self.batch_size = validation.positive_int(batch_size, "batch_size")
        self.window = self.context + self.chunk + self.lookahead
        self.hop = config.hop_length
        self.codebook_size = config.codebook_size
        self._decode_program, self._params = decode, params
        self._streams = [_Stream() for _ in range(self.batch_size)]

    @property
    def first_audio_codes(self) -> int:
        """Codes a stream needs before its first audio comes out (unless it is flushed earlier)."""
        return self.chunk + self.lookahead

    # ----------------------------------------------------------------------------------------------
    def push(self, codes: Any, stream: int = 0) -> np.ndarray:
        """Append ``codes`` (1-D integers in [0, codebook_size), possibly empty) to ``stream``; return
        the audio that is final now."""
        return self._step({self._check_stream(stream): codes}, flush=False)[stream]

    def flush(self, stream: int = 0) -> np.ndarray:
        """End ``stream`` and return the rest of its audio. Pushing to it afterwards is an error."""
        return self._step({self._check_stream(stream): None}, flush=True)[stream]

    def push_batch(self, codes: Sequence[Any]) -> list[np.ndarray]:
        """One push per stream: ``codes[i]`` for stream ``i`` (None or empty for none); the streams'
        chunks are decoded together, ``batch_size`` rows per decoder call."""
        if len(codes) != self.batch_size:
            raise ValueError(f"push_batch needs one entry per stream ({self.batch_size}), got {len(codes)}")
        wanted = {i: c for i, c in enumerate(codes) if c is not None}
        out = self._step(wanted, flush=False)
        return [out.get(i, np.zeros(0, np.float32)) for i in range(self.batch_size)]

    def flush_batch(self) -> list[np.ndarray]:
        """Flush every stream not flushed yet; returns each stream's remaining audio (empty for the
        ones flushed before)."""
        wanted = {i: None for i, s in enumerate(self._streams) if not s.flushed}
        out = self._step(wanted, flush=True)
        return [out.get(i, np.zeros(0, np.float32)) for i in range(self.batch_size)]

    # ----------------------------------------------------------------------------------------------
    def _check_stream(self, stream: Any) -> int:
        if isinstance(stream, bool) or not isinstance(stream, (int, np.integer)):
            raise ValueError(f"stream must be an integer id, got {stream!r}")
        if not 0 <= stream < self.batch_size:
            raise ValueError(f"stream {stream} does not exist: ids are 0 .. {self.batch_size - 1}")
        return int(stream)

    def _validate(self, stream: int, codes: Any) -> np.ndarray:
        state = self._streams[stream]
        if state.flushed:
            raise ValueError(f"stream {stream} was flushed: no more codes can be pushed to it")
        arr = np.asarray(codes)
        if arr.ndim != 1:
            raise ValueError(f"stream {stream}: codes must be 1-D, got shape {arr.shape}")
        if arr.size == 0:
            return arr.astype(np.int32)
        return validation.codes(arr, self.codebook_size, f"stream {stream}: codes")

    def _step(self, wanted: dict[int, Any], flush: bool) -> dict[int, np.ndarray]:
        # Every push is validated before any stream is changed: a bad push leaves all streams as they were.
        new = {i: None if c is None else self._validate(i, c) for i, c in wanted.items()}
        for i, codes in new.items():
            state = self._streams[i]
            if flush and state.flushed:
                raise ValueError(f"stream {i} was already flushed")
            if codes is not None and codes.size:
                state.codes = np.concatenate([state.codes, codes])
                state.received += codes.size
            state.flushed = state.flushed or flush
        out: dict[int, list[np.ndarray]] = {i: [] for i in wanted}
        while True:
            windows = {i: w for i in wanted if (w := self._next_window(self._streams[i])) is not None}
            if not windows:
                break
            self._decode(windows, out)
        return {i: np.concatenate(parts) if parts else np.zeros(0, np.float32) for i, parts in out.items()}

    def _next_window(self, state: _Stream):
        """(start, end, emit) of the next chunk's window in global code indices, or None if not ready."""
        f = state.emitted
        if f >= state.received or (not state.flushed and state.received < f + self.chunk + self.lookahead):
            return None
        start = max(0, f - self.context)
        end = min(state.received, f + self.chunk + self.lookahead)
        return start, end, min(self.chunk, state.received - f)

    def _decode(self, windows: dict[int, tuple[int, int, int]], out: dict[int, list[np.ndarray]]) -> None:
        rows = self.batch_size
        codes = np.zeros((rows, self.window), np.int32)
        mask = np.zeros((rows, self.window), np.int32)
        mask[:, 0] = 1  # rows without a chunk decode one zero code, keeping their statistics finite
        for i, (start, end, _) in windows.items():
            state = self._streams[i]
            codes[i, : end - start] = state.codes[start - state.base : end - state.base]
            mask[i, : end - start] = 1
        audio = np.asarray(self._decode_program(self._params, codes, mask))
        hop = self.hop
        for i, (start, _, emit) in windows.items():
            state = self._streams[i]
            local = state.emitted - start
            out[i].append(audio[i, local * hop : (local + emit) * hop].astype(np.float32, copy=True))
            state.emitted += emit
            # Codes before the next window's start are never read again.
            keep = max(0, state.emitted - self.context)
            state.codes = state.codes[keep - state.base :]
            state.base = keep
