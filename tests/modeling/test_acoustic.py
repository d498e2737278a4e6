"""Parity of the anti-aliased SnakeBeta and the acoustic encoder against transformers' PyTorch code."""

import jax
import jax.numpy as jnp  # noqa: E402
import numpy as np
import pytest

torch = pytest.importorskip("torch")
modeling = pytest.importorskip("transformers.models.xcodec2.modeling_xcodec2")
TorchConfig = pytest.importorskip("transformers.models.xcodec2.configuration_xcodec2").Xcodec2Config

from xcodec2_jax.checkpoint import convert_state_dict  # noqa: E402
from xcodec2_jax.config import Xcodec2Config  # noqa: E402
from xcodec2_jax.modeling.acoustic import AcousticEncoder  # noqa: E402
from xcodec2_jax.modeling.nn import activations as act  # noqa: E402

LENGTHS = [1, 3, 6, 7, 13, 1001]
SMALL = dict(
    hidden_size=64, encoder_hidden_size=16, downsampling_ratios=(2, 3, 4), quantization_dim=64 + 1024
)
TINY = dict(hidden_size=32, encoder_hidden_size=8, downsampling_ratios=(2, 5), quantization_dim=32 + 1024)


def _randomize_snakes(module, seed=0):
    # The reference initialises alpha = beta = 0, which would hide any mix-up between them.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, modeling.Xcodec2SnakeBeta):
                m.alpha.copy_(torch.rand(m.alpha.shape, generator=gen) - 0.5)
                m.beta.copy_(torch.rand(m.beta.shape, generator=gen) - 0.5)
    return module


def _torch_apply(module, x_btc):
    """Run a channels-first torch module on a channels-last numpy array."""
    with torch.no_grad():
        out = module(torch.from_numpy(np.ascontiguousarray(x_btc.transpose(0, 2, 1))))
    return out.numpy().transpose(0, 2, 1)


def _random(shape, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _speech_like(batch, length, seed=0):
    """A chirp with a tremolo plus noise: broadband, with the level changes of speech."""
    t = np.arange(length) / 16000
    rng = np.random.default_rng(seed)
    waves = []
    for i in range(batch):
        chirp = np.sin(2 * np.pi * (80 + 150 * i + 3000 * t) * t)
        envelope = 0.4 + 0.3 * np.sin(2 * np.pi * 3 * t + i)
        waves.append(envelope * chirp + 0.03 * rng.standard_normal(length))
    return np.stack(waves).astype(np.float32)[:, :, None]


# --------------------------------------------------------------------------------------------------
# Filters, resamplers and the activation


def test_kaiser_sinc_filter_matches_reference():
    for ratio in (2, 3):
        for kernel in (12, 11):
            ref = modeling.kaiser_sinc_filter1d(0.5 / ratio, 0.6 / ratio, kernel).numpy().ravel()
            np.testing.assert_allclose(
                act.kaiser_sinc_filter1d(0.5 / ratio, 0.6 / ratio, kernel), ref, atol=1e-7
            )


@pytest.mark.parametrize("length", LENGTHS)
def test_upsample_matches_reference(length):
    x = _random((2, length, 3), length)
    ref = _torch_apply(modeling.Xcodec2UpSample1d(2, 12), x)
    out = np.asarray(jax.jit(act.upsample1d)(jnp.asarray(x)))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("length", LENGTHS + [2 * 257 + 1])
def test_downsample_matches_reference(length):
    x = _random((2, length, 3), length)
    ref = _torch_apply(modeling.Xcodec2DownSample1d(2, 12), x)
    out = np.asarray(jax.jit(act.downsample1d)(jnp.asarray(x)))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


def test_sin_squared_accuracy():
    y = np.random.default_rng(0).uniform(-1e4, 1e4, 200_000).astype(np.float32)
    y[:1000] = np.linspace(-4, 4, 1000, dtype=np.float32)  # the range activations live in
    exact = np.sin(y.astype(np.float64)) ** 2
    err = np.abs(np.asarray(jax.jit(act.sin_squared)(jnp.asarray(y))) - exact).max()
    assert err < 2.5e-7, err  # the float32 library sine is ~1e-7 from exact


def test_snake_beta_matches_reference():
    ref_mod = _randomize_snakes(modeling.Xcodec2SnakeBeta(6))
    x = _random((2, 50, 6), 1, scale=5.0)
    module = act.SnakeBeta(6)
    params = {
        "alpha": jnp.asarray(ref_mod.alpha.detach().numpy()),
        "beta": jnp.asarray(ref_mod.beta.detach().numpy()),
    }
    out = np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(x)))
    np.testing.assert_allclose(out, _torch_apply(ref_mod, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("length", LENGTHS)
def test_anti_aliased_snake_beta_matches_reference(length):
    channels = 5
    ref_mod = modeling.Xcodec2AntiAliasedActivation1d(_randomize_snakes(modeling.Xcodec2SnakeBeta(channels)))
    x = _random((2, length, channels), length, scale=2.0)
    module = act.AntiAliasedSnakeBeta(channels)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.asarray(x))["params"]
    params = convert_state_dict({k: v.numpy() for k, v in ref_mod.state_dict().items()}, shapes)
    out = np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(x)))
    ref = _torch_apply(ref_mod, x)
    assert out.shape == ref.shape == x.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ratio,kernel", [(3, 18), (2, 11)])
