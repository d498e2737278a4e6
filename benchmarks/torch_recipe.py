"""X-Codec2's GAN training step in PyTorch, the reference that ``bench_train`` times and
``tests/training/test_recipe_torch_step.py`` compares ours with.

Written from X-Codec-2.0's ``lightning_module.py`` ``training_step``, ``vq/module.py``
``SemanticDecoder``, ``module/mstft.py`` (the spectrogram discriminator at the published
configuration) and ``criterions/mel_loss.py``, on transformers' ``Xcodec2Model`` sub-modules. The
multi-period discriminator is kan-bayashi's ``HiFiGANMultiPeriodDiscriminator`` (the caller passes
the class: the tests fetch the pinned ``parallel-wavegan`` release). torchaudio does not load here, so
the mel loss is ``torch.stft`` with the Slaney filters of transformers' ``mel_filter_bank``.
"""

from __future__ import annotations

import contextlib

import numpy as np

from xcodec2_jax.training.discriminators import (
    MPD_PERIODS,
    SPEC_FFT_SIZES,
    SPEC_HOP_SIZES,
    SPEC_WIN_LENGTHS,
)
from xcodec2_jax.training.losses import MEL_LOSS_N_MELS, MEL_LOSS_WINDOW_LENGTHS

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
ADAM_EPS, WEIGHT_DECAY, BETAS = 1e-8, 0.01, (0.8, 0.9)  # the reference's AdamW (torch's eps and decay)


