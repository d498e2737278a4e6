"""The shared layers: Conv1d's lowerings against lax's convolution, and chunked attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xcodec2_jax.modeling.nn import layers


def _softmax_attention(q, k, v, scale, key_mask, bias):
    """Plain numpy float64 attention: q (B, H, Nq, D), k, v (B, H or 1, Nk, D)."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    if key_mask is not None:
        scores = np.where(key_mask[:, None, None, :], scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return np.matmul(scores / scores.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("chunk", [None, 8, 24])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_attention_chunks_match_plain_softmax(monkeypatch, chunk, kv_heads):
    # 70 queries: with chunks of 8 or 24 the last chunk is padded, which must not show.
    monkeypatch.setattr(layers, "_query_chunk", lambda shape: chunk)
    rng = np.random.default_rng(0)
    b, h, n, d = 2, 4, 70, 16
    q = rng.standard_normal((b, h, n, d)).astype(np.float32)
    k = rng.standard_normal((b, kv_heads, n, d)).astype(np.float32)
    v = rng.standard_normal((b, kv_heads, n, d)).astype(np.float32)
    key_mask = np.arange(n)[None, :] < np.array([[n], [41]])
    table = rng.standard_normal((n, n)).astype(np.float32)

    def bias(q_chunk, first):
        # Depends on the absolute query row, so a wrong chunk offset would show.
        rows = first + jnp.arange(q_chunk.shape[-2])
        return jnp.take(jnp.asarray(table), jnp.clip(rows, 0, n - 1), axis=0)

    out = layers.attention(q, k, v, scale=0.25, key_mask=key_mask, bias=bias, lowering="cpu")
    want = _softmax_attention(q, k, v, 0.25, key_mask, table)
    assert out.shape == (b, h, n, d)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5)


def test_query_chunk_rule():
    assert layers._query_chunk((1, 16, 32, 32)) is None  # too few queries to split
    size = layers._query_chunk((1, 16, 300, 300))
    assert size % 8 == 0 and 3 * size >= 300 > 2 * size
    size = layers._query_chunk((1, 16, 2000, 2000))  # 256 MB of scores: chunks of at most 16 MB
    assert size % 8 == 0 and 16 * size * 2000 * 4 <= 16 * 2**20 + 16 * 8 * 2000 * 4


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, groups",
    [
        (1, 1, 0, 1, 1),
        (3, 1, 1, 1, 1),
        (3, 1, 3, 3, 1),
        (2, 1, 0, 1, 1),
        (7, 1, 9, 3, 1),
        (4, 2, 1, 1, 1),
        (5, 1, 2, 1, 2),
    ],
)
@pytest.mark.parametrize("lowering", ["cpu", "generic"])
def test_conv1d_lowerings_match_lax_convolution(kernel, stride, padding, dilation, groups, lowering):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 37, 12)).astype(np.float32))
    conv = layers.Conv1d(
        10, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, lowering=lowering
    )
    params = conv.init(jax.random.PRNGKey(0), x)["params"]
    assert params["kernel"].shape == (kernel, 12 // groups, 10)
    out = conv.apply({"params": params}, x)
    want = jax.lax.conv_general_dilated(
        x,
        params["kernel"],
        (stride,),
        [(padding, padding)],
        rhs_dilation=(dilation,),
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
    )
    np.testing.assert_allclose(np.asarray(out), np.asarray(want + params["bias"]), atol=1e-5)


def test_conv1d_rejects_channels_not_divisible_by_groups():
    with pytest.raises(ValueError, match="divisible by groups"):
        layers.Conv1d(10, 3, groups=4).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 6)))
