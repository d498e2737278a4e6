"""The GAN discriminators against PyTorch, at X-Codec-2.0's published configuration.

The multi-period discriminator is compared with kan-bayashi's ``HiFiGANMultiPeriodDiscriminator`` from
the PyPI release ``parallel-wavegan==0.6.1`` (see ``tests/parallel_wavegan_release.py``), which
X-Codec-2.0's ``module/mpd.py`` reproduces. The spectrogram discriminator has no installable
release, so the torch reference (``benchmarks/torch_recipe.py``) is written from X-Codec-2.0's
``module/mstft.py`` and ``common/audio.py`` layout. Weights are random with weight-norm magnitudes g
set away from ||v|| (so that a wrong norm cannot hide) and copied through ``params_from_torch``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.torch_recipe import MPD_TORCH_PARAMS, randomise_, spec_discriminator, stft_magnitude
from xcodec2_jax.training.discriminators import (
    MPD_PERIODS,
    SPEC_POWER_MAX,
    MultiPeriodDiscriminator,
    SpecDiscriminator,
    discriminator_spectrogram,
    params_from_torch,
)


def _audio(seed=0, shape=(2, 1, 8000)):
    """Noise plus a loud 440 Hz tone, whose peak bins pass the spectrogram's upper clamp (power 1e3)."""
    rng = np.random.default_rng(seed)
    tone = 0.5 * np.sin(2 * np.pi * 440.0 / 16000 * np.arange(shape[-1]))
    return (0.3 * rng.standard_normal(shape) + tone).astype(np.float32)


def _count(tree) -> int:
    return sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(tree))


def _compare(ours, ref) -> float:
    """The largest error of any feature map relative to that map's peak; shapes must agree."""
    worst = 0.0
    assert len(ours) == len(ref)
    for ours_maps, ref_maps in zip(ours, ref, strict=True):
        assert len(ours_maps) == len(ref_maps)
        for a, r in zip(ours_maps, ref_maps, strict=True):
            r = r.detach().numpy()
            r = r.transpose(0, 2, 3, 1) if r.ndim == 4 else r  # NCHW -> NHWC
            a = np.asarray(a)
            assert a.shape == r.shape
            worst = max(worst, float(np.abs(a - r).max() / np.abs(r).max()))
    return worst


def _check_parity(module, torch_module, audio):
    """Weights copied from torch: the same parameter tree as our init, equal counts, equal outputs."""
    import torch

    params = params_from_torch(torch_module.state_dict())
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.asarray(audio))
    assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(np.shape, shapes)
    torch_count = sum(p.numel() for p in torch_module.parameters())
    assert _count(params) == torch_count
    with torch.no_grad():
        ref = torch_module(torch.from_numpy(audio))
    ours = jax.jit(module.apply)(params, audio)
    worst = _compare(ours, ref)
    assert worst <= 1e-5, worst
    return _count(params), torch_count, worst


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # the references' own weight norm
def test_multi_period_discriminator_matches_parallel_wavegan():
    import torch
    from parallel_wavegan_release import hifigan_module

    torch.manual_seed(0)
    reference = hifigan_module().HiFiGANMultiPeriodDiscriminator(list(MPD_PERIODS), MPD_TORCH_PARAMS).eval()
    randomise_(reference, seed=1)
    # T = 8000 is a multiple of 2 and 5 but not of 3, 7 or 11: both folding paths (reflect pad or not).
    _check_parity(MultiPeriodDiscriminator(), reference, _audio())


@pytest.mark.torch
def test_discriminator_spectrogram_matches_common_audio_stft():
    import torch

    audio = _audio()
    for fft_size, hop_size, win_length in [(78, 39, 78), (2296, 1148, 2296), (512, 128, 400)]:
        ref = stft_magnitude(torch.from_numpy(audio[:, 0]).double(), fft_size, hop_size, win_length)
        ref = ref.transpose(1, 2).numpy()[..., None]
        ours = np.asarray(
            jax.jit(discriminator_spectrogram, static_argnums=(1, 2, 3))(
                audio, fft_size, hop_size, win_length
            )
        )
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 1e-5 * ref.max()
    assert (ref >= np.sqrt(SPEC_POWER_MAX) - 1e-6).any()  # the upper clamp was exercised


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # the references' own weight norm
def test_spec_discriminator_matches_torch():
    reference = spec_discriminator()
    randomise_(reference, seed=2)
    _check_parity(SpecDiscriminator(), reference, _audio(seed=3))


def test_params_from_torch_rejects_unknown_keys():
    with pytest.raises(ValueError, match="discriminators.0.convs.0.0.weight"):
        params_from_torch({"discriminators.0.convs.0.0.weight": np.zeros((16, 1, 5, 1))})
    with pytest.raises(ValueError, match="generator"):
        params_from_torch({"generator.bias": np.zeros(3)})