def test_other_ratios_and_kernels_match_reference(ratio, kernel):
    # Only (2, 12) occurs in X-Codec2; the polyphase derivation is general and checked as such.
    x = _random((2, 41, 3), ratio)
    snake = _randomize_snakes(modeling.Xcodec2SnakeBeta(3))
    ref_mod = modeling.Xcodec2AntiAliasedActivation1d(snake, ratio, ratio, kernel, kernel)
    alpha, beta = (jnp.asarray(p.detach().numpy()) for p in (snake.alpha, snake.beta))

    @jax.jit
    def run(x):
        aa = act.anti_aliased(x, lambda u: act.snake_beta(u, alpha, beta), ratio, kernel)
        return aa, act.upsample1d(x, ratio, kernel), act.downsample1d(x, ratio, kernel)

    out, up, down = (np.asarray(v) for v in run(jnp.asarray(x)))
    np.testing.assert_allclose(out, _torch_apply(ref_mod, x), rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        up, _torch_apply(modeling.Xcodec2UpSample1d(ratio, kernel), x), rtol=0, atol=1e-5
    )
    ref_down = _torch_apply(modeling.Xcodec2DownSample1d(ratio, kernel), x)
    np.testing.assert_allclose(down, ref_down, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The encoder


def _encoder_pair(config_kwargs, seed=0):
    torch.manual_seed(seed)
    ref = _randomize_snakes(modeling.Xcodec2Encoder(TorchConfig(**config_kwargs)).eval(), seed)
    module = AcousticEncoder(Xcodec2Config(**config_kwargs))
    x = jnp.zeros((1, 1200, 1))
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
    params = convert_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()}, shapes)
    return ref, module, jax.tree_util.tree_map(jnp.asarray, params)


@pytest.fixture(scope="module")
def small_pair():
    ref, module, params = _encoder_pair(SMALL)
    return ref, jax.jit(module.apply), params


@pytest.fixture(scope="module")
def tiny_pair():
    ref, module, params = _encoder_pair(TINY, seed=1)
    return ref, module, jax.jit(module.apply), params


def _check_encoder(ref, run, params, wave, label):
    expected = _torch_apply(ref, wave)
    out = np.asarray(run({"params": params}, jnp.asarray(wave)))
    assert out.shape == expected.shape
    err = np.abs(out - expected).max()
    peak = np.abs(expected).max()
    print(f"{label}: output {out.shape}, max abs err {err:.3g}, peak {peak:.3g}, err/peak {err / peak:.3g}")
    assert err <= 1e-4 * peak
    return out


