"""The GAN discriminators against PyTorch, at X-Codec-2.0's published configuration.

The multi-period discriminator is compared with kan-bayashi's ``HiFiGANMultiPeriodDiscriminator`` from
the PyPI release ``parallel-wavegan==0.6.1`` (see ``tests/parallel_wavegan_release.py``), which
X-Codec-2.0's ``module/mpd.py`` reproduces. The spectrogram discriminator has no installable
release, so the torch reference below is written from X-Codec-2.0's ``module/mstft.py`` and
``common/audio.py`` layout. Weights are random with weight-norm magnitudes g set away from ||v|| (so
that a wrong norm cannot hide) and copied through ``params_from_torch``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xcodec2_jax.training.discriminators import (
    MPD_PERIODS,
    SPEC_FFT_SIZES,
    SPEC_HOP_SIZES,
    SPEC_POWER_MAX,
    SPEC_WIN_LENGTHS,
    MultiPeriodDiscriminator,
    SpecDiscriminator,
    discriminator_spectrogram,
    params_from_torch,
)

# X-Codec-2.0 config/model/default.yaml ``mpd`` on kan-bayashi's defaults.
MPD_TORCH_PARAMS = dict(
    in_channels=1,
    out_channels=1,
    kernel_sizes=[5, 3],
    channels=16,
    downsample_scales=[3, 3, 3, 3, 1],
    max_downsample_channels=512,
    bias=True,
    nonlinear_activation="LeakyReLU",
    nonlinear_activation_params={"negative_slope": 0.1},
    use_weight_norm=True,
    use_spectral_norm=False,
)


def _audio(seed=0, shape=(2, 1, 8000)):
    """Noise plus a loud 440 Hz tone, whose peak bins pass the spectrogram's upper clamp (power 1e3)."""
    rng = np.random.default_rng(seed)
    tone = 0.5 * np.sin(2 * np.pi * 440.0 / 16000 * np.arange(shape[-1]))
    return (0.3 * rng.standard_normal(shape) + tone).astype(np.float32)


def _randomise_(module, seed: int) -> None:
    """Every bias N(0, 0.05²) and every weight-norm g = ||v|| * U(0.5, 1.5), in place."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif name.endswith("weight_g"):
                v = module.get_parameter(name[: -len("g")] + "v")
                norm = v.flatten(1).norm(dim=1).view_as(p)
                p.copy_(norm * (0.5 + torch.rand(p.shape, generator=gen)))


def _torch_spec_discriminator(channels: int = 32):
    """X-Codec-2.0's ``SpecDiscriminator`` at its published ``mstft`` configuration (the first layer
    ``channels`` wide), rewritten in torch; weights from torch's default initialisation, seed 0."""
    import torch
    from torch import nn

    def conv(cin, cout, kernel, stride=1):
        return nn.utils.weight_norm(nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2))

    class NLayer(nn.Module):
        def __init__(self, k=(5, 3), ch=32, max_ch=512, scales=(2, 2, 2)):
            super().__init__()
            layers = {"layer_0": nn.Sequential(conv(1, ch, k[0], 2), nn.LeakyReLU(0.2, True))}
            cin = ch
            for i, s in enumerate(scales):
                cout = min(cin * s, max_ch)
                layers[f"layer_{i + 1}"] = nn.Sequential(
                    conv(cin, cout, 2 * s + 1, s), nn.LeakyReLU(0.2, True)
                )
                cin = cout
            cout = min(cin * 2, max_ch)
            layers[f"layer_{len(scales) + 1}"] = nn.Sequential(conv(cin, cout, k[1]), nn.LeakyReLU(0.2, True))
            layers[f"layer_{len(scales) + 2}"] = conv(cout, 1, k[1])
            self.model = nn.ModuleDict(layers)

        def forward(self, x):
            outs = []
            for layer in self.model.values():
                x = layer(x)
                outs.append(x)
            return outs

    class Spec(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.ModuleDict({f"disc_{i}": NLayer(ch=channels) for i in range(len(SPEC_FFT_SIZES))})

        def forward(self, x):
            x = x.squeeze(1)
            outs = []
            for i, disc in enumerate(self.model.values()):
                spec = _torch_stft_magnitude(x, SPEC_FFT_SIZES[i], SPEC_HOP_SIZES[i], SPEC_WIN_LENGTHS[i])
                outs.append(disc(spec.transpose(1, 2).unsqueeze(1)))  # (B, 1, F, frames)
            return outs

    torch.manual_seed(0)
    return Spec().eval()


def _torch_stft_magnitude(x, fft_size, hop_size, win_length):
    """common/audio.py's ``stft``: (B, frames, F) magnitudes, power clamped to [1e-7, 1e3]."""
    import torch

    window = torch.hann_window(win_length, dtype=x.dtype)
    spec = torch.stft(x, fft_size, hop_size, win_length, window, return_complex=True)
    return torch.sqrt(torch.clamp(spec.real**2 + spec.imag**2, min=1e-7, max=1e3)).transpose(2, 1)


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
    _randomise_(reference, seed=1)
    # T = 8000 is a multiple of 2 and 5 but not of 3, 7 or 11: both folding paths (reflect pad or not).
    _check_parity(MultiPeriodDiscriminator(), reference, _audio())


@pytest.mark.torch
def test_discriminator_spectrogram_matches_common_audio_stft():
    import torch

    audio = _audio()
    for fft_size, hop_size, win_length in [(78, 39, 78), (2296, 1148, 2296), (512, 128, 400)]:
        ref = _torch_stft_magnitude(torch.from_numpy(audio[:, 0]).double(), fft_size, hop_size, win_length)
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
    reference = _torch_spec_discriminator()
    _randomise_(reference, seed=2)
    _check_parity(SpecDiscriminator(), reference, _audio(seed=3))


def test_params_from_torch_rejects_unknown_keys():
    with pytest.raises(ValueError, match="discriminators.0.convs.0.0.weight"):
        params_from_torch({"discriminators.0.convs.0.0.weight": np.zeros((16, 1, 5, 1))})
    with pytest.raises(ValueError, match="generator"):
        params_from_torch({"generator.bias": np.zeros(3)})
