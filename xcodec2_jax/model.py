"""``Xcodec2Model``: the whole codec as one Flax module, with transformers' shapes at its boundary.

Inside, everything is channels-last; the public methods take and return the transformers shapes
(``input_values`` (B, 1, T), ``audio_codes`` (B, 1, N), ``latents`` (B, D, N), ``audio_values``
(B, 1, T)) so code written against transformers ports line by line.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .acoustic import AcousticEncoder
from .checkpoint.io import flatten, unflatten
from .config import Xcodec2Config
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


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def validate_codes(audio_codes, codebook_size: int) -> None:
    """Raise ``ValueError`` for codes of the wrong rank, dtype or range.

    Rank and dtype are checked always (they are static under ``jit``); the range only when the
    values are concrete, i.e. outside a trace.
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
    if _is_concrete(audio_codes):
        values = np.asarray(audio_codes)
        low, high = values.min(), values.max()
        if low < 0 or high >= codebook_size:
            raise ValueError(f"audio_codes must lie in [0, {codebook_size}), found values in [{low}, {high}]")


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
    ) -> jnp.ndarray:
        """The pre-quantization hidden states (B, N, hidden_size + semantic hidden_size), the
        ``fc_encoder`` output that the reference's quantizer receives; arguments as :meth:`encode`."""
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
        semantic = self.semantic_encoder(input_features.astype(self.dtype), input_features_mask)
        semantic = jax.lax.stop_gradient(semantic)  # frozen, as the reference's torch.no_grad()
        semantic = self.semantic_adapter(semantic, None if frames is None else input_features_mask)
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


def scanned_layers(config: Xcodec2Config) -> dict[tuple[str, ...], int]:
    """Parent module path -> number of identical layers stored stacked under ``parent + ("layers",)``.

    Checkpoints keep one entry per layer (``...layers.3.x``, path ``parent + ("layers_3", "x")``);
    the model's parameter tree holds them stacked on a leading axis (``parent + ("layers", "x")`` of
    shape ``(num_layers, *shape)``) so the layer is traced once and scanned. The loaders convert
    with :func:`stack_layers` / :func:`unstack_layers`.
    """
    return {
        ("semantic_encoder", "encoder"): config.semantic_model_config.num_hidden_layers,
        ("acoustic_decoder",): config.num_hidden_layers,
    }


def _layer_slot(path: tuple[str, ...], stacks: Mapping[tuple[str, ...], int]):
    """(stacked path, layer index) of a checkpoint-layout path under a scanned parent, else None."""
    for parent, count in stacks.items():
        n = len(parent)
        if len(path) > n + 1 and path[:n] == parent and path[n].startswith("layers_"):
            index = path[n][len("layers_") :]
            if index.isdigit() and int(index) < count:
                return parent + ("layers",) + path[n + 1 :], int(index)
    return None


def stack_layers(flat: Mapping[tuple[str, ...], Any], config: Xcodec2Config) -> dict:
    """Flat ``{path: array}`` in checkpoint layout (``layers_i``) -> nested model parameter tree.

    Every layer of a stack must be present (the strict loaders check that first). numpy arrays stack
    on the host, jax arrays where they are.
    """
    stacks = scanned_layers(config)
    out: dict[tuple[str, ...], Any] = {}
    groups: dict[tuple[str, ...], dict[int, Any]] = {}
    for path, value in flat.items():
        slot = _layer_slot(path, stacks)
        if slot is None:
            out[path] = value
        else:
            groups.setdefault(slot[0], {})[slot[1]] = value
    for path, layers in groups.items():
        values = [layers[i] for i in range(len(layers))]
        out[path] = (np if all(isinstance(v, np.ndarray) for v in values) else jnp).stack(values)
    return unflatten(out)


def unstack_layers(params: Mapping[str, Any], config: Xcodec2Config) -> dict:
    """Nested model parameter tree -> flat ``{path: array}`` in checkpoint layout (``layers_i``).

    ``jax.ShapeDtypeStruct`` leaves give per-layer ``ShapeDtypeStruct``s."""
    out = {}
    for path, value in flatten(params).items():
        parent = next((p for p in scanned_layers(config) if path[: len(p) + 1] == p + ("layers",)), None)
        if parent is None:
            out[path] = value
            continue
        rest = path[len(parent) + 1 :]
        for i in range(value.shape[0]):
            if isinstance(value, jax.ShapeDtypeStruct):
                layer = jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
            else:
                layer = value[i]
            out[parent + (f"layers_{i}",) + rest] = layer
    return out


def keeps_float32(path: tuple[str, ...]) -> bool:
    """True for a parameter of a float32 island, which a lower-precision cast of the params skips.

    FSQ (``quantizer``: its rounding boundaries and codebook rows must be exact), every norm's
    affine parameters (the norms compute in float32), SnakeBeta's ``alpha``/``beta`` (evaluated in
    float32) and the ISTFT head (exp() of its output amplifies any error).
    """
    if path[0] == "quantizer" or path[-1] in ("alpha", "beta") or path[:2] == ("acoustic_decoder", "head"):
        return True
    return any("norm" in part for part in path[:-1])


def checkpoint_shapes(config: Xcodec2Config) -> dict:
    """Flat ``{path: ShapeDtypeStruct}`` of every parameter in checkpoint layout (one entry per layer)."""
    return unstack_layers(abstract_params(config), config)


# The model's top-level modules, the first level of its parameter tree (tests check the two agree).
MODULES = (
    "semantic_encoder",
    "semantic_adapter",
    "acoustic_encoder",
    "fc_encoder",
    "quantizer",
    "acoustic_decoder",
)
# Those whose parameters ``encode`` reads: all but the decoder (70% of the full model's bytes).
ENCODE_MODULES = MODULES[:-1]

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


def init_params(config: Xcodec2Config, rng: jax.Array | None = None) -> dict:
    """Randomly initialised parameters (for training from scratch or tests)."""
    hop = config.hop_length
    rng = jax.random.PRNGKey(0) if rng is None else rng
    values = jnp.zeros((1, 1, 2 * hop), jnp.float32)
    features = jnp.zeros((1, 2, config.semantic_model_config.feature_projection_input_dim), jnp.float32)
    return Xcodec2Model(config).init(rng, values, features)["params"]
