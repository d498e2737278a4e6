"""Decoder path (codes/latents -> audio) against transformers' Xcodec2Model.decode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import module_params, rel_err

from xcodec2_jax import Xcodec2Config, Xcodec2Model
from xcodec2_jax.modeling.decoder import Decoder


def _decode_fn(config):
    model = Xcodec2Model(config)

    @jax.jit
    def decode(params, codes):
        return model.apply({"params": params}, codes, method=Xcodec2Model.decode).audio_values

    return decode


def _random_codes(config, batch, n, seed=0):
    return np.random.default_rng(seed).integers(0, config.codebook_size, (batch, 1, n)).astype(np.int32)


def _torch_decode(ref_model, codes=None, latents=None):
    with torch.no_grad():
        if codes is not None:
            return ref_model.decode(audio_codes=torch.from_numpy(codes).long()).audio_values.numpy()
        return ref_model.decode(latents=torch.from_numpy(latents)).audio_values.numpy()


@pytest.mark.parametrize("which", ["small_ref"])  # full_ref: parity/test_full_size.py
def test_decode_codes_matches_reference(which, request):
    ref = request.getfixturevalue(which)
    config = ref.config
    codes = _random_codes(config, 2, 40)
    expected = _torch_decode(ref.model, codes=codes)
    ours = np.asarray(_decode_fn(config)(ref.params, codes))
    assert ours.shape == expected.shape == (2, 1, 40 * config.hop_length)
    err, rel = rel_err(ours, expected)
    print(f"{which} decode(codes): max abs err {err:.3e}, relative to peak {rel:.3e}")
    assert rel <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("which", ["small_ref"])  # full_ref: parity/test_full_size.py
def test_decode_latents_matches_reference(which, request):
    ref = request.getfixturevalue(which)
    config = ref.config
    latents = np.random.default_rng(1).normal(size=(2, config.quantization_dim, 30)).astype(np.float32)
    expected = _torch_decode(ref.model, latents=latents)
    model = Xcodec2Model(config)
    ours = model.apply({"params": ref.params}, latents=jnp.asarray(latents), method=Xcodec2Model.decode)
    err, rel = rel_err(ours.audio_values, expected)
    print(f"{which} decode(latents): max abs err {err:.3e}, relative to peak {rel:.3e}")
    assert rel <= 1e-4


def test_batch_equals_single_decodes_and_vmap_equals_jit(small_ref):
    config = small_ref.config
    codes = _random_codes(config, 3, 25, seed=2)
    decode = _decode_fn(config)
    batched = np.asarray(decode(small_ref.params, codes))
    singles = np.concatenate([np.asarray(decode(small_ref.params, codes[i : i + 1])) for i in range(3)])
    np.testing.assert_allclose(batched, singles, rtol=0, atol=1e-5 * np.abs(singles).max())
    vmapped = jax.vmap(decode, in_axes=(None, 0))(small_ref.params, codes[:, None])
    np.testing.assert_allclose(np.asarray(vmapped)[:, 0], batched, rtol=0, atol=1e-5 * np.abs(batched).max())


def _identity_rope(monkeypatch):
    """Make the reference's rotary embedding the identity rotation (cos 1, sin 0)."""
    from transformers.models.xcodec2 import modeling_xcodec2

    def forward(self, x, position_ids):
        # One rotation for every head, so it broadcasts over grouped key/value heads too.
        shape = (position_ids.shape[0], 1, 2 * self.inv_freq.shape[0])
        return torch.ones(shape, dtype=x.dtype), torch.zeros(shape, dtype=x.dtype)

    monkeypatch.setattr(modeling_xcodec2.Xcodec2RotaryEmbedding, "forward", forward)


