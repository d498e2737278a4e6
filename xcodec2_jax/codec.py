"""``Xcodec2Codec``: audio in, codes out, and back, without thinking about padding or compilation.

Inputs of any length, sample rate, channel count and sample dtype are normalised to 16 kHz mono
float32, sorted by length and run in batches whose size and padded length are rounded up to a
small set of buckets, so a stream of varied inputs reuses a handful of compiled functions. Padding
never changes a result: items are encoded and decoded with masks that make every item of a padded
batch compute exactly what it would alone. Results come back in input order.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import windows
from .cache import enable_compilation_cache
from .checkpoint import load_checkpoint, load_prepared
from .checkpoint.prepared import params_dir
from .config import Xcodec2Config
from .features import Xcodec2FeatureExtractor
from .model import ENCODE_MODULES, Xcodec2Model, validate_codes
from .programs import cached_jit, programs_dir

DEFAULT_MODEL_ID = "HKUSTAudio/xcodec2-hf"
SAMPLING_RATE = 16000
# XLA:CPU spends most of a compilation in LLVM's optimisation passes over the fused element-wise
# loops; the expensive ones cut the full model's compile time by a third to a half on a 2-core CPU
# while the run time stays within noise (the convolutions and dots are library calls either way),
# so the codec skips them on CPUs (see benchmarks/README.md). Codes are unchanged.
CPU_COMPILER_OPTIONS = {"xla_llvm_disable_expensive_passes": True}
# A stereo/multichannel array is (samples, channels), soundfile's layout. A (channels, samples) array
# is recognised when it has at most this many rows and more columns than rows.
MAX_CHANNELS = 16


def _encoder_part(params: dict) -> dict:
    return {m: v for m, v in params.items() if m in ENCODE_MODULES}


def length_bucket(n: int, minimum: int = 8) -> int:
    """Round a code count up to 2^k · {1, 1.25, 1.5, 1.75}: at most 25% padding, 4 shapes per octave."""
    n = max(int(n), minimum)
    octave = 1 << (n.bit_length() - 1)  # the largest power of two <= n, a multiple of 4 here
    return next(octave * q // 4 for q in (4, 5, 6, 7, 8) if octave * q // 4 >= n)


def batch_bucket(n: int, batch_size: int) -> int:
    """Round a batch size up to a power of two, capped at ``batch_size``."""
    return min(batch_size, 1 << max(int(n) - 1, 0).bit_length())


def to_mono_float32(audio: Any, index: int = 0) -> np.ndarray:
    """One item of audio as float32 mono in [-1, 1] (before resampling).

    Integer PCM is scaled by its full range (int16 by 32768, int32 by 2^31, uint8 centred on 128).
    2-D audio is (samples, channels) as soundfile reads it, or (channels, samples) when it has at
    most 16 rows and more columns than rows; channels are averaged (downmix to mono).
    """
    a = np.asarray(audio)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"item {index}: audio must be numeric, got dtype {a.dtype}")
    if a.ndim == 0 or a.ndim > 2:
        raise ValueError(
            f"item {index}: audio must be 1-D (samples,) or 2-D (samples, channels), got shape {a.shape}"
        )
    if a.ndim == 2 and a.shape[0] <= MAX_CHANNELS and a.shape[1] > a.shape[0]:
        a = a.T
    if a.size == 0:
        raise ValueError(f"item {index}: audio is empty")
    if a.dtype.kind == "u":
        half = 2.0 ** (8 * a.dtype.itemsize - 1)
        a = (a.astype(np.float64) - half) / half
    elif a.dtype.kind == "i":
        a = a.astype(np.float64) / 2.0 ** (8 * a.dtype.itemsize - 1)
    a = a.astype(np.float32, copy=False)  # float32 input is read, never written: no copy of an hour
    if a.ndim == 2:
        a = a.mean(axis=1, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"item {index}: audio contains NaN or Inf")
    return a


def prepare_audio(audio: Any, sampling_rate: float, index: int = 0) -> np.ndarray:
    """:func:`to_mono_float32`, then resampled to 16 kHz with soxr when needed."""
    if not isinstance(sampling_rate, (int, float, np.integer, np.floating)) or not sampling_rate > 0:
        raise ValueError(f"sampling_rate must be a positive number, got {sampling_rate!r}")
    a = to_mono_float32(audio, index)
    if sampling_rate != SAMPLING_RATE:
        import soxr

        a = soxr.resample(a, float(sampling_rate), SAMPLING_RATE).astype(np.float32)
        if a.size == 0:
            raise ValueError(f"item {index}: audio is shorter than one sample at {SAMPLING_RATE} Hz")
    return a


def read_audio(source: Any) -> np.ndarray:
    """An audio file (a path or a binary file object) as 16 kHz mono float32 (:func:`prepare_audio`'s
    rules); a ``ValueError`` of one line says what is wrong with it."""
    import soundfile as sf

    try:
        audio, rate = sf.read(source, dtype="float32", always_2d=False)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError ...
        raise unreadable(e) from None
    return prepare_item(audio, rate)


def unreadable(error: Exception) -> ValueError:
    """The one-line ``ValueError`` for audio that cannot be read."""
    return ValueError(f"cannot read audio ({type(error).__name__}: {' '.join(str(error).split())})")


def prepare_item(audio: Any, sampling_rate: float) -> np.ndarray:
    """:func:`prepare_audio` of one item, its errors without the item index."""
    try:
        return prepare_audio(audio, sampling_rate)
    except ValueError as e:
        raise ValueError(str(e).removeprefix("item 0: ")) from None


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


def _resolve_checkpoint(path_or_repo_id: str, revision: str | None, cache_dir: str | None) -> str:
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    tried = f"{path_or_repo_id!r} is not a local directory"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise OSError(
            f"cannot load {tried}, and huggingface_hub is not installed to download it as a hub repo "
            "(pip install 'xcodec2_jax[hub]')"
        ) from None
    try:
        return snapshot_download(
            path_or_repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=["*.json", "*.safetensors", "_CHECKPOINT_METADATA", "params/**"],
        )
    except Exception as e:  # offline, unknown repo, bad revision, ...
        raise OSError(
            f"cannot load {tried}, and downloading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


class Xcodec2Codec:
    """The high-level X-Codec2 codec. ``encode`` audio to codes and ``decode`` codes to 16 kHz audio."""

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
        """``precision`` is ``Xcodec2Model``'s: None (HIGHEST for float32 compute, as the reference's
        codes need), or ``"highest"``, ``"default"`` / ``"tensorfloat32"`` (the device's faster float32
        passes: TF32 on recent GPUs, bfloat16 on TPUs; FSQ, features and the ISTFT stay HIGHEST).
        ``compilation_cache``: see :mod:`xcodec2_jax.cache` (None: JAX's persistent cache on, in the
        per-user folder; False: off; or a directory). ``compiler_options``: XLA's, for every
        compilation (None: ``CPU_COMPILER_OPTIONS`` on a CPU, XLA's defaults elsewhere; ``{}``: XLA's
        defaults everywhere)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = Xcodec2Model(config, dtype=dtype, precision=precision)  # checks precision
        self.compilation_cache_dir = enable_compilation_cache(compilation_cache)
        self.config = config
        self.dtype = dtype
        self.precision = precision
        self.batch_size = batch_size
        self.params = jax.device_put(params)
        self.features = Xcodec2FeatureExtractor(hop_length=config.hop_length)
        model = self.model

        def encode(params, inputs):
            out = model.apply({"params": params}, **inputs, isolate_items=True, method=Xcodec2Model.encode)
            return out.audio_codes[:, 0]

        def decode(params, codes, mask):
            out = model.apply(
                {"params": params}, codes[:, None], audio_codes_mask=mask, method=Xcodec2Model.decode
            )
            return out.audio_values[:, 0]

        # Traced programs are kept beside the compilation cache (and off with it): a later process
        # then neither traces, lowers nor compiles a bucket it has seen.
        programs = programs_dir(self.compilation_cache_dir)
        key = (config, jnp.dtype(dtype).name, self.model.precision, self.model.lowering)
        if compiler_options is None:
            cpu = jax.devices()[0].platform == "cpu"
            compiler_options = dict(CPU_COMPILER_OPTIONS) if cpu else {}
        self.compiler_options = dict(compiler_options)
        options = self.compiler_options or None
        # The batch program unjitted, for callers that jit it with their own shardings (the tokenizer).
        self._encode_fn = encode
        self._encode = cached_jit(encode, "encode", key, programs, options)
        self._decode = cached_jit(decode, "decode", key, programs, options)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike = DEFAULT_MODEL_ID,
        *,
        dtype: Any = jnp.float32,
        precision: str | jax.lax.Precision | None = None,
        batch_size: int = 8,
        revision: str | None = None,
        cache_dir: str | None = None,
        compilation_cache: str | os.PathLike | bool | None = None,
        compiler_options: dict | None = None,
        device: jax.Device | None = None,
        encode_lengths: Sequence[int] | None = None,
        encode_only: bool = False,
    ) -> Xcodec2Codec:
        """Load a checkpoint directory (transformers or original format, ``config.json`` + safetensors)
        or download a Hugging Face Hub repo (needs the ``hub`` extra). ``cache_dir`` is the Hub's
        download folder; ``compilation_cache`` JAX's (see ``__init__``); the checkpoint prepared in the
        model's layout is kept in its subfolder ``xcodec2_jax_params`` (see
        :mod:`xcodec2_jax.checkpoint.prepared`), so that a later load only maps it. ``device``: where
        the weights go (default: this process's first device).

        ``encode_lengths``: sample counts (at 16 kHz) of audio about to be encoded in one ``encode``
        call with the default batching and windows: the programs it will need are compiled (or
        loaded from the compilation cache) on another thread while the checkpoint loads, as
        :meth:`precompile_encode` would do after it. A failure there is a warning: ``encode`` then
        compiles as usual.

        ``encode_only``: load only the weights that ``encode`` reads (``model.ENCODE_MODULES``, 70%
        of the full model; the checkpoint is still checked whole); ``decode`` then raises. The
        params cache keeps such a load as an entry of its own."""
        from .checkpoint import config_for

        path = _resolve_checkpoint(os.fspath(path_or_repo_id), revision, cache_dir)
        # On before loading: the loader may compile too.
        cache = enable_compilation_cache(compilation_cache)
        # The checkpoint prepared in the model's layout is kept beside the compilation cache (and off
        # with it): a later load maps it, and XLA's CPU client adopts the mapped pages as they are.
        # jax.local_devices: on a multi-host job, jax.devices()[0] belongs to process 0.
        device = jax.local_devices()[0] if device is None else device
        config = config_for(path)  # the files' headers only
        codec = cls(
            config,
            None,
            dtype=dtype,
            precision=precision,
            batch_size=batch_size,
            compilation_cache=compilation_cache,
            compiler_options=compiler_options,
        )
        modules = ENCODE_MODULES if encode_only else None
        directory = params_dir(cache)
        ready = None
        if directory is not None:
            ready = load_prepared(path, config, device=device, params_cache=directory, modules=modules)
        if ready is not None:  # mapped in milliseconds: encode's first call finds its programs cached
            codec.params = ready[1]
            return codec
        worker = None
        if encode_lengths:
            worker = _Background(codec.precompile_encode, list(encode_lengths), device=device)
        try:
            _, codec.params = load_checkpoint(
                path, config, device=device, params_cache=directory, modules=modules
            )
        finally:
            if worker is not None:
                worker.join()
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
        """Compile (or load from the compilation cache) the programs that ``encode`` of audio with
        these sample counts (at 16 kHz), called with these options, will run: its first batches then
        compile nothing. Returns how many programs that is. The weights need not be loaded yet
        (``device``: where they will be; default: where they are, or this process's first device)."""
        from .model import abstract_params

        lengths = list(lengths)
        bad = [n for n in lengths if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1]
        if not lengths or bad:
            raise ValueError(
                f"lengths must be a non-empty list of positive sample counts, got {bad or lengths}"
            )
        if self.params is not None:
            params = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.encode_params
            )
        else:
            where = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
            shapes = _encoder_part(abstract_params(self.config))
            params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), shapes)
        hop = self.hop_length
        _, _, batches = self._encode_plan(lengths, batch_size, max_window_seconds, context_seconds)
        shapes = {(rows, n) for _, rows, n in batches}
        for rows, n in sorted(shapes):
            # The inputs of a batch as encode builds them (shapes and dtypes), from silence.
            silence = np.zeros(n * hop - 1, np.float32)  # n codes
            part = self.features([silence], padding="max_length", max_length=n * hop)
            inputs = self._batch_inputs([part], n, rows)
            specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in inputs.items()}
            self._encode.precompile(params, specs)
        return len(shapes)

    @property
    def encode_only(self) -> bool:
        """True when the params hold the encoder's weights alone (``from_pretrained(encode_only=True)``):
        ``decode`` then raises."""
        return self.params is not None and not set(self.params) - set(ENCODE_MODULES)

    @property
    def encode_params(self) -> dict:
        """The params that the encode program takes: those of ``model.ENCODE_MODULES``. Passing only
        these makes it one program whether or not the codec holds the decoder's weights too."""
        return _encoder_part(self.params)

    @property
    def sampling_rate(self) -> int:
        return SAMPLING_RATE

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    # ----------------------------------------------------------------------------------------------
    def _batches(self, lengths: Sequence[int], batch_size: int | None) -> Iterator[list[int]]:
        size = batch_size or self.batch_size
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        for start in range(0, len(order), size):
            yield order[start : start + size]

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

        ``audio``: one array or a list of them, each (samples,) or (samples, channels), of any float or
        integer dtype (integers are scaled to [-1, 1)), at ``sampling_rate`` (resampled to 16 kHz).
        An item of T samples (at 16 kHz) gets ceil((T + 1) / 320) codes, as the reference gives it.
        An item longer than ``max_window_seconds`` is encoded in overlapping windows with
        ``context_seconds`` on each side of the part kept (:mod:`xcodec2_jax.windows`); None encodes
        every item in one piece. Bad items raise ``ValueError`` naming the item index.
        """
        items = audio if isinstance(audio, (list, tuple)) else [audio]
        if len(items) == 0:
            raise ValueError("no audio given")
        prepared = [prepare_audio(a, sampling_rate, i) for i, a in enumerate(items)]
        hop = self.hop_length
        n_codes, pieces, batches = self._encode_plan(
            [len(a) for a in prepared], batch_size, max_window_seconds, context_seconds
        )
        codes = np.zeros((len(prepared), max(n_codes)), np.int32)
        stats = {w.item: None for w in pieces if w.end - w.start < n_codes[w.item]}
        for i in stats:
            stats[i] = windows.feature_stats(prepared[i], hop)

        for batch, rows, n in progress_bar(batches, "encode", "batch", progress):
            parts = [
                self._piece_inputs(prepared[pieces[j].item], pieces[j], stats.get(pieces[j].item))
                for j in batch
            ]
            inputs = self._batch_inputs(parts, n, rows)
            out = np.asarray(self._encode(self.encode_params, inputs))
            for row, j in enumerate(batch):
                w = pieces[j]
                kept = out[row, w.keep_start - w.start : w.keep_end - w.start]
                codes[w.item, w.keep_start : w.keep_end] = kept
        return EncodedAudio(codes=codes, lengths=np.asarray(n_codes, np.int32))

    def _encode_plan(
        self,
        lengths: Sequence[int],
        batch_size: int | None,
        max_window_seconds: float | None,
        context_seconds: float,
    ) -> tuple[list[int], list[windows.Window], list[tuple[list[int], int, int]]]:
        """For items of these sample counts (16 kHz): each one's code count, the pieces they are
        encoded in, and the batches: (piece indices, rows, codes), rows and codes bucketed."""
        n_codes = [math.ceil((int(n) + 1) / self.hop_length) for n in lengths]
        pieces = self._plan(n_codes, max_window_seconds, context_seconds)
        piece_codes = [w.end - w.start for w in pieces]
        size = batch_size or self.batch_size
        batches = [
            (batch, batch_bucket(len(batch), size), length_bucket(max(piece_codes[j] for j in batch)))
            for batch in self._batches(piece_codes, batch_size)
        ]
        return n_codes, pieces, batches

    def _piece_inputs(
        self, audio: np.ndarray, w: windows.Window, stats: tuple | None
    ) -> dict[str, np.ndarray]:
        """The model inputs (a batch of one) of piece ``w`` of ``audio``: the whole item through the
        feature extractor, or, with the whole item's feature ``stats`` (``windows.feature_stats``), one
        window of it. ``_batch_inputs`` pads pieces into a batch."""
        hop, n = self.hop_length, w.end - w.start
        if stats is None:
            return self.features([audio], padding="max_length", max_length=n * hop)
        return windows.window_inputs(audio, w, hop, stats, n, self.features.padding_value)

    def _batch_inputs(self, parts: Sequence[dict], n: int, rows: int) -> dict[str, np.ndarray]:
        """Items' model inputs (each a batch of one, of at most ``n`` codes) as one batch of ``rows``
        items of ``n`` codes: each padded as the feature extractor pads (audio and masks 0, features
        at its padding value), then all-padding items appended."""
        samples, fill = n * self.hop_length, self.features.padding_value
        inputs = {}
        # (key, time axis, padded length, fill)
        for key, axis, width, value in (
            ("input_values", 2, samples, 0),
            ("padding_mask", 1, samples, 0),
            ("input_features", 1, n, fill),
            ("input_features_mask", 1, n, 0),
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

    def _plan(
        self, n_codes: Sequence[int], max_window_seconds: float | None, context_seconds: float, fade: int = 0
    ) -> list[windows.Window]:
        rate = SAMPLING_RATE / self.hop_length
        window = windows.to_codes(max_window_seconds, "max_window_seconds", rate, minimum=1)
        context = windows.to_codes(context_seconds, "context_seconds", rate)
        hop = self.hop_length
        return [w for i, n in enumerate(n_codes) for w in windows.plan(i, n, window, context, hop, fade)]

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

        ``codes``: (N,) or (B, N) integers in [0, 65536), an :class:`EncodedAudio`, or a list of 1-D
        arrays. Returns (B, N·320) for an array without ``lengths``; otherwise (``lengths`` given, an
        EncodedAudio, or a list) a list of per-item arrays of ``lengths[i]·320`` samples.
        An item longer than ``max_window_seconds`` is decoded in overlapping windows with
        ``context_seconds`` on each side of the part kept, neighbours blended over
        ``crossfade_seconds`` (:mod:`xcodec2_jax.windows`); None decodes every item in one piece.
        """
        self._require_decoder()
        if isinstance(codes, EncodedAudio):
            codes, lengths = codes.codes, codes.lengths
        as_list = lengths is not None or isinstance(codes, (list, tuple))
        if isinstance(codes, (list, tuple)):
            items = [np.asarray(c) for c in codes]
            if any(c.ndim != 1 for c in items):
                raise ValueError("a list of codes must hold 1-D arrays")
        else:
            arr = np.asarray(codes)
            if arr.ndim == 1:
                arr = arr[None]
            if arr.ndim != 2:
                raise ValueError(f"codes must be (N,) or (B, N), got shape {arr.shape}")
            if lengths is None:
                items = list(arr)
            else:
                lengths = np.asarray(lengths)
                if lengths.shape != (arr.shape[0],) or (lengths < 1).any() or (lengths > arr.shape[1]).any():
                    raise ValueError(
                        f"lengths must be (B,) = ({arr.shape[0]},) values in [1, {arr.shape[1]}]"
                    )
                items = [arr[i, : lengths[i]] for i in range(arr.shape[0])]
        for i, c in enumerate(items):
            if c.size == 0:
                raise ValueError(f"item {i}: no codes")
            try:
                validate_codes(c[None, None], self.config.codebook_size)
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None

        hop = self.hop_length
        size = batch_size or self.batch_size
        n_codes = [len(c) for c in items]
        fade = windows.to_codes(crossfade_seconds, "crossfade_seconds", SAMPLING_RATE)
        pieces = self._plan(n_codes, max_window_seconds, context_seconds, fade)
        piece_codes = [w.end - w.start for w in pieces]
        out: list[np.ndarray | None] = [None] * len(items)
        # Rows of equal length are written in place: stacking them at the end would copy all the audio.
        stacked = None if as_list else np.zeros((len(items), n_codes[0] * hop), np.float32)
        for batch in progress_bar(list(self._batches(piece_codes, batch_size)), "decode", "batch", progress):
            n = length_bucket(max(piece_codes[j] for j in batch))
            rows = batch_bucket(len(batch), size)
            padded = np.zeros((rows, n), np.int32)
            mask = np.zeros((rows, n), np.int32)
            for row, j in enumerate(batch):
                w = pieces[j]
                padded[row, : piece_codes[j]] = items[w.item][w.start : w.end]
                mask[row, : piece_codes[j]] = 1
            audio = np.asarray(self._decode(self.params, padded, mask))
            for row, j in enumerate(batch):
                w = pieces[j]
                if w.end - w.start == n_codes[w.item]:
                    if stacked is None:
                        out[w.item] = audio[row, : n_codes[w.item] * hop]
                    else:
                        stacked[w.item] = audio[row, : n_codes[w.item] * hop]
                    continue
                if out[w.item] is None:
                    out[w.item] = (
                        np.zeros(n_codes[w.item] * hop, np.float32) if stacked is None else stacked[w.item]
                    )
                windows.add_decoded(out[w.item], audio[row], w, hop)
        return out if stacked is None else stacked

    def _require_decoder(self) -> None:
        if self.encode_only:
            raise ValueError(
                "this codec holds only the encoder's weights (from_pretrained(encode_only=True)): "
                "load it without encode_only to decode"
            )

    def decode_stream(
        self,
        *,
        chunk: int | None = None,
        lookahead: int | None = None,
        context: int | None = None,
        batch_size: int = 1,
    ):
        """A :class:`~xcodec2_jax.stream.DecodeStream`: push codes as they are generated, get the audio
        that is final so far. Sizes are in codes (50 per second); None takes the measured defaults."""
        from . import stream

        self._require_decoder()
        return stream.DecodeStream(
            self,
            chunk=stream.DEFAULT_CHUNK if chunk is None else chunk,
            lookahead=stream.DEFAULT_LOOKAHEAD if lookahead is None else lookahead,
            context=stream.DEFAULT_CONTEXT if context is None else context,
            batch_size=batch_size,
        )


class _Background:
    """``fn(*args, **kwargs)`` on a daemon thread; ``join`` waits and turns its error into a warning."""

    def __init__(self, fn, *args, **kwargs):
        import threading

        self.error: BaseException | None = None

        def run():
            try:
                fn(*args, **kwargs)
            except Exception as e:  # reported by join; the caller's path works without it
                self.error = e

        self.thread = threading.Thread(target=run, name=f"xcodec2_jax {fn.__name__}", daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            import warnings

            warnings.warn(
                f"compiling ahead failed ({type(self.error).__name__}: {self.error}); "
                "encode compiles when first called",
                stacklevel=3,
            )


def progress_bar(items: list, desc: str, unit: str, enabled: bool = True):
    """tqdm over ``items`` (hidden when not on a terminal), or the items themselves if disabled."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, disable=None)
