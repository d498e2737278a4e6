"""The discriminators of X-Codec2's GAN training recipe, in Flax: multi-period and multi-resolution
spectrogram.

``MultiPeriodDiscriminator`` is HiFi-GAN's MPD in kan-bayashi's layout (``HiFiGANMultiPeriodDiscriminator``
of ``parallel_wavegan`` and X-Codec-2.0's ``module/mpd.py``): the waveform folded into
(T / period, period) images, five (5, 1) convolutions with strides (3, 3, 3, 3, 1) and channels x4 per
layer from ``channels`` up to ``max_channels``, LeakyReLU 0.1, then a (2, 1) output convolution.
``SpecDiscriminator`` is X-Codec-2.0's ``module/mstft.py``: per resolution, an ``NLayerSpecDiscriminator``
(2-D convolutions, LeakyReLU 0.2) on the clamped magnitude spectrogram of X-Codec-2.0's
``common/audio.py`` ``stft``. The defaults are X-Codec-2.0's published configuration
(``config/model/default.yaml``).

Every convolution carries weight norm as torch's ``weight_norm(dim=0)`` stores it: parameters
``weight_g`` (out,) and ``weight_v`` (kh, kw, in, out) with ``w = g * v / ||v||``, the norm taken over
all axes but the output one, and ``bias`` (out,); :func:`params_from_torch` maps a torch state dict by
a fixed table. Images are NHWC inside: a feature map is (B, H, W, C) where torch's is (B, C, H, W).
Each discriminator returns, per sub-discriminator, the list of its layers' outputs, the last being the
logits, as the references do. Everything runs in float32 at HIGHEST precision: XLA would otherwise
run float32 convolutions in TF32 on GPUs and bfloat16 passes on TPUs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .losses import stft_magnitude

MPD_PERIODS = (2, 3, 5, 7, 11)
# X-Codec-2.0 config/model/default.yaml, ``mstft.stft_params``: windows equal to the FFT sizes, hops half.
SPEC_FFT_SIZES = (78, 126, 206, 334, 542, 876, 1418, 2296)
SPEC_HOP_SIZES = (39, 63, 103, 167, 271, 438, 709, 1148)
SPEC_WIN_LENGTHS = SPEC_FFT_SIZES
# common/audio.py clamps the power spectrum to [1e-7, 1e3] before the square root.
SPEC_POWER_MIN = 1e-7
SPEC_POWER_MAX = 1e3


def _torch_uniform_init(fan_in: int):
    """torch's default Conv2d init of weight and bias (kaiming_uniform, a = sqrt(5)): U(±1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class WeightNormConv2d(nn.Module):
    """2-D convolution with weight norm, on NHWC input.

    Attributes:
        features: output channels.
        kernel_size: (kh, kw).
        strides: (sh, sw).
        padding: zero padding ((top, bottom), (left, right)), as torch's symmetric ``padding=(ph, pw)``.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """(B, H, W, C_in) -> (B, H', W', features), float32."""
        x = jnp.asarray(x, jnp.float32)
        kh, kw = self.kernel_size
        init = _torch_uniform_init(kh * kw * x.shape[-1])
        v = self.param("weight_v", init, (kh, kw, x.shape[-1], self.features))
        # g starts at ||v||, so that the initial weight is v itself (torch's weight_norm does the same).
        g = self.param("weight_g", lambda _: jnp.sqrt(jnp.sum(v * v, axis=(0, 1, 2))))
        bias = self.param("bias", init, (self.features,))
        weight = v * (g / jnp.sqrt(jnp.sum(v * v, axis=(0, 1, 2))))
        y = jax.lax.conv_general_dilated(
            x,
            weight,
            window_strides=self.strides,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )
        return y + bias


def _as_waveform(x) -> jnp.ndarray:
    """(B, T) or (B, 1, T) audio -> (B, T) float32."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 3 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 2:
        raise ValueError(f"expected audio of shape (B, T) or (B, 1, T), got {x.shape}")
    return x


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN period discriminator (kan-bayashi's ``HiFiGANPeriodDiscriminator``), one input channel.

    Attributes:
        period: the folding period p.
        kernel_sizes: (kernel of the strided layers along time, kernel + 1 of the output layer).
        channels: channels of the first layer.
        downsample_scales: time strides of the layers.
        channel_increasing_factor: channel growth per layer.
        max_channels: channel cap.
        negative_slope: LeakyReLU slope.
    """

    period: int
    kernel_sizes: tuple[int, int] = (5, 3)
    channels: int = 16
    downsample_scales: tuple[int, ...] = (3, 3, 3, 3, 1)
    channel_increasing_factor: int = 4
    max_channels: int = 512
    negative_slope: float = 0.1

    @nn.compact
    def __call__(self, x) -> list[jnp.ndarray]:
        """Audio (B, T) or (B, 1, T) -> each layer's output (B, H, p, C), then the logits (B, H * p).

        T is first reflect-padded at the end to a multiple of p, then folded to (B, T / p, p, 1).
        """
        x = _as_waveform(x)
        b, t = x.shape
        if t % self.period:
            x = jnp.pad(x, ((0, 0), (0, self.period - t % self.period)), mode="reflect")
        x = x.reshape(b, -1, self.period, 1)
        k0, k1 = self.kernel_sizes
        outputs, features = [], self.channels
        for i, scale in enumerate(self.downsample_scales):
            conv = WeightNormConv2d(
                features, (k0, 1), (scale, 1), (((k0 - 1) // 2,) * 2, (0, 0)), name=f"convs_{i}"
            )
            x = nn.leaky_relu(conv(x), self.negative_slope)
            outputs.append(x)
            features = min(features * self.channel_increasing_factor, self.max_channels)
        # As the reference: the output kernel is k1 - 1 tall with (k1 - 1) // 2 padding on both sides.
        x = WeightNormConv2d(1, (k1 - 1, 1), (1, 1), (((k1 - 1) // 2,) * 2, (0, 0)), name="output_conv")(x)
        outputs.append(x.reshape(b, -1))
        return outputs


class MultiPeriodDiscriminator(nn.Module):
    """HiFi-GAN multi-period discriminator: one :class:`PeriodDiscriminator` per period.

    Attributes: ``periods``, and the :class:`PeriodDiscriminator` attributes shared by all of them.
    """

    periods: Sequence[int] = MPD_PERIODS
    kernel_sizes: tuple[int, int] = (5, 3)
    channels: int = 16
    downsample_scales: tuple[int, ...] = (3, 3, 3, 3, 1)
    channel_increasing_factor: int = 4
    max_channels: int = 512
    negative_slope: float = 0.1

    @nn.compact
    def __call__(self, x) -> list[list[jnp.ndarray]]:
        """Audio (B, T) or (B, 1, T) -> per period, the list of :meth:`PeriodDiscriminator.__call__`."""
        return [
            PeriodDiscriminator(
                period,
                self.kernel_sizes,
                self.channels,
                tuple(self.downsample_scales),
                self.channel_increasing_factor,
                self.max_channels,
                self.negative_slope,
                name=f"discriminators_{i}",
            )(x)
            for i, period in enumerate(self.periods)
        ]


def discriminator_spectrogram(x, fft_size: int, hop_size: int, win_length: int) -> jnp.ndarray:
    """X-Codec-2.0's ``common/audio.py`` ``stft``, laid out as its spectrogram discriminator reads it.

    ``torch.stft`` with ``center=True`` (reflect padding of fft_size // 2), a periodic Hann window of
    ``win_length`` centred in the FFT, then sqrt(clamp(|X|², 1e-7, 1e3)).

    Args:
        x: audio (B, T) or (B, 1, T); T must exceed fft_size // 2.
        fft_size, hop_size, win_length: the STFT's.

    Returns:
        (B, fft_size // 2 + 1, frames, 1) float32: NHWC, frequency as height, frames as width.
    """
    magnitude = stft_magnitude(_as_waveform(x), fft_size, hop_size, win_length, eps=SPEC_POWER_MIN)
    # min(sqrt(max(p, lo)), sqrt(hi)) is sqrt(clamp(p, lo, hi)): the clamp's upper half, after the root.
    return jnp.minimum(magnitude, np.float32(math.sqrt(SPEC_POWER_MAX)))[..., None]


class NLayerSpecDiscriminator(nn.Module):
    """X-Codec-2.0's ``NLayerSpecDiscriminator``: 2-D convolutions over a (B, F, frames, 1) spectrogram.

    Layers: ``layer_0`` (kernel k0, stride 2, ``channels``), one ``layer_{i+1}`` per downsample scale s
    (kernel 2s + 1, stride s, channels x s), a kernel-k1 layer doubling the channels, all capped at
    ``max_channels`` and followed by LeakyReLU; then a kernel-k1 layer to one channel (the logits).

    Attributes:
        kernel_sizes: (k0, k1), both odd.
        channels: channels of the first layer.
        max_channels: channel cap.
        downsample_scales: strides of the middle layers.
        negative_slope: LeakyReLU slope.
    """

    kernel_sizes: tuple[int, int] = (5, 3)
    channels: int = 32
    max_channels: int = 512
    downsample_scales: tuple[int, ...] = (2, 2, 2)
    negative_slope: float = 0.2

    @nn.compact
    def __call__(self, spec: jnp.ndarray) -> list[jnp.ndarray]:
        """(B, H, W, 1) -> every layer's output (B, H', W', C), the last (B, H'', W'', 1) the logits."""
        k0, k1 = self.kernel_sizes
        if k0 % 2 == 0 or k1 % 2 == 0:
            raise ValueError(f"kernel_sizes must be odd, got {self.kernel_sizes}")
        # (features, kernel, stride) of each layer but the last.
        layers, features = [(self.channels, k0, 2)], self.channels
        for scale in self.downsample_scales:
            features = min(features * scale, self.max_channels)
            layers.append((features, 2 * scale + 1, scale))
        layers.append((min(features * 2, self.max_channels), k1, 1))
        outputs, x = [], spec
        for i, (out, kernel, stride) in enumerate(layers):
            pad = ((kernel // 2,) * 2,) * 2
            conv = WeightNormConv2d(out, (kernel, kernel), (stride, stride), pad, name=f"layer_{i}")
            x = nn.leaky_relu(conv(x), self.negative_slope)
            outputs.append(x)
        pad = ((k1 // 2,) * 2,) * 2
        outputs.append(WeightNormConv2d(1, (k1, k1), (1, 1), pad, name=f"layer_{len(layers)}")(x))
        return outputs


class SpecDiscriminator(nn.Module):
    """X-Codec-2.0's multi-resolution spectrogram discriminator (``module/mstft.py``'s ``SpecDiscriminator``).

    One :class:`NLayerSpecDiscriminator` (``disc_{i}``) per resolution, each on
    :func:`discriminator_spectrogram` at that resolution.

    Attributes:
        fft_sizes, hop_sizes, win_lengths: the resolutions.
        kernel_sizes, channels, max_channels, downsample_scales, negative_slope: as
            :class:`NLayerSpecDiscriminator`'s.
    """

    fft_sizes: Sequence[int] = SPEC_FFT_SIZES
    hop_sizes: Sequence[int] = SPEC_HOP_SIZES
    win_lengths: Sequence[int] = SPEC_WIN_LENGTHS
    kernel_sizes: tuple[int, int] = (5, 3)
    channels: int = 32
    max_channels: int = 512
    downsample_scales: tuple[int, ...] = (2, 2, 2)
    negative_slope: float = 0.2

    @nn.compact
    def __call__(self, x) -> list[list[jnp.ndarray]]:
        """Audio (B, T) or (B, 1, T) -> per resolution, its :class:`NLayerSpecDiscriminator` outputs."""
        resolutions = list(zip(self.fft_sizes, self.hop_sizes, self.win_lengths, strict=True))
        outputs = []
        for i, (fft_size, hop_size, win_length) in enumerate(resolutions):
            disc = NLayerSpecDiscriminator(
                tuple(self.kernel_sizes),
                self.channels,
                self.max_channels,
                tuple(self.downsample_scales),
                self.negative_slope,
                name=f"disc_{i}",
            )
            outputs.append(disc(discriminator_spectrogram(x, fft_size, hop_size, win_length)))
        return outputs


# torch state-dict key prefix -> our parameter path prefix. The torch ``Sequential``'s conv (index 0)
# and ``ModuleList``/``ModuleDict`` indices become our module names.
TORCH_KEY_TABLE = (
    (r"^discriminators\.(\d+)\.convs\.(\d+)\.0\.", r"discriminators_\1/convs_\2/"),
    (r"^discriminators\.(\d+)\.output_conv\.", r"discriminators_\1/output_conv/"),
    (r"^model\.disc_(\d+)\.model\.layer_(\d+)\.(?:0\.)?", r"disc_\1/layer_\2/"),
)
# Weight norm's two layouts: ``torch.nn.utils.weight_norm`` and ``parametrizations.weight_norm``.
TORCH_LEAF_NAMES = {
    "weight_g": "weight_g",
    "weight_v": "weight_v",
    "parametrizations.weight.original0": "weight_g",
    "parametrizations.weight.original1": "weight_v",
    "bias": "bias",
}


def params_from_torch(state_dict: Mapping[str, object]) -> dict:
    """Our parameter tree from the state dict of a torch ``HiFiGANMultiPeriodDiscriminator`` or
    X-Codec-2.0 ``SpecDiscriminator`` (weight norm kept: g and v, not the folded weight).

    Args:
        state_dict: torch key -> tensor or array; g (out, 1, 1, 1), v (out, in, kh, kw), bias (out,).

    Returns:
        ``{"params": ...}`` for :class:`MultiPeriodDiscriminator` / :class:`SpecDiscriminator`: g
        (out,), v (kh, kw, in, out) float32.

    Raises:
        ValueError: a key the table does not map.
    """
    params: dict = {}
    for key, value in state_dict.items():
        n = 0
        for pattern, replacement in TORCH_KEY_TABLE:
            path, n = re.subn(pattern, replacement, key)
            if n:
                break
        # What follows the module path is the torch leaf name, dotted for the parametrization layout.
        module, _, leaf = path.rpartition("/")
        name = TORCH_LEAF_NAMES.get(leaf) if n else None
        if name is None:
            raise ValueError(f"no parameter maps to the torch key {key!r}")
        array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, np.float32)
        if name == "weight_g":
            array = array.reshape(-1)
        elif name == "weight_v":
            array = array.transpose(2, 3, 1, 0)
        node = params
        for part in module.split("/"):
            node = node.setdefault(part, {})
        node[name] = array
    return {"params": params}
