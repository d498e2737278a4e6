"""Configuration of X-Codec2 as frozen (hashable) dataclasses.

The field names and defaults are those of transformers' ``Xcodec2Config`` and of the
``Wav2Vec2BertConfig`` it nests as ``semantic_model_config`` (with 16 layers, as X-Codec2 uses).
Being frozen and hashable, a config can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from ..utils.files import atomic_write_json
from .pretrained import CONFIG_NAME, config_dict, is_original_config

_SEMANTIC_MODEL_TYPE = "wav2vec2-bert"
_MODEL_TYPE = "xcodec2"


def _check_positive(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


def _known_fields(cls, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class SemanticConfig:
    """The Wav2Vec2-BERT conformer that computes semantic features (``semantic_model_config``)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    feature_projection_input_dim: int = 160
    hidden_act: str = "swish"
    layer_norm_eps: float = 1e-5
    position_embeddings_type: str | None = "relative_key"
    rotary_embedding_base: int = 10000
    max_source_positions: int = 5000
    left_max_position_embeddings: int = 64
    right_max_position_embeddings: int = 8
    conv_depthwise_kernel_size: int = 31
    add_adapter: bool = False
    use_intermediate_ffn_before_adapter: bool = False
    model_type: str = _SEMANTIC_MODEL_TYPE

    def __post_init__(self):
        if self.model_type != _SEMANTIC_MODEL_TYPE:
            raise ValueError(
                f"semantic_model_config.model_type must be {_SEMANTIC_MODEL_TYPE!r}, got {self.model_type!r}"
            )
        _check_positive(
            self,
            (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "feature_projection_input_dim",
                "conv_depthwise_kernel_size",
            ),
        )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"semantic_model_config.hidden_size ({self.hidden_size}) is not divisible by "
                f"semantic_model_config.num_attention_heads ({self.num_attention_heads})"
            )
        if self.add_adapter:
            raise ValueError(
                "semantic_model_config.add_adapter=True is not used by X-Codec2 and not supported"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SemanticConfig:
        return cls(**_known_fields(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Xcodec2Config:
    """X-Codec2 hyper-parameters, equal by default to transformers' ``Xcodec2Config()``."""

    # Decoder transformer.
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 64
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # Acoustic encoder.
    encoder_hidden_size: int = 48
    downsampling_ratios: tuple[int, ...] = (2, 2, 4, 4, 5)
    sampling_rate: int = 16000
    # Quantizer.
    quantization_dim: int = 2048
    quantization_levels: tuple[int, ...] = (4, 4, 4, 4, 4, 4, 4, 4)
    semantic_model_config: SemanticConfig = field(default_factory=SemanticConfig)
    model_type: str = _MODEL_TYPE

    def __post_init__(self):
        if self.model_type != _MODEL_TYPE:
            raise ValueError(f"model_type must be {_MODEL_TYPE!r}, got {self.model_type!r}")
        # Lists from JSON become tuples so the config stays hashable.
        for name in ("downsampling_ratios", "quantization_levels"):
            value = getattr(self, name)
            if isinstance(value, str) or not hasattr(value, "__iter__"):
                raise ValueError(f"{name} must be a sequence of positive integers, got {value!r}")
            value = tuple(value)
            if not value or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in value):
                raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {value!r}")
            object.__setattr__(self, name, value)
        if isinstance(self.semantic_model_config, dict):
            object.__setattr__(
                self, "semantic_model_config", SemanticConfig.from_dict(self.semantic_model_config)
            )
        _check_positive(
            self,
            (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "encoder_hidden_size",
                "sampling_rate",
                "quantization_dim",
            ),
        )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not divisible by num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        fused = self.hidden_size + self.semantic_model_config.hidden_size
        if self.quantization_dim != fused:
            # fc_encoder emits hidden_size + semantic hidden_size features, which project_in consumes.
            raise ValueError(
                f"quantization_dim ({self.quantization_dim}) must equal hidden_size + "
                f"semantic_model_config.hidden_size ({fused})"
            )
        if self.hidden_size % 32:
            # The decoder's ResNet blocks use GroupNorm with 32 groups.
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by 32 (GroupNorm groups)")
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    @property
    def hop_length(self) -> int:
        return math.prod(self.downsampling_ratios)

    @property
    def n_fft(self) -> int:
        return 4 * self.hop_length

    @property
    def codebook_size(self) -> int:
        return math.prod(self.quantization_levels)

    @property
    def frame_rate(self) -> float:
        return self.sampling_rate / self.hop_length

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Xcodec2Config:
        """Build from a transformers-style ``config.json`` dict; keys that do not shape the model are
        ignored. The original release's ``config.json`` (``BigCodecConfig``) holds almost no shapes and
        is refused: its checkpoint's config comes from the weights (:meth:`from_pretrained` on the
        directory, or ``load_checkpoint``)."""
        if is_original_config(data):
            raise ValueError(
                "this is the original X-Codec2 release's config.json (BigCodecConfig), which does not "
                "describe the model's shapes; read the checkpoint directory instead: "
                "Xcodec2Config.from_pretrained(directory) or xcodec2_jax.load_checkpoint(directory) "
                "infer them from the weights"
            )
        data = dict(data)
        rope = data.pop("rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters.rope_type {rope.get('rope_type')!r} is not supported")
        if "rope_theta" in rope:
            data.setdefault("rope_theta", float(rope["rope_theta"]))
        if data.get("head_dim") is None and "hidden_size" in data and "num_attention_heads" in data:
            data["head_dim"] = data["hidden_size"] // data["num_attention_heads"]
        if data.get("num_key_value_heads") is None:
            data.pop("num_key_value_heads", None)
            if "num_attention_heads" in data:
                data["num_key_value_heads"] = data["num_attention_heads"]
        kwargs = _known_fields(cls, data)
        semantic = kwargs.get("semantic_model_config")
        if semantic is None:
            kwargs.pop("semantic_model_config", None)
        elif isinstance(semantic, dict):
            kwargs["semantic_model_config"] = SemanticConfig.from_dict(semantic)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["downsampling_ratios"] = list(self.downsampling_ratios)
        data["quantization_levels"] = list(self.quantization_levels)
        data["rope_parameters"] = {"rope_type": "default", "rope_theta": data.pop("rope_theta")}
        return data

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Xcodec2Config:
        """The config of a checkpoint (directory or weights file, any format the loader reads: the
        same config ``load_checkpoint`` gives), or of a transformers-style ``config.json`` file.
        A malformed ``config.json`` is a ``ValueError`` naming the file."""
        return cls.from_dict(config_dict(path))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``directory/config.json`` (transformers' layout), atomically."""
        atomic_write_json(os.path.join(directory, CONFIG_NAME), self.to_dict(), sync=False)
