"""``Xcodec2Model``: the whole codec as one Flax module, with transformers' shapes at its boundary.

Inside, everything is channels-last; the public methods take and return the transformers shapes
(``input_values`` (B, 1, T), ``audio_codes`` (B, 1, N), ``latents`` (B, D, N), ``audio_values``
(B, 1, T)) so code written against transformers ports line by line.
"""

from __future__ import annotations

import functools
import threading

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ..config import Xcodec2Config
from ..utils import validation
from .acoustic import AcousticEncoder
from .decoder import Decoder
from .fsq import Quantizer
from .nn.layers import PrecisionLike, check_lowering, resolve_precision
from .semantic import SemanticAdapter, SemanticEncoder


@flax.struct.dataclass
class Xcodec2EncoderOutput:
    audio_codes: jnp.ndarray
    latents: jnp.ndarray | None = None
    audio_codes_mask: jnp.ndarray | None = None


@flax.struct.dataclass
class Xcodec2DecoderOutput:
    audio_values: jnp.ndarray


@flax.struct.dataclass
class Xcodec2Output:
    audio_values: jnp.ndarray
    audio_codes: jnp.ndarray
    latents: jnp.ndarray | None = None
    audio_codes_mask: jnp.ndarray | None = None


def validate_codes(audio_codes, codebook_size: int) -> None:
    """Raise ``ValueError`` for codes of the wrong rank, dtype or range.

    Rank and dtype are checked always (they are static under ``jit``); the range only when the
    values are concrete, i.e. outside a trace (:func:`xcodec2_jax.utils.validation.codes`).
    """
    shape = getattr(audio_codes, "shape", None)
    dtype = getattr(audio_codes, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"audio_codes must be an integer array of shape (B, 1, N), got {type(audio_codes)}")
    if len(shape) != 3 or shape[1] != 1:
        raise ValueError(f"audio_codes must have shape (batch, 1, num_codes), got {tuple(shape)}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"audio_codes must have an integer dtype, got {dtype}")
    if shape[2] == 0:
        raise ValueError("audio_codes is empty: num_codes must be at least 1")
    if not isinstance(audio_codes, jax.core.Tracer):
        validation.codes(np.asarray(audio_codes), codebook_size, "audio_codes")


class Xcodec2Model(nn.Module):
    """X-Codec2 in Flax.

    ``dtype`` is the compute dtype; FSQ, norms, softmax and ISTFT stay float32. ``precision`` is that
    of every other dot and convolution: ``None`` (the default) means HIGHEST for float32 compute,
    which the reference's codes need on GPUs and TPUs too, where XLA's DEFAULT computes float32 dots
    in TF32 or bfloat16 passes; ``"default"`` (or ``"tensorfloat32"``, ``"high"``) opts into that
    speed. FSQ's projections, the feature extractor and the ISTFT are HIGHEST whatever is chosen.
    ``lowering`` ("auto", "cpu", "generic") picks the device-specific variants of attention and
    small convolutions; "auto" chooses by the platform each program is compiled for.
    """

    config: Xcodec2Config
    dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None
    lowering: str = "auto"

    def __post_init__(self):
        resolve_precision(self.precision, self.dtype)  # a bad value fails here, not at first call
        check_lowering(self.lowering)
        super().__post_init__()

    def setup(self):
        cfg, dtype = self.config, self.dtype
        sem = cfg.semantic_model_config
        opts = dict(dtype=dtype, precision=resolve_precision(self.precision, dtype), lowering=self.lowering)
        self.semantic_encoder = SemanticEncoder(sem, **opts)
        self.semantic_adapter = SemanticAdapter(sem, **opts)
        self.acoustic_encoder = AcousticEncoder(cfg, **opts)
        fused = cfg.hidden_size + sem.hidden_size
        self.fc_encoder = nn.Dense(fused, dtype=dtype, precision=opts["precision"])
        self.quantizer = Quantizer(cfg, dtype=dtype)
        self.acoustic_decoder = Decoder(cfg, **opts)

    def encode(
        self,
        input_values: jnp.ndarray,
        input_features: jnp.ndarray,
        padding_mask: jnp.ndarray | None = None,
        input_features_mask: jnp.ndarray | None = None,
        output_latents: bool = False,
        isolate_items: bool = False,
    ) -> Xcodec2EncoderOutput:
        """Audio (B, 1, T) and stacked fbank features (B, T / hop, 160) -> codes (B, 1, T / hop).

        ``isolate_items`` (an extension of the reference, needs ``input_features_mask``): each item of
        a padded batch gets exactly the codes it would get alone, its valid length being its feature
        frames · hop. The acoustic encoder's convolutions and resamplers then see, past each item's
        end, the zero or replicate padding they would see alone, and the semantic adapter sees zeros.
        Without it (the default), the reference's behaviour, where batch padding can change an item's
        last codes.

        ``latents`` carry straight-through gradients, as the reference's: the FSQ rounding passes
        gradients as the identity, so ``jax.grad`` of a function of the latents reaches
        ``input_values`` (through the acoustic encoder) and the parameters of the acoustic encoder,
        semantic adapter, ``fc_encoder`` and quantizer. The semantic encoder (w2v-BERT) is frozen, as
        the reference runs it under ``torch.no_grad()``: no gradient to its parameters or to
        ``input_features``. The integer ``audio_codes`` have none.
        """
        hidden = self.encoder_hidden_states(input_values, input_features, input_features_mask, isolate_items)
        latents, codes = self.quantizer(hidden)
        audio_codes_mask = None
        if padding_mask is not None:
            # As the reference: valid codes = valid samples // hop, shaped like the mask's leading dims.
            token_length = jnp.sum(padding_mask, axis=-1, keepdims=True) // self.config.hop_length
            idx = jnp.arange(codes.shape[-1])
            audio_codes_mask = (idx < token_length).astype(padding_mask.dtype)
        return Xcodec2EncoderOutput(
            audio_codes=codes[:, None, :],
            latents=jnp.swapaxes(latents, 1, 2) if output_latents else None,
            audio_codes_mask=audio_codes_mask,
        )

    def encoder_hidden_states(
        self,
        input_values: jnp.ndarray,
        input_features: jnp.ndarray,
        input_features_mask: jnp.ndarray | None = None,
        isolate_items: bool = False,
        semantic_hidden_states: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """The pre-quantization hidden states (B, N, hidden_size + semantic hidden_size), the
        ``fc_encoder`` output that the reference's quantizer receives; arguments as :meth:`encode`.
        ``semantic_hidden_states`` (B, N, semantic hidden_size): :meth:`semantic_hidden_states` of
        these features when the caller already has them (training regresses on them too)."""
        if input_values.ndim != 3 or input_values.shape[1] != 1:
            raise ValueError(f"input_values must have shape (batch, 1, samples), got {input_values.shape}")
        if input_features.ndim != 3:
            raise ValueError(
                f"input_features must have shape (batch, frames, 160), got {input_features.shape}"
            )
        frames = None
        if isolate_items:
            if input_features_mask is None:
                raise ValueError("isolate_items=True needs input_features_mask")
            frames = jnp.sum(jnp.asarray(input_features_mask).astype(jnp.int32), axis=-1)
        if semantic_hidden_states is None:
            semantic_hidden_states = self.semantic_hidden_states(input_features, input_features_mask)
        semantic = self.semantic_adapter(
            semantic_hidden_states, None if frames is None else input_features_mask
        )
        waveform = jnp.swapaxes(input_values, 1, 2).astype(self.dtype)
        if frames is None:
            acoustic = self.acoustic_encoder(waveform)
        else:
            acoustic = self.acoustic_encoder(waveform, lengths=frames * self.config.hop_length)
        if semantic.shape[1] != acoustic.shape[1]:
            raise ValueError(
                f"input_features give {semantic.shape[1]} frames but input_values give {acoustic.shape[1]}; "
                f"use the feature extractor, which pads audio to a multiple of {self.config.hop_length}"
            )
        return self.fc_encoder(jnp.concatenate([semantic, acoustic.astype(semantic.dtype)], axis=-1))

    def semantic_hidden_states(
        self, input_features: jnp.ndarray, input_features_mask: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        """The frozen semantic encoder's output (B, F, semantic hidden_size): w2v-BERT's
        ``hidden_states[16]``, what the semantic adapter reads. No gradient flows through it, as the
        reference runs it under ``torch.no_grad()``."""
        semantic = self.semantic_encoder(input_features.astype(self.dtype), input_features_mask)
        return jax.lax.stop_gradient(semantic)

    def quantize(self, hidden_states: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """FSQ of :meth:`encoder_hidden_states`: (latents (B, N, quantization_dim) with straight-through
        gradients, codes (B, N) int32)."""
        return self.quantizer(hidden_states)

    def decode(
        self,
        audio_codes: jnp.ndarray | None = None,
        latents: jnp.ndarray | None = None,
        audio_codes_mask: jnp.ndarray | None = None,
    ) -> Xcodec2DecoderOutput:
        """Codes (B, 1, N) or latents (B, quantization_dim, N) -> audio (B, 1, N · hop).

        ``audio_codes_mask`` ((B, N) or (B, 1, N), 1 on valid codes, trailing padding) is an
        extension of the reference: with it, each item of a padded batch decodes to exactly the audio
        it would give alone (padding does not leak through attention, GroupNorm or the convolutions);
        samples past an item's ``valid codes · hop`` are zero. Without it, the reference's behaviour.
        """
        if audio_codes is None and latents is None:
            raise ValueError("Either `audio_codes` or `latents` must be provided.")
        if audio_codes is not None:
            validate_codes(audio_codes, self.config.codebook_size)
            hidden = self.quantizer.from_codes(audio_codes[:, 0, :])
        else:
            if latents.ndim != 3 or latents.shape[1] != self.config.quantization_dim:
                raise ValueError(
                    f"latents must have shape (batch, {self.config.quantization_dim}, num_codes), "
                    f"got {latents.shape}"
                )
            hidden = jnp.swapaxes(latents, 1, 2)
        mask = None
        if audio_codes_mask is not None:
            mask = jnp.asarray(audio_codes_mask).reshape(hidden.shape[0], -1)
            if mask.shape[1] != hidden.shape[1]:
                raise ValueError(
                    f"audio_codes_mask covers {mask.shape[1]} codes but there are {hidden.shape[1]}"
                )
        audio = self.acoustic_decoder(hidden, mask)
        return Xcodec2DecoderOutput(audio_values=audio[:, None, :])

    def __call__(
        self,
        input_values: jnp.ndarray,
        input_features: jnp.ndarray,
        padding_mask: jnp.ndarray | None = None,
        input_features_mask: jnp.ndarray | None = None,
        output_latents: bool = False,
    ) -> Xcodec2Output:
        """Encode then decode from the latents, trimming the audio to the input length."""
        enc = self.encode(
            input_values, input_features, padding_mask, input_features_mask, output_latents=True
        )
        audio = self.decode(latents=enc.latents).audio_values[..., : input_values.shape[-1]]
        return Xcodec2Output(
            audio_values=audio,
            audio_codes=enc.audio_codes,
            latents=enc.latents if output_latents else None,
            audio_codes_mask=enc.audio_codes_mask,
        )


_ABSTRACT_LOCK = threading.Lock()


def abstract_params(config: Xcodec2Config) -> dict:
    """Shapes and dtypes of the parameter tree, without allocating or computing anything.

    Cached per config (configs are hashable): tracing the full model takes seconds. Treat the
    returned tree as read-only. Threads asking at once (a load beside a compile ahead) share one
    trace."""
    with _ABSTRACT_LOCK:
        return _abstract_params(config)


@functools.lru_cache(maxsize=8)
def _abstract_params(config: Xcodec2Config) -> dict:
    hop = config.hop_length
    values = jax.ShapeDtypeStruct((1, 1, 2 * hop), jnp.float32)
    features = jax.ShapeDtypeStruct(
        (1, 2, config.semantic_model_config.feature_projection_input_dim), jnp.float32
    )
    # The parameters do not depend on the lowering; "generic" traces one variant instead of two.
    model = Xcodec2Model(config, lowering="generic")
    # An abstract key: a concrete one would be computed (and compiled) on the device first.
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    variables = jax.eval_shape(model.init, key, values, features)
    return variables["params"]


def init_params(config: Xcodec2Config, key: jax.Array) -> dict:
    """Random parameters of the whole codec (Flax's default initialisers), to train from scratch.

    Args:
        config: the model's shapes.
        key: a ``jax.random`` key.

    Returns:
        The parameter tree, float32, on the default device.
    """
    hop = config.hop_length
    values = jnp.zeros((1, 1, 2 * hop), jnp.float32)
    features = jnp.zeros((1, 2, config.semantic_model_config.feature_projection_input_dim), jnp.float32)
    model = Xcodec2Model(config, lowering="generic")
    return jax.jit(model.init)(key, values, features)["params"]
