"""Convolution and normalisation layers shared by the modules, channels-last."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PrecisionLike = str | jax.lax.Precision | None

# How device-specific choices are lowered: "auto" picks, at lowering time, the CPU variant for CPU
# and the generic one for every other platform (``jax.lax.platform_dependent``), so a program
# compiled for a GPU or TPU from a process whose default backend is the CPU (or the reverse) gets
# the right one. "cpu" and "generic" force a variant.
LOWERINGS = ("auto", "cpu", "generic")


def resolve_precision(precision: PrecisionLike, dtype: Any = jnp.float32) -> jax.lax.Precision:
    """The ``lax.Precision`` of every dot and convolution for a compute ``dtype``.

    ``None`` means HIGHEST for float32 compute: with ``Precision.DEFAULT``, XLA runs float32 dots
    in TF32 on A100/H100 and in one bfloat16 pass on TPUs, which moves FSQ's rounding boundaries
    and changes codes. For lower compute dtypes ``None`` means DEFAULT (the inputs are already
    rounded). Strings are ``lax.Precision``'s names: "highest", "high" / "tensorfloat32", "default".
    """
    if precision is None:
        return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT
    if isinstance(precision, jax.lax.Precision):
        return precision
    if isinstance(precision, str):
        try:
            return jax.lax.Precision(precision.lower())
        except ValueError:
            pass
    raise ValueError(
        f"precision must be None, a jax.lax.Precision or one of 'highest', 'high', 'tensorfloat32', "
        f"'default'; got {precision!r}"
    )


def check_lowering(lowering: str) -> str:
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")
    return lowering


def by_platform(lowering: str, cpu: Callable, generic: Callable, *args):
    """``cpu(*args)`` or ``generic(*args)`` as ``lowering`` says (see :data:`LOWERINGS`)."""
    if check_lowering(lowering) == "cpu":
        return cpu(*args)
    if lowering == "generic":
        return generic(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=generic)


def zero_masked(x: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
    """x (B, T, C) with the frames where the boolean ``mask`` (B, T) is false set to zero; x if no mask."""
    return x if mask is None else jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))


class Conv1d(nn.Module):
    """A torch ``Conv1d`` on (B, T, C) inputs with symmetric zero padding.

    Parameters as ``flax.linen.Conv``: ``kernel`` (kernel_size, in_features // groups, features) and
    ``bias`` (features,), float32, cast to ``dtype`` for the compute, at ``precision`` (see
    :func:`resolve_precision`). On the CPU (``lowering``, see :data:`LOWERINGS`) the lowering is
    picked per shape, measured under XLA:CPU (2 cores, full config): a 1-wide kernel is a plain
    matmul (the convolution op is ~30% slower there); a 2- or 3-wide one is one matmul over the
    concatenated shifted inputs (up to 1.5x faster than the convolution op on 1024 channels); wider,
    strided or grouped kernels, and every kernel on other platforms, use
    ``lax.conv_general_dilated``.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    precision: PrecisionLike = None
    lowering: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        in_features = x.shape[-1]
        if in_features % self.groups or self.features % self.groups:
            raise ValueError(
                f"channels ({in_features} in, {self.features} out) must be divisible by "
                f"groups ({self.groups})"
            )
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (self.kernel_size, in_features // self.groups, self.features),
            jnp.float32,
        ).astype(self.dtype)
        x = x.astype(self.dtype)
        k, pad, dil = self.kernel_size, self.padding, self.dilation
        precision = resolve_precision(self.precision, self.dtype)

        def conv_op(x, kernel):
            return jax.lax.conv_general_dilated(
                x,
                kernel,
                (self.stride,),
                [(pad, pad)],
                rhs_dilation=(dil,),
                dimension_numbers=("NWC", "WIO", "NWC"),
                feature_group_count=self.groups,
                precision=precision,
            )

        def as_matmul(x, kernel):
            if pad:
                x = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
            n = x.shape[1] - dil * (k - 1)
            if k > 1:
                x = jnp.concatenate([x[:, i * dil : i * dil + n] for i in range(k)], axis=-1)
            return jnp.dot(x, kernel.reshape(k * in_features, self.features), precision=precision)

        if self.groups == 1 and self.stride == 1 and k <= 3:
            y = by_platform(self.lowering, as_matmul, conv_op, x, kernel)
        else:
            y = conv_op(x, kernel)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def conv1d(
    features: int,
    kernel_size: int,
    *,
    padding: int = 0,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    use_bias: bool = True,
    dtype=jnp.float32,
    precision: PrecisionLike = None,
    lowering: str = "auto",
    name: str | None = None,
) -> Conv1d:
    """A torch ``Conv1d`` with symmetric zero padding, on (B, T, C) inputs (``name`` only outside setup)."""
    return Conv1d(
        features,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        use_bias=use_bias,
        dtype=dtype,
        precision=precision,
        lowering=lowering,
        name=name,
    )


def scan_layers(layer: type[nn.Module], length: int) -> type[nn.Module]:
    """A module class that runs ``length`` copies of ``layer`` one after the other, traced once.

    It takes ``layer``'s fields, and its call ``(x, *args)`` returns the last layer's output, each
    layer's ``x`` being the previous one's output and ``args`` broadcast to all. The parameters are
    ``layer``'s, stacked on a leading axis of size ``length`` (``nn.scan``): compile time no longer
    grows with depth, and the checkpoint loaders stack the per-layer tensors at load time.
    """
    return _scanned(layer, length)


def run_layers(
    parent: nn.Module, layer: type[nn.Module], length: int, name: str, fields: tuple, x, *args
) -> jnp.ndarray:
    """``scan_layers(layer, length)(*fields, name=name)(x, *args)``, or, where ``parent``'s parameters
    hold the layers one by one (``name_0`` ... ``name_{length-1}``, the checkpoints' per-layer layout:
    ``layout.per_layer``), the same layers run one after the other on their own arrays. Call it from
    ``parent``'s compact ``__call__``; ``init`` creates the stacked form.

    Why both: on XLA:CPU each layer's weights sliced out of the stacked arrays are copied on every
    call (the dots take whole buffers only): for the full decoder ~48 MB per layer, ~0.58 GB and ~8%
    of a decode. Per-layer arrays are read in place. The results are bit-identical.
    """
    params = {} if parent.is_initializing() else parent.variables.get("params", {})
    if f"{name}_0" in params:
        if name in params:
            raise ValueError(f"parameters hold both a stacked {name!r} and per-layer {name}_i entries")
        for i in range(length):
            x = layer(*fields, name=f"{name}_{i}")(x, *args)
        return x
    return scan_layers(layer, length)(*fields, name=name)(x, *args)


@functools.cache
def _scanned(layer: type[nn.Module], length: int) -> type[nn.Module]:
    class Step(layer):
        def __call__(self, x, *args):
            return super().__call__(x, *args), None

    scanned = nn.scan(
        Step, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast, length=length
    )

    class Layers(scanned):
        def __call__(self, x, *args):
            return super().__call__(x, *args)[0]

    Layers.__name__ = Layers.__qualname__ = f"Scanned{layer.__name__}"
    return Layers


class RMSNorm(nn.Module):
    """T5-style RMSNorm; the statistics run in float32 and the scale multiplies after the cast back."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (scale * x32.astype(x.dtype)).astype(self.dtype)


class GroupNorm(nn.Module):
    """torch ``GroupNorm`` on (B, T, C), in float32, with optional per-frame validity.

    With ``mask`` (B, T), the statistics cover only the valid frames, so a padded item is normalised
    exactly as it would be alone. Variance is two-pass (biased, as torch) for accuracy.
    """

    num_groups: int = 32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        b, t, c = x.shape
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        g = x.astype(jnp.float32).reshape(b, t, self.num_groups, c // self.num_groups)
        if mask is None:
            mean = jnp.mean(g, axis=(1, 3), keepdims=True)
            var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
        else:
            m = mask.astype(jnp.float32)[:, :, None, None]
            count = jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0) * (c // self.num_groups)
            mean = jnp.sum(g * m, axis=(1, 3), keepdims=True) / count
            var = jnp.sum(jnp.square(g - mean) * m, axis=(1, 3), keepdims=True) / count
        y = ((g - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(b, t, c)
        return y * scale + bias


# Score bytes per query chunk above which attention is split further (see `attention`).
_CHUNK_SCORE_BYTES = 16 * 2**20


def _query_chunk(score_shape: tuple[int, ...]) -> int | None:
    """Queries per chunk for `attention`'s CPU lowering, or None for one piece."""
    num_queries = score_shape[-2]
    if num_queries < 64:
        return None
    total = 4 * int(np.prod(score_shape))
    chunks = max(3, -(-total // _CHUNK_SCORE_BYTES))
    size = -(-num_queries // chunks)
    size = -(-size // 8) * 8
    return size if size < num_queries else None


def attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    scale: float | None = None,
    key_mask: jnp.ndarray | None = None,
    bias: Callable[[jnp.ndarray, Any], jnp.ndarray] | None = None,
    precision: PrecisionLike = None,
    lowering: str = "auto",
) -> jnp.ndarray:
    """Softmax attention over the last two axes: q (B, ..., Nq, D), k and v (B, ..., Nk, D) -> like q.

    The head axes of k and v broadcast against q's (grouped key/value heads). Logits are
    ``q·k`` (times ``scale`` if given) plus ``bias(q_chunk, first_query)`` if given, in q's dtype,
    then float32; ``key_mask`` (B, Nk), true on valid keys, gives the others the float32 minimum.
    Softmax in float32, the weights cast back to v's dtype. Both products run at ``precision``
    (see :func:`resolve_precision`).

    On the CPU (``lowering``, see :data:`LOWERINGS`) the queries are processed in a few chunks (a
    loop): the (Nq, Nk) score matrices then stay in cache between the matmul, the softmax and the
    second matmul, which measured 1.6-2.5x faster for the whole attention core from 300 to 1000
    frames on 2 cores. Each chunk's result is the same computation on fewer rows, so the output is unchanged.
    """
    precision = resolve_precision(precision, q.dtype)
    b = q.shape[0]
    extra = q.ndim - 3  # head axes between batch and queries
    mask = None
    if key_mask is not None:
        mask = jnp.asarray(key_mask).astype(bool).reshape((b,) + (1,) * (extra + 1) + (k.shape[-2],))

    def attend(qc, first):
        scores = jnp.matmul(qc, jnp.swapaxes(k, -1, -2), precision=precision)
        if scale is not None:
            scores = scores * jnp.asarray(scale, scores.dtype)
        if bias is not None:
            scores = scores + bias(qc, first)
        scores = scores.astype(jnp.float32)
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        return jnp.matmul(jax.nn.softmax(scores, axis=-1).astype(v.dtype), v, precision=precision)

    num_queries = q.shape[-2]
    size = _query_chunk(q.shape[:-1] + (k.shape[-2],))
    if size is None:
        return attend(q, 0)

    def chunked(q):
        chunks = -(-num_queries // size)
        padded = jnp.pad(q, [(0, 0)] * (q.ndim - 2) + [(0, chunks * size - num_queries), (0, 0)])
        pieces = jnp.moveaxis(padded.reshape(q.shape[:-2] + (chunks, size, q.shape[-1])), -3, 0)
        starts = jnp.arange(chunks, dtype=jnp.int32) * size
        out = jax.lax.map(lambda xs: attend(*xs), (pieces, starts))
        out = jnp.moveaxis(out, 0, -3).reshape(q.shape[:-2] + (chunks * size, out.shape[-1]))
        return out[..., :num_queries, :]

    return by_platform(lowering, chunked, lambda q: attend(q, 0), q)
