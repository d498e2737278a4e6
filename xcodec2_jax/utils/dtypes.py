"""The one map between dtype names (as the CLI, configs and files write them) and dtypes."""

from __future__ import annotations

from typing import Any

import numpy as np

# Compute dtypes a user may name (CLI ``--dtype``, ``tokenize(dtype=...)``, training configs).
COMPUTE_DTYPES = ("float32", "bfloat16")


def to_dtype(name_or_dtype: Any) -> np.dtype:
    """A numpy dtype from a name (``"float32"``, ``"bfloat16"``, ``"BF16"``-style safetensors names
    excluded) or from anything ``np.dtype`` takes; bfloat16 is ml_dtypes', which JAX uses."""
    if isinstance(name_or_dtype, str) and name_or_dtype.lower() == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(name_or_dtype)
    except TypeError:
        raise ValueError(f"not a dtype: {name_or_dtype!r}") from None


def compute_dtype(name: Any) -> np.dtype:
    """A compute dtype by name (:data:`COMPUTE_DTYPES`) or dtype; ValueError for anything else."""
    dtype = to_dtype(name)
    if dtype.name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {list(COMPUTE_DTYPES)}, got {name!r}")
    return dtype


def dtype_name(dtype: Any) -> str:
    """The name of a dtype (``"float32"``, ``"bfloat16"``)."""
    return to_dtype(dtype).name
