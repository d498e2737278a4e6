"""Losses against PyTorch references: auraloss's MR-STFT loss; a torch.stft log-mel L1 built on
transformers' ``mel_filter_bank`` (torchaudio's filters; torchaudio itself does not load here)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xcodec2_jax.training.losses import mel_filter_bank, mel_loss, multi_resolution_stft_loss, stft_loss


def _audio(seed, shape):
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal(shape)).astype(np.float32)


def _pair():
    target = _audio(0, (3, 1, 8000))
    # A prediction near the target, as in training, and one far from it.
    return target + 0.1 * _audio(1, target.shape), _audio(2, target.shape), target


@pytest.mark.parametrize("which", ["near", "far"])
def test_mrstft_matches_auraloss(which):
    import torch
    from auraloss.freq import MultiResolutionSTFTLoss

    near, far, target = _pair()
    pred = near if which == "near" else far
    ref = MultiResolutionSTFTLoss()(torch.from_numpy(pred).double(), torch.from_numpy(target).double())
    ours = float(jax.jit(multi_resolution_stft_loss)(pred, target))
    assert abs(ours - ref.item()) <= 1e-5 * abs(ref.item())


def test_single_stft_loss_matches_auraloss_and_gradients_agree():
    import torch
    from auraloss.freq import STFTLoss

    near, _, target = _pair()
    x = torch.from_numpy(near).double().requires_grad_()
    ref = STFTLoss(fft_size=512, hop_size=128, win_length=400)(x, torch.from_numpy(target).double())
    ref.backward()
    loss, grad = jax.jit(jax.value_and_grad(lambda p: stft_loss(p, target, 512, 128, 400)))(jnp.asarray(near))
    assert abs(float(loss) - ref.item()) <= 1e-5 * ref.item()
    ref_grad = x.grad.numpy()
    assert np.isfinite(np.asarray(grad)).all()
    assert np.abs(np.asarray(grad) - ref_grad).max() <= 1e-4 * np.abs(ref_grad).max()


def test_mel_filter_bank_matches_transformers():
    from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank

    ref = hf_mel_filter_bank(513, 100, 0.0, 8000.0, 16000, norm=None, mel_scale="htk")
    np.testing.assert_allclose(mel_filter_bank(16000, 1024, 100), ref, atol=1e-6)


def _torch_mel_loss(pred, target):
    import torch
    from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank

    fb = torch.from_numpy(hf_mel_filter_bank(513, 100, 0.0, 8000.0, 16000, norm=None, mel_scale="htk"))

    def log_mel(a):
        spec = torch.stft(
            a.reshape(-1, a.shape[-1]),
            1024,
            256,
            window=torch.hann_window(1024, dtype=a.dtype),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        ).abs()
        return torch.log(torch.clamp(torch.einsum("bft,fm->bmt", spec, fb), min=1e-7))

    return torch.nn.functional.l1_loss(log_mel(pred), log_mel(target))


def test_mel_loss_matches_torch_and_gradients_agree():
    import torch

    near, far, target = _pair()
    for pred in (near, far):
        x = torch.from_numpy(pred).double().requires_grad_()
        ref = _torch_mel_loss(x, torch.from_numpy(target).double())
        ref.backward()
        loss, grad = jax.jit(jax.value_and_grad(lambda p: mel_loss(p, target)))(jnp.asarray(pred))
        assert abs(float(loss) - ref.item()) <= 1e-5 * ref.item()
        grad, ref_grad = np.asarray(grad), x.grad.numpy()
        assert np.isfinite(grad).all()
        assert np.abs(grad - ref_grad).max() <= 1e-3 * np.abs(ref_grad).max()


def test_gradients_finite_on_silence_and_identical_inputs():
    silence = np.zeros((2, 4000), np.float32)
    for fn in (mel_loss, multi_resolution_stft_loss):
        value, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(silence), silence)
        assert float(value) == 0.0
        assert np.isfinite(np.asarray(grad)).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="too short"):
        multi_resolution_stft_loss(np.zeros(500, np.float32), np.zeros(500, np.float32))
    with pytest.raises(ValueError, match="equal length"):
        multi_resolution_stft_loss(np.zeros(5000), np.zeros(5000), fft_sizes=(512,), hop_sizes=())
    with pytest.raises(ValueError, match="win_length"):
        stft_loss(np.zeros(5000), np.zeros(5000), 256, 64, 512)
