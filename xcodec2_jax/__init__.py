"""xcodec2_jax: the X-Codec2 speech codec (16 kHz speech <-> 50 tokens/s) in JAX/Flax."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .utils.version import __version__  # noqa: F401 (the package's version)

# Public name -> defining module. Resolved on first use so that `import xcodec2_jax` (and the CLI's
# start-up) does not pay for importing Flax and building every module.
_EXPORTS = {
    "Xcodec2Config": "config",
    "SemanticConfig": "config",
    "Xcodec2Model": "modeling.model",
    "load_params": "checkpoint",
    "CheckpointMismatchError": "checkpoint",
    "Xcodec2FeatureExtractor": "modeling.features",
    "fbank_features_jax": "modeling.features",
    "Xcodec2Codec": "inference.codec",
    "EncodedAudio": "inference.codec",
    "load_checkpoint": "checkpoint",
    "tokenize": "corpus",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # static names for type checkers and IDEs; at run time __getattr__ resolves them
    from .checkpoint import CheckpointMismatchError, load_checkpoint, load_params  # noqa: F401
    from .config import SemanticConfig, Xcodec2Config  # noqa: F401
    from .corpus import tokenize  # noqa: F401
    from .inference.codec import EncodedAudio, Xcodec2Codec  # noqa: F401
    from .modeling.features import Xcodec2FeatureExtractor, fbank_features_jax  # noqa: F401
    from .modeling.model import Xcodec2Model  # noqa: F401


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
