"""Parity of the semantic modules against transformers' Wav2Vec2BertModel and Xcodec2SemanticAdapter."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import module_params

from xcodec2_jax.config import SemanticConfig
from xcodec2_jax.modeling.semantic import SemanticAdapter, SemanticEncoder, relative_distance_index

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Small and odd on purpose: head_dim 9, a clamp window (left 5, right 3) much shorter than the
# sequences, a depthwise kernel longer than the right context.
SMALL = dict(
    hidden_size=36,
    num_hidden_layers=5,
    num_attention_heads=4,
    intermediate_size=52,
    left_max_position_embeddings=5,
    right_max_position_embeddings=3,
    conv_depthwise_kernel_size=7,
    position_embeddings_type="relative_key",
)


def _torch_encoder(overrides: dict | None = None, attn="sdpa", seed=0):
    """A random Wav2Vec2BertModel with X-Codec2's semantic hyper-parameters (plus ``overrides``)."""
    base = transformers.Xcodec2Config().semantic_model_config.to_dict()
    base.update(overrides or {})
    tcfg = transformers.Wav2Vec2BertConfig(**base)
    tcfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.Wav2Vec2BertModel(tcfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layer_norm" in name:
                # Default ones/zeros would hide a norm applied at the wrong place or with the wrong affine.
                p.add_(0.2 * noise)
            elif "distance_embedding" in name:
                # The default N(0, 0.02) table makes the position bias negligible; make it count.
                p.copy_(0.5 * noise)
            elif p.ndim == 2 and "embedding" not in name:
                # Linear weights at ~1/sqrt(fan_in) so that attention is far from uniform.
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.add_(0.1 * (p.std() if p.numel() > 1 and p.std() > 0 else 1.0) * noise)
    return model, SemanticConfig.from_dict(base)


def _jax_params(torch_module, flax_module, *inputs, ignore=("masked_spec_embed",)):
    state = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    target = jax.eval_shape(flax_module.init, jax.random.PRNGKey(0), *inputs)["params"]
    return module_params(state, target, ignore=ignore)


def _report(label, got, want):
    err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
    peak = float(np.max(np.abs(want)))
    print(f"{label}: max abs err {err:.3e}, peak {peak:.3e}, relative {err / peak:.3e}")
    return err / peak


def _features(batch, frames, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, frames, 160)).astype(np.float32)


def _reference(model, x, mask=None):
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return model(torch.from_numpy(x), **kwargs).last_hidden_state.numpy()


def test_relative_distance_index_clamps():
    idx = relative_distance_index(6, left=2, right=1)
    assert idx.shape == (6, 6)
    # Entry [l, r] is clamp(r - l, -2, 1) + 2.
    assert idx[0].tolist() == [2, 3, 3, 3, 3, 3]
    assert idx[5].tolist() == [0, 0, 0, 0, 1, 2]


def test_small_config_parity():
    # sdpa is the reference's default attention; the padded-batch test covers eager as well.
    attn = "sdpa"
    model, cfg = _torch_encoder(SMALL, attn=attn)
    x = _features(2, 41)
    enc = SemanticEncoder(cfg)
    params = _jax_params(model, enc, x)
    got = jax.jit(enc.apply)({"params": params}, x)
    assert got.shape == (2, 41, 36) and got.dtype == jnp.float32
    assert _report(f"small ({attn})", got, _reference(model, x)) <= 1e-5


# The full default config is compared in parity/test_full_size.py (test_submodules_match_reference:
# the semantic encoder's output at the released sizes, on real speech, within 1e-4 of its peak).


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padded_batch(attn):
    model, cfg = _torch_encoder(SMALL, attn=attn, seed=3)
    lengths = [40, 27, 9]
    x = _features(3, 40, seed=2)
    mask = (np.arange(40)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    x[mask == 0] = 1.0  # the feature extractor pads with 1.0
    want = _reference(model, x, mask)
    enc = SemanticEncoder(cfg)
    params = _jax_params(model, enc, x, mask)
    apply = jax.jit(enc.apply)
    got = np.asarray(apply({"params": params}, x, mask))
    valid = mask.astype(bool)
    assert _report(f"padded batch ({attn}), valid frames", got[valid], want[valid]) <= 1e-5
    # Padded frames are not zero in the reference (layers run on them after the initial zeroing);
    # they are deterministic, so they are matched too.
    assert _report(f"padded batch ({attn}), padded frames", got[~valid], want[~valid]) <= 1e-5
    # Masking works: each valid part equals the item run alone without padding.
    for i, n in enumerate(lengths):
        alone = np.asarray(apply({"params": params}, x[i : i + 1, :n]))[0]
        assert np.max(np.abs(got[i, :n] - alone)) <= 1e-5 * np.max(np.abs(alone))
    # A boolean mask is accepted as well.
    np.testing.assert_array_equal(np.asarray(apply({"params": params}, x, valid)), got)


def test_no_position_embeddings():
    overrides = dict(SMALL, position_embeddings_type=None)
    model, cfg = _torch_encoder(overrides, attn="eager", seed=4)
    x = _features(1, 23, seed=4)
    enc = SemanticEncoder(cfg)
    params = _jax_params(model, enc, x)
    assert "distance_embedding" not in params["encoder"]["layers"]["self_attn"]
    got = enc.apply({"params": params}, x)
    assert _report("no position embeddings", got, _reference(model, x)) <= 1e-5


def test_adapter_parity():
    from transformers.models.xcodec2.modeling_xcodec2 import Xcodec2SemanticAdapter

    hidden = 36
    torch.manual_seed(5)
    ref = Xcodec2SemanticAdapter(
        types.SimpleNamespace(semantic_model_config=types.SimpleNamespace(hidden_size=hidden))
    )
    ref.eval()
    x = np.random.default_rng(5).standard_normal((2, 19, hidden)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).transpose(1, 2)).transpose(1, 2).numpy()
    adapter = SemanticAdapter(SemanticConfig(hidden_size=hidden, num_attention_heads=4))
    params = _jax_params(ref, adapter, x)
    got = jax.jit(adapter.apply)({"params": params}, x)
    assert got.shape == x.shape
    assert _report("adapter", got, want) <= 1e-5


def test_bfloat16_compute_runs_close():
    model, cfg = _torch_encoder(SMALL, seed=6)
    x = _features(1, 30, seed=6)
    params = _jax_params(model, SemanticEncoder(cfg), x)
    got = SemanticEncoder(cfg, dtype=jnp.bfloat16).apply({"params": params}, x)
    assert got.dtype == jnp.bfloat16
    want = _reference(model, x)
    # Loose: checks that the bf16 path computes the same function, not its accuracy.
    assert _report("bf16 compute", np.asarray(got, np.float32), want) <= 0.1


@pytest.mark.parametrize("kind", ["rotary", "relative"])
def test_unsupported_position_embeddings_raise(kind):
    cfg = SemanticConfig(**dict(SMALL, position_embeddings_type=kind))
    with pytest.raises(NotImplementedError, match=kind):
        SemanticEncoder(cfg)


def test_intermediate_ffn_rejected():
    with pytest.raises(ValueError, match="use_intermediate_ffn_before_adapter"):
        SemanticEncoder(SemanticConfig(**dict(SMALL, use_intermediate_ffn_before_adapter=True)))


def test_even_depthwise_kernel_rejected():
    with pytest.raises(ValueError, match="odd"):
        SemanticEncoder(SemanticConfig(**dict(SMALL, conv_depthwise_kernel_size=6)))