def test_reference_rope_is_a_no_op(small_ref, monkeypatch):
    """The reference rotates q and k of a head by the head's index, not by time: q·k is unchanged.

    Our decoder leaves RoPE out; this shows that equals the reference with it in (the parity tests
    above run the reference with RoPE) and with it out.
    """
    config = small_ref.config
    codes = _random_codes(config, 2, 30, seed=3)
    with_rope = _torch_decode(small_ref.model, codes=codes)
    _identity_rope(monkeypatch)
    without_rope = _torch_decode(small_ref.model, codes=codes)
    ours = np.asarray(_decode_fn(config)(small_ref.params, codes))
    _, rope_effect = rel_err(without_rope, with_rope)
    _, ours_vs_rope = rel_err(ours, with_rope)
    print(
        f"reference with vs without RoPE: {rope_effect:.3e}; ours vs reference with RoPE: {ours_vs_rope:.3e}"
    )
    assert rope_effect <= 1e-5
    assert ours_vs_rope <= 1e-4


@pytest.mark.slow
def test_grouped_kv_heads(monkeypatch):
    """GQA (4 heads, 2 kv heads). The reference's head-indexed RoPE cannot broadcast over fewer kv heads
    and raises; with its (no-op) RoPE removed it runs, and our decoder matches it."""
    from transformers import Xcodec2Config as TorchConfig
    from transformers.models.xcodec2.modeling_xcodec2 import Xcodec2Decoder

    kwargs = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        downsampling_ratios=[2, 3, 5],
        quantization_dim=96,
        semantic_model_config=dict(model_type="wav2vec2-bert", hidden_size=32, num_attention_heads=4),
    )
    torch.manual_seed(0)
    ref = Xcodec2Decoder(TorchConfig(**kwargs)).eval()
    x = np.random.default_rng(0).normal(size=(2, 20, 96)).astype(np.float32)
    with pytest.raises(RuntimeError), torch.no_grad():
        ref(torch.from_numpy(x))
    _identity_rope(monkeypatch)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()[:, 0]
    config = Xcodec2Config.from_dict(kwargs)
    module = Decoder(config)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = module_params(state, jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"])
    ours = module.apply({"params": params}, x)
    err, rel = rel_err(ours, expected)
    print(f"GQA decoder: max abs err {err:.3e}, relative to peak {rel:.3e}")
    assert rel <= 1e-4


@pytest.mark.parametrize(
    "codes, message",
    [
        (np.full((1, 1, 4), 5 * 5 * 5 * 4, np.int32), r"\[0, 500\)"),
        (np.full((1, 1, 4), -1, np.int32), r"\[0, 500\)"),
        (np.zeros((1, 4), np.int32), "shape"),
        (np.zeros((2, 2, 4), np.int32), "shape"),
        (np.zeros((1, 1, 4), np.float32), "integer dtype"),
        (np.zeros((1, 1, 0), np.int32), "empty"),
    ],
)
def test_bad_codes_raise_before_compiling(small_ref, codes, message):
    model = Xcodec2Model(small_ref.config)
    with pytest.raises(ValueError, match=message):
        model.apply({"params": small_ref.params}, codes, method=Xcodec2Model.decode)


def test_bad_codes_rank_and_dtype_raise_under_jit(small_ref):
    decode = _decode_fn(small_ref.config)
    with pytest.raises(ValueError, match="integer dtype"):
        decode(small_ref.params, np.zeros((1, 1, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        decode(small_ref.params, np.zeros((1, 4), np.int32))


def test_decode_needs_codes_or_latents(small_ref):
    model = Xcodec2Model(small_ref.config)
    with pytest.raises(ValueError, match="Either"):
        model.apply({"params": small_ref.params}, method=Xcodec2Model.decode)


def test_masked_batch_decodes_each_item_as_alone(small_ref):
    """With audio_codes_mask, padding in a batch does not change any item's audio."""
    config = small_ref.config
    hop = config.hop_length
    lengths = [25, 9, 17]
    codes = _random_codes(config, 3, 25, seed=4)
    mask = (np.arange(25)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    model = Xcodec2Model(config)
    decode = jax.jit(
        lambda p, c, m: (
            model.apply({"params": p}, c, audio_codes_mask=m, method=Xcodec2Model.decode).audio_values
        )
    )
    batched = np.asarray(decode(small_ref.params, codes, mask))
    for i, n in enumerate(lengths):
        alone = _torch_decode(small_ref.model, codes=codes[i : i + 1, :, :n])[0, 0]
        err, rel = rel_err(batched[i, 0, : n * hop], alone)
        print(f"item {i} ({n} codes): masked batch vs reference alone {rel:.3e} of peak")
        assert rel <= 1e-4
        assert not batched[i, 0, n * hop :].any()
    # Without the mask, padding leaks into the shorter items (the reference's behaviour).
    unmasked = np.asarray(_decode_fn(config)(small_ref.params, codes))
    alone = _torch_decode(small_ref.model, codes=codes[1:2, :, : lengths[1]])[0, 0]
    assert rel_err(unmasked[1, 0, : lengths[1] * hop], alone)[1] > 1e-3


def test_per_layer_params_decode_bit_identically(small_ref):
    """The decoder runs on its layers stacked (scanned) or per layer (layout.per_layer, what the codec
    holds so that XLA:CPU reads each layer's weights in place): the same audio, bit for bit, masked
    or not; params holding both forms are refused."""
    from xcodec2_jax.modeling.layout import per_layer

    config = small_ref.config
    codes = _random_codes(config, 2, 21, seed=7)
    mask = (np.arange(21)[None] < np.asarray([21, 12])[:, None]).astype(np.int32)
    model = Xcodec2Model(config)
    decode = jax.jit(
        lambda p, c, m: (
            model.apply({"params": p}, c, audio_codes_mask=m, method=Xcodec2Model.decode).audio_values
        )
    )
    split = per_layer(small_ref.params)
    assert "layers" not in split["acoustic_decoder"] and "layers_0" in split["acoustic_decoder"]
    assert "layers" in split["semantic_encoder"]["encoder"]  # the conformer stays stacked
    for m in (mask, np.ones_like(mask)):
        np.testing.assert_array_equal(
            np.asarray(decode(split, codes, m)), np.asarray(decode(small_ref.params, codes, m))
        )
    both = dict(
        split,
        acoustic_decoder=dict(
            split["acoustic_decoder"], layers=small_ref.params["acoustic_decoder"]["layers"]
        ),
    )
    with pytest.raises(ValueError, match="both a stacked 'layers' and per-layer"):
        decode(both, codes, mask)


def test_resnet_block_dropout_is_training_only_and_before_the_last_conv(small_ref):
    """X-Codec-2.0's training-time dropout sits after the second GroupNorm and SiLU, before conv2."""
    import flax

    from xcodec2_jax.modeling.decoder import ResNetBlock

    config = small_ref.config
    params = {"params": small_ref.params["acoustic_decoder"]["prior_net_0"]}
    x = jax.random.normal(jax.random.key(0), (2, 12, config.hidden_size))
    plain = ResNetBlock(config).apply(params, x)
    block = ResNetBlock(config, dropout_rate=0.5)
    np.testing.assert_array_equal(block.apply(params, x), plain)  # deterministic unless asked

    def train(key, rate=0.5):
        return ResNetBlock(config, dropout_rate=rate).apply(
            params, x, deterministic=False, rngs={"dropout": jax.random.key(key)}
        )

    np.testing.assert_array_equal(train(1), train(1))
    assert not np.array_equal(train(1), train(2)) and not np.array_equal(train(1), plain)
    # Everything dropped: conv2 sees zeros, so the block is its input plus conv2's bias.
    np.testing.assert_array_equal(train(1, rate=1.0), x + params["params"]["conv2"]["bias"])
    with pytest.raises(flax.errors.InvalidRngError):
        block.apply(params, x, deterministic=False)