def test_small_odd_config_matches_reference(small_pair):
    ref, run, params = small_pair
    out = _check_encoder(ref, run, params, _speech_like(2, 2400), "small config (2, 3, 4), 2400 samples")
    assert out.shape == (2, 2400 // 24, 64)


@pytest.mark.slow
def test_batch_equals_single_runs(small_pair):
    _, run, params = small_pair
    wave = jnp.asarray(_speech_like(2, 2400))
    batched = np.asarray(run({"params": params}, wave))
    singles = np.concatenate([np.asarray(run({"params": params}, wave[i : i + 1])) for i in range(2)])
    np.testing.assert_allclose(batched, singles, rtol=0, atol=1e-6 * np.abs(singles).max())


def test_lengths_make_each_item_encode_as_alone(tiny_pair):
    # An extension of the reference: with `lengths`, each item of a padded batch gets the frames
    # it would get alone. 813 and 537 are not multiples of the hop (10), so the strided convs'
    # output-length arithmetic is checked against torch's too.
    ref, _, run, params = tiny_pair
    waves = _speech_like(2, 813, seed=2)
    waves[1, 537:] = 0.7  # padding garbage that must not leak into item 1's frames
    out = np.asarray(run({"params": params}, jnp.asarray(waves), jnp.asarray([813, 537])))
    for i, n in enumerate([813, 537]):
        alone = _torch_apply(ref, waves[i : i + 1, :n])[0]
        err = np.abs(out[i, : len(alone)] - alone).max()
        print(
            f"tiny config (2, 5), item of {n} samples in a batch of 813: {len(alone)} frames, err {err:.3g}"
        )
        assert err <= 1e-4 * np.abs(alone).max()
    assert len(_torch_apply(ref, waves[:1])[0]) == 81


# The full config (strides 2, 2, 4, 4, 5) is compared in parity/test_full_size.py
# (test_submodules_match_reference: the acoustic encoder at the released sizes, on real speech).


def test_bfloat16_compute_stays_close(tiny_pair):
    ref, module, _, params = tiny_pair
    wave = _speech_like(1, 800)
    expected = _torch_apply(ref, wave)
    out = jax.jit(AcousticEncoder(module.config, dtype=jnp.bfloat16).apply)(
        {"params": params}, jnp.asarray(wave)
    )
    assert out.dtype == jnp.bfloat16 and out.shape == expected.shape
    err = np.abs(np.asarray(out, np.float32) - expected).max()
    print(f"tiny config in bfloat16: max abs err {err:.3g}, peak {np.abs(expected).max():.3g}")
    assert err < 0.05 * np.abs(expected).max()


def test_rejects_channels_first_input(small_pair):
    _, run, params = small_pair
    with pytest.raises(ValueError, match="batch, time, 1"):
        run({"params": params}, jnp.zeros((1, 1, 2400)))


@pytest.mark.slow
@pytest.mark.parametrize("width", [7, 40, 200])
def test_anti_aliased_lengths_equal_items_alone(width):
    # Signals shorter and longer than the filters' reach, and items of every length from 1 frame to
    # the whole signal (200: the first and last 12 and some between, each compiled alone): past each
    # item's end, where its padding differs from the batch's, the item's own replicate padding is applied.
    rng = np.random.default_rng(width)
    lengths = [n for n in range(1, width + 1) if width <= 40 or n <= 12 or n > width - 12 or n % 17 == 0]
    x = rng.standard_normal((len(lengths), width, 5)).astype(np.float32)
    freq, inv_mag = act.snake_scales(rng.uniform(-0.5, 0.5, 5), rng.uniform(-0.5, 0.5, 5))

    def snake(u):
        return act.snake_beta_scaled(u, freq, inv_mag)

    out = np.asarray(act.anti_aliased(jnp.asarray(x), snake, lengths=jnp.asarray(lengths)))
    # A batch of one (the item padded to the width) has its own lowering of the end's padding.
    one = jax.jit(lambda xi, n: act.anti_aliased(xi, snake, lengths=n))
    # Each item alone, compiled whole (one program per length instead of every op dispatched apart).
    by_itself = jax.jit(lambda xi: act.anti_aliased(xi, snake))
    for i, n in enumerate(lengths):
        alone = np.asarray(by_itself(jnp.asarray(x[i : i + 1, :n])))[0]
        np.testing.assert_allclose(out[i, :n], alone, rtol=0, atol=2e-6)
        single = np.asarray(one(jnp.asarray(x[i : i + 1]), jnp.asarray([n])))[0]
        np.testing.assert_allclose(single[:n], alone, rtol=0, atol=2e-6)