def slaney_filters(window: int, n_mels: int) -> np.ndarray:
    """transformers' Slaney mel filters of a ``window``-sample FFT at 16 kHz, (window // 2 + 1, n_mels)."""
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(window // 2 + 1, n_mels, 0.0, 8000.0, 16000, norm="slaney", mel_scale="slaney")


def mel_loss(x, y):
    """criterions/mel_loss.py's ``MultiResolutionMelSpectrogramLoss(sample_rate=16000)`` of (B, T) audio."""
    import torch

    loss = 0.0
    for n_mels, window in zip(MEL_LOSS_N_MELS, MEL_LOSS_WINDOW_LENGTHS, strict=True):
        fb = torch.from_numpy(slaney_filters(window, n_mels)).to(x.dtype)
        hann = torch.hann_window(window, dtype=x.dtype)

        def log_mel(a, window=window, fb=fb, hann=hann):
            spec = torch.stft(
                a, window, window // 4, window=hann, center=True, pad_mode="reflect", return_complex=True
            ).abs()
            mel = torch.matmul(spec.transpose(-1, -2), fb).transpose(-1, -2)
            return mel.clamp(1e-5).pow(1.0).log10()

        loss = loss + torch.nn.functional.l1_loss(log_mel(x), log_mel(y))
    return loss


def stft_magnitude(x, fft_size, hop_size, win_length):
    """common/audio.py's ``stft``: (B, frames, F) magnitudes, power clamped to [1e-7, 1e3]."""
    import torch

    window = torch.hann_window(win_length, dtype=x.dtype)
    spec = torch.stft(x, fft_size, hop_size, win_length, window, return_complex=True)
    return torch.sqrt(torch.clamp(spec.real**2 + spec.imag**2, min=1e-7, max=1e3)).transpose(2, 1)


def spec_discriminator(channels: int = 32):
    """X-Codec-2.0's ``SpecDiscriminator`` at its published ``mstft`` configuration (the first layer
    ``channels`` wide); weights from torch's default initialisation, seed 0."""
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
                spec = stft_magnitude(x, SPEC_FFT_SIZES[i], SPEC_HOP_SIZES[i], SPEC_WIN_LENGTHS[i])
                outs.append(disc(spec.transpose(1, 2).unsqueeze(1)))  # (B, 1, F, frames)
            return outs

    torch.manual_seed(0)
    return Spec().eval()


def semantic_decoder(channels: int):
    """X-Codec-2.0's ``vq/module.py`` ``SemanticDecoder(channels, channels, channels)``, as written there:
    the first ReLU is in place, so the residual is ReLU(initial_conv(z))."""
    from torch import nn

    class SemanticDecoder(nn.Module):
        def __init__(self, code_dim, output_channels, decode_channels, kernel_size=3, bias=True):
            super().__init__()
            pad = (kernel_size - 1) // 2
            self.initial_conv = nn.Conv1d(code_dim, decode_channels, kernel_size, 1, pad, bias=False)
            self.residual_blocks = nn.Sequential(
                nn.ReLU(inplace=True),
                nn.Conv1d(decode_channels, decode_channels, kernel_size, 1, pad, bias=bias),
                nn.ReLU(inplace=True),
                nn.Conv1d(decode_channels, decode_channels, kernel_size, 1, pad, bias=bias),
            )
            self.final_conv = nn.Conv1d(decode_channels, output_channels, kernel_size, 1, pad, bias=False)

        def forward(self, z):
            x = self.initial_conv(z)
            x = self.residual_blocks(x) + x
            return self.final_conv(x)

    return SemanticDecoder(channels, channels, channels)


def randomise_(module, seed: int) -> None:
    """Every bias N(0, 0.05²) and every weight-norm g = ||v|| * U(0.5, 1.5), in place: discriminator
    weights away from their initialisation, so a comparison sees every term."""
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


def training_modules(config, mpd_class, mpd_channels: int = 16, spec_channels: int = 32):
    """(heads, mpd, spec): the training-only ``fc_post_s`` and ``SemanticDecoder`` of ``config`` (our
    :class:`~xcodec2_jax.Xcodec2Config`) and the two discriminators, random (seeded)."""
    import torch

    semantic_width = config.semantic_model_config.hidden_size
    torch.manual_seed(0)
    heads = (torch.nn.Linear(config.quantization_dim, semantic_width), semantic_decoder(semantic_width))
    mpd = mpd_class(list(MPD_PERIODS), dict(MPD_TORCH_PARAMS, channels=mpd_channels))
    spec = spec_discriminator(spec_channels)
    randomise_(mpd, seed=1)
    randomise_(spec, seed=2)
    return heads, mpd, spec


def heads_params(fc_post_s, semantic_decoder_, grads: bool = False) -> dict:
    """Our ``fc_post_s`` and ``semantic_decoder`` parameters from the torch modules (their gradients with
    ``grads``): Dense kernels (in, out), conv kernels (k, in, out)."""

    def value(p):
        return (p.grad if grads else p).detach().float().numpy().copy()

    def conv(module):
        return value(module.weight).transpose(2, 1, 0)

    residual = semantic_decoder_.residual_blocks
    return {
        "fc_post_s": {"kernel": value(fc_post_s.weight).T, "bias": value(fc_post_s.bias)},
        "semantic_decoder": {
            "conv1": {"kernel": conv(semantic_decoder_.initial_conv)},
            "conv2": {"kernel": conv(residual[1]), "bias": value(residual[1].bias)},
            "conv3": {"kernel": conv(residual[3]), "bias": value(residual[3].bias)},
            "conv4": {"kernel": conv(semantic_decoder_.final_conv)},
        },
    }


class RecipeStep:
    """X-Codec-2.0's ``training_step`` (discriminators, then generator, through the updated
    discriminators) on torch modules, updating them in place; each call returns its losses.

    ``autocast`` (e.g. ``torch.bfloat16``) runs the forward passes under CPU autocast, as Lightning's
    ``bf16-mixed`` precision does; the optimisers keep float32 weights.
    """

    def __init__(self, model, heads, mpd, spec, lr: float, autocast=None):
        import torch

        self.model, self.heads, self.mpd, self.spec = model, heads, mpd, spec
        self.generator_params = [
            p for name, p in model.named_parameters() if not name.startswith("semantic_encoder.")
        ] + [p for m in heads for p in m.parameters()]
        self.discriminator_params = [*mpd.parameters(), *spec.parameters()]
        for p in model.semantic_encoder.parameters():
            p.requires_grad_(False)

        def adamw(params):
            return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)

        self.generator_opt, self.discriminator_opt = (
            adamw(self.generator_params),
            adamw(self.discriminator_params),
        )
        self.autocast = autocast

    def _precision(self):
        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.autocast)

    def _discriminate(self, x):
        return self.mpd(x) + self.spec(x)

    def __call__(self, audio: np.ndarray, features: np.ndarray) -> dict:
        """One step on (B, T) float32 ``audio`` and its (B, frames, 160) semantic ``features``."""
        import torch
        import torch.nn.functional as F

        model, (fc_post_s, semantic_decoder_) = self.model, self.heads
        wav = torch.from_numpy(audio)
        with self._precision():
            with torch.no_grad():
                target = model.semantic_encoder(torch.from_numpy(features)).last_hidden_state.transpose(1, 2)
            hidden = torch.cat(
                [model.semantic_adapter(target), model.acoustic_encoder(wav.unsqueeze(1))], dim=1
            )
            hidden = model.fc_encoder(hidden.transpose(1, 2))
            latents, _ = model.quantizer(hidden)  # (B, N, quantization_dim), straight-through rounding
            y_ = model.acoustic_decoder(latents)[..., : wav.shape[-1]].float()  # (B, 1, T)
            semantic = semantic_decoder_(fc_post_s(latents).transpose(1, 2))
            semantic_loss = F.mse_loss(semantic.float(), target.float())
        y = wav.unsqueeze(1)

        with self._precision():
            real, fake = self._discriminate(y), self._discriminate(y_.detach())
            disc_loss = sum(
                F.mse_loss(r[-1].float(), torch.ones_like(r[-1].float()))
                + F.mse_loss(f[-1].float(), torch.zeros_like(f[-1].float()))
                for r, f in zip(real, fake, strict=True)
            )
        self.discriminator_opt.zero_grad()
        disc_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.discriminator_params, 1.0)
        self.discriminator_opt.step()

        for p in self.discriminator_params:
            p.requires_grad_(False)
        mel = mel_loss(y_.squeeze(1), y.squeeze(1))
        with self._precision():
            fake = self._discriminate(y_)
            adv_loss = sum(F.mse_loss(f[-1].float(), torch.ones_like(f[-1].float())) for f in fake)
            with torch.no_grad():
                real = self._discriminate(y)
            fm_loss = sum(
                F.l1_loss(f[j].float(), r[j].float())
                for r, f in zip(real, fake, strict=True)
                for j in range(len(f) - 1)
            )
        gen_loss = 15.0 * mel + adv_loss + fm_loss + 5.0 * semantic_loss
        for p in self.discriminator_params:
            p.requires_grad_(True)
        self.generator_opt.zero_grad()
        gen_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.generator_params, 1.0)
        self.generator_opt.step()
        losses = {
            "loss/generator": gen_loss,
            "loss/discriminator": disc_loss,
            "loss/mel": mel,
            "loss/adversarial": adv_loss,
            "loss/feature_matching": fm_loss,
            "loss/semantic": semantic_loss,
        }
        return {k: float(v.item()) for k, v in losses.items()}
