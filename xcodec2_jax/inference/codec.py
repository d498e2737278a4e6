"""``Xcodec2Codec``: audio in, codes out, and back, without thinking about padding or compilation.

A facade over the inference layer: :mod:`.audio` normalises inputs to 16 kHz mono float32,
:mod:`.batching` plans windows and bucketed batches and pads them, :mod:`.programs` runs them
through compiled (and cached) programs, :mod:`.windows` stitches long items back together.
Padding never changes a result, and results come back in input order.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..checkpoint import config_for
from ..checkpoint.prepared import params_dir
from ..config import Xcodec2Config
from ..modeling.features import Xcodec2FeatureExtractor
from ..modeling.layout import ENCODE_MODULES, per_layer
from ..modeling.model import Xcodec2Model
from ..utils import validation
from ..utils.hub import DEFAULT_MODEL_ID, resolve_checkpoint
from ..utils.progress import progress_bar
from . import batching, windows
from .audio import SAMPLING_RATE, prepare_audio
from .batching import EncodedAudio
from .compilation_cache import enable_compilation_cache
from .loading import load_for_inference
from .programs import CodecPrograms, encoder_param_specs, encoder_params, programs_dir, specs_of
from .stream import DecodeStream


class Xcodec2Codec:
    """The high-level codec: ``encode`` audio to codes, ``decode`` codes to 16 kHz audio.

    Args:
        config: the model's :class:`~xcodec2_jax.Xcodec2Config`.
        params: its parameter tree (host or device arrays; None until loaded).
        dtype: compute dtype (FSQ, norms, softmax and the ISTFT stay float32).
        precision: ``Xcodec2Model``'s: None (HIGHEST for float32 compute, as the reference's codes
            need), ``"highest"``, ``"default"`` / ``"tensorfloat32"`` (the device's faster passes).
        batch_size: items (or windows) per batch, a positive integer.
        compilation_cache: see :mod:`.compilation_cache` (None: on, in the per-user folder; False:
            off; or a directory).
        compiler_options: XLA's, for every compilation (None: the CPU defaults of
            :data:`.programs.CPU_COMPILER_OPTIONS` on a CPU; ``{}``: XLA's defaults everywhere).
    """

    def __init__(
        self,
        config: Xcodec2Config,
        params: Any,
        *,
        dtype: Any = jnp.float32,
        precision: str | jax.lax.Precision | None = None,
        batch_size: int = 8,
        compilation_cache: str | os.PathLike | bool | None = None,
        compiler_options: dict | None = None,
    ):
        self.batch_size = validation.positive_int(batch_size, "batch_size")
        self.model = Xcodec2Model(config, dtype=dtype, precision=precision)  # checks precision
        self.compilation_cache_dir = enable_compilation_cache(compilation_cache)
        self.config, self.dtype, self.precision = config, dtype, precision
        # The decoder's layers per layer: XLA:CPU then reads their weights in place (layout.per_layer).
        self.params = None if params is None else jax.device_put(per_layer(params))
        self.features = Xcodec2FeatureExtractor(hop_length=config.hop_length)
        # Traced programs are kept beside the compilation cache (and off with it).
        self.programs = CodecPrograms.build(
            self.model, programs_dir(self.compilation_cache_dir), compiler_options
        )
        self.compiler_options = self.programs.compiler_options

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike = DEFAULT_MODEL_ID,
        *,
        revision: str | None = None,
        cache_dir: str | None = None,
        device: jax.Device | None = None,
        encode_lengths: Sequence[int] | None = None,
        encode_only: bool = False,
        **options: Any,
    ) -> Xcodec2Codec:
        """Load a checkpoint directory (any format of ``checkpoint.detect_format``) or download a Hub
        repo (``hub`` extra; ``revision``, ``cache_dir`` the Hub's). ``options``: those of the
        constructor. The checkpoint prepared in the model's layout is kept in the params cache beside
        the compilation cache (:mod:`xcodec2_jax.checkpoint.prepared`), so a later load only maps it.

        ``device``: where the weights go (default: this process's first local device).
        ``encode_lengths``: sample counts (16 kHz) about to be encoded with the default batching: their
        programs compile on another thread while the checkpoint loads (a failure there is a warning).
        ``encode_only``: load only the weights ``encode`` reads (70% of the full model); ``decode``
        then raises."""
        path = resolve_checkpoint(path_or_repo_id, revision, cache_dir)
        codec = cls(config_for(path), None, **options)
        device = jax.local_devices()[0] if device is None else device
        beside = None
        if encode_lengths:
            beside = functools.partial(codec.precompile_encode, list(encode_lengths), device=device)
        codec.params = load_for_inference(
            path,
            codec.config,
            device=device,
            params_cache=params_dir(codec.compilation_cache_dir),
            modules=ENCODE_MODULES if encode_only else None,
            beside=beside,
        )
        return codec

    def precompile_encode(
        self,
        lengths: Sequence[int],
        *,
        batch_size: int | None = None,
        max_window_seconds: float | None = windows.DEFAULT_MAX_WINDOW_SECONDS,
        context_seconds: float = windows.DEFAULT_ENCODE_CONTEXT_SECONDS,
        device: jax.Device | None = None,
    ) -> int:
        """Compile (or load from the compilation cache) the programs that ``encode`` of audio of these
        sample counts (16 kHz), with these options, will run. Returns how many programs that is. The
        weights need not be loaded yet (``device``: where they will be; default: the first device)."""
        lengths = list(lengths)
        if not lengths or any(not validation.is_int(n) or n < 1 for n in lengths):
            raise ValueError(f"lengths must be a non-empty list of positive sample counts, got {lengths}")
        params = encoder_param_specs(self.params, self.config, device)
        plan = self._encode_plan(lengths, batch_size, max_window_seconds, context_seconds)
        shapes = sorted({(b.rows, b.codes) for b in plan.batches})
        for rows, n in shapes:
            inputs = batching.silent_batch(self.features, n, rows)
            self.programs.encode.precompile(params, jax.tree.map(specs_of, inputs))
        return len(shapes)

    @property
    def encode_only(self) -> bool:
        """True when the params hold the encoder's weights alone: ``decode`` then raises."""
        return self.params is not None and not set(self.params) - set(ENCODE_MODULES)

    @property
    def encode_params(self) -> dict:
        """The params the encode program takes (:func:`.programs.encoder_params`)."""
        return encoder_params(self.params)

    @property
    def sampling_rate(self) -> int:
        return SAMPLING_RATE

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    def encode(
        self,
        audio: Any,
        sampling_rate: float,
        *,
        batch_size: int | None = None,
        progress: bool = False,
        max_window_seconds: float | None = windows.DEFAULT_MAX_WINDOW_SECONDS,
        context_seconds: float = windows.DEFAULT_ENCODE_CONTEXT_SECONDS,
    ) -> EncodedAudio:
        """Audio -> codes at 50 per second (16 kHz / 320).

        Args:
            audio: one array or a list of them, each (samples,) or (samples, channels) of any float or
                integer dtype (integers are scaled to [-1, 1)).
            sampling_rate: their rate in Hz (1 kHz to 768 kHz), resampled to 16 kHz.
            batch_size: overrides the codec's.
            max_window_seconds: longer items are encoded in overlapping windows with
                ``context_seconds`` on each side of the part kept (:mod:`.windows`); None: one piece.

        Returns:
            :class:`EncodedAudio`; an item of T samples (at 16 kHz) gets ceil((T + 1) / 320) codes, as
            the reference gives it. Bad items raise ``ValueError`` naming the item index.
        """
        items = audio if isinstance(audio, (list, tuple)) else [audio]
        if len(items) == 0:
            raise ValueError("no audio given")
        prepared = [prepare_audio(a, sampling_rate, f"item {i}") for i, a in enumerate(items)]
        plan = self._encode_plan([len(a) for a in prepared], batch_size, max_window_seconds, context_seconds)
        codes = np.zeros((len(prepared), max(plan.num_codes)), np.int32)
        stats = {w.item: None for j, w in enumerate(plan.pieces) if not plan.is_whole(j)}
        for i in stats:
            stats[i] = windows.feature_stats(prepared[i], self.hop_length)
        for batch in progress_bar(plan.batches, "encode", "batch", progress):
            parts = [
                batching.piece_inputs(
                    self.features,
                    prepared[plan.pieces[j].item],
                    plan.pieces[j],
                    stats.get(plan.pieces[j].item),
                )
                for j in batch.pieces
            ]
            out = np.asarray(
                self.programs.encode(self.encode_params, self._pad(parts, batch.codes, batch.rows))
            )
            for row, j in enumerate(batch.pieces):
                w = plan.pieces[j]
                codes[w.item, w.keep_start : w.keep_end] = out[
                    row, w.keep_start - w.start : w.keep_end - w.start
                ]
        return EncodedAudio(codes=codes, lengths=np.asarray(plan.num_codes, np.int32))

    def decode(
        self,
        codes: Any,
        lengths: Sequence[int] | np.ndarray | None = None,
        *,
        batch_size: int | None = None,
        progress: bool = False,
        max_window_seconds: float | None = windows.DEFAULT_MAX_WINDOW_SECONDS,
        context_seconds: float = windows.DEFAULT_DECODE_CONTEXT_SECONDS,
        crossfade_seconds: float = windows.DEFAULT_CROSSFADE_SECONDS,
    ) -> np.ndarray | list[np.ndarray]:
        """Codes -> 16 kHz float32 audio, 320 samples per code.

        Args:
            codes: (N,) or (B, N) integers in [0, 65536), an :class:`EncodedAudio`, or a list of 1-D
                arrays; ``lengths`` (B,) the valid codes of each row of a (B, N) array.
            max_window_seconds: longer items are decoded in overlapping windows with ``context_seconds``
                on each side of the part kept, neighbours blended over ``crossfade_seconds``.

        Returns:
            (B, N·320) for an array without ``lengths``; otherwise a list of per-item arrays of
            ``lengths[i]·320`` samples.
        """
        self._require_decoder()
        items, as_list = batching.code_items(codes, lengths, self.config.codebook_size)
        hop, size = self.hop_length, self._batch_size(batch_size)
        fade = windows.to_codes(crossfade_seconds, "crossfade_seconds", SAMPLING_RATE)
        plan = batching.plan([len(c) for c in items], hop, size, max_window_seconds, context_seconds, fade)
        out = [np.zeros(n * hop, np.float32) for n in plan.num_codes] if as_list else None
        stacked = None if as_list else np.zeros((len(items), plan.num_codes[0] * hop), np.float32)
        for batch in progress_bar(plan.batches, "decode", "batch", progress):
            audio = np.asarray(
                self.programs.decode(self.params, *batching.pad_codes(items, plan.pieces, batch))
            )
            for row, j in enumerate(batch.pieces):
                w = plan.pieces[j]
                target = out[w.item] if stacked is None else stacked[w.item]
                if plan.is_whole(j):
                    target[:] = audio[row, : len(target)]
                else:
                    windows.add_decoded(target, audio[row], w, hop)
        return out if stacked is None else stacked

    def decode_stream(
        self,
        *,
        chunk: int | None = None,
        lookahead: int | None = None,
        context: int | None = None,
        batch_size: int = 1,
    ) -> DecodeStream:
        """A :class:`~.stream.DecodeStream`: push codes as they are generated, get the audio that is
        final so far. Sizes are in codes (50 per second); None takes the stream's defaults."""
        self._require_decoder()
        sizes = {
            k: v for k, v in dict(chunk=chunk, lookahead=lookahead, context=context).items() if v is not None
        }
        return DecodeStream(self.programs.decode, self.params, self.config, batch_size=batch_size, **sizes)

    def _encode_plan(self, lengths, batch_size, max_window_seconds, context_seconds) -> batching.Plan:
        size = self._batch_size(batch_size)
        n_codes = [batching.num_codes(n, self.hop_length) for n in lengths]
        return batching.plan(n_codes, self.hop_length, size, max_window_seconds, context_seconds)

    def _batch_size(self, batch_size: int | None) -> int:
        return self.batch_size if batch_size is None else validation.positive_int(batch_size, "batch_size")

    def _pad(self, parts, codes: int, rows: int) -> dict[str, np.ndarray]:
        return batching.pad_batch(parts, codes, rows, self.hop_length, self.features.padding_value)

    def _require_decoder(self) -> None:
        if self.encode_only:
            raise ValueError(
                "this codec holds only the encoder's weights (from_pretrained(encode_only=True)): "
                "load it without encode_only to decode"
            )
