"""Configs: frozen, hashable ``Xcodec2Config`` / ``SemanticConfig`` (usable as static arguments of
``jax.jit``), parsed from a checkpoint's ``config.json`` or inferred from an original checkpoint."""

from .original import config_from_original, is_original_format
from .pretrained import config_dict, is_original_config
from .xcodec2 import SemanticConfig, Xcodec2Config

__all__ = [
    "SemanticConfig",
    "Xcodec2Config",
    "config_dict",
    "config_from_original",
    "is_original_config",
    "is_original_format",
]
