"""X-Codec2's GAN-recipe losses against PyTorch references written from X-Codec-2.0's criterions/ and
lightning_module.py.

The multi-resolution mel loss is torchaudio's ``MelSpectrogram(power=1, center=True, norm="slaney",
mel_scale="slaney")`` per resolution; torchaudio does not load here, so the reference
(``benchmarks/torch_recipe.py``) is ``torch.stft`` (what torchaudio's ``Spectrogram`` calls) with the
Slaney filters of transformers' independent ``mel_filter_bank``, in float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.torch_recipe import mel_loss as torch_mel_loss
from benchmarks.torch_recipe import slaney_filters
from xcodec2_jax.training.losses import (
    MEL_LOSS_N_MELS,
    MEL_LOSS_WINDOW_LENGTHS,
    feature_matching_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    multi_resolution_mel_loss,
    slaney_mel_filter_bank,
)


def _audio(seed, shape=(2, 8000)):
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal(shape)).astype(np.float32)


def test_slaney_filter_bank_matches_transformers():
    for n_mels, window in zip(MEL_LOSS_N_MELS, MEL_LOSS_WINDOW_LENGTHS, strict=True):
        ours, ref = slaney_mel_filter_bank(16000, window, n_mels), slaney_filters(window, n_mels)
        assert ours.shape == ref.shape == (window // 2 + 1, n_mels)
        assert np.abs(ours - ref).max() <= 1e-6 * ref.max()


@pytest.mark.torch
@pytest.mark.slow
def test_multi_resolution_mel_loss_matches_torch_and_gradients_agree():
    import torch

    target = _audio(0)
    # A prediction near the target, as in training, and one far from it.
    for pred in (target + 0.1 * _audio(1), _audio(2)):
        x = torch.from_numpy(pred).double().requires_grad_()
        ref = torch_mel_loss(x, torch.from_numpy(target).double())
        ref.backward()
        loss, grad = jax.jit(jax.value_and_grad(multi_resolution_mel_loss))(jnp.asarray(pred), target)
        assert abs(float(loss) - ref.item()) <= 1e-5 * ref.item(), (float(loss), ref.item())
        grad, ref_grad = np.asarray(grad), x.grad.numpy()
        assert np.isfinite(grad).all()
        assert np.abs(grad - ref_grad).max() <= 1e-4 * np.abs(ref_grad).max()


def test_multi_resolution_mel_loss_on_silence_and_bad_arguments():
    silence = np.zeros((1, 1, 4000), np.float32)
    # Two of the seven resolutions, the smallest and a middle one: the full set compiles for seconds.
    loss = functools.partial(multi_resolution_mel_loss, n_mels=(5, 80), window_lengths=(32, 512))
    value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(silence), silence)
    # Not exactly 0: XLA:CPU may take log10 of the clamped 1e-5 in differently vectorised fusions for
    # the two inputs, an ulp apart.
    assert abs(float(value)) <= 1e-6 and np.isfinite(np.asarray(grad)).all()
    with pytest.raises(ValueError, match="equal length"):
        multi_resolution_mel_loss(silence, silence, n_mels=(5,), window_lengths=())


def _outputs(seed):
    """Discriminator-like outputs: per sub-discriminator, feature maps then logits, of mixed shapes."""
    rng = np.random.default_rng(seed)
    shapes = [[(2, 10, 3, 4), (2, 5, 3, 8), (2, 15)], [(2, 7, 9, 4), (2, 7, 9, 1)], [(2, 3, 2, 5), (2, 4)]]
    return [[rng.standard_normal(s).astype(np.float32) for s in maps] for maps in shapes]


@pytest.mark.torch
def test_lsgan_and_feature_matching_match_torch():
    import torch
    import torch.nn.functional as F

    real, fake = _outputs(0), _outputs(1)
    tr = [[torch.from_numpy(a) for a in maps] for maps in real]
    tf = [[torch.from_numpy(a) for a in maps] for maps in fake]
    # lightning_module.py: per sub-discriminator GANLoss on the last output, summed; fm over the rest.
    ref_disc = sum(
        F.mse_loss(r[-1], torch.ones_like(r[-1])) + F.mse_loss(f[-1], torch.zeros_like(f[-1]))
        for r, f in zip(tr, tf, strict=True)
    )
    ref_gen = sum(F.mse_loss(f[-1], torch.ones_like(f[-1])) for f in tf)
    ref_fm = sum(F.l1_loss(f[j], r[j]) for r, f in zip(tr, tf, strict=True) for j in range(len(f) - 1))
    for ours, ref in [
        (lsgan_discriminator_loss(real, fake), ref_disc),
        (lsgan_discriminator_loss([m[-1] for m in real], [m[-1] for m in fake]), ref_disc),
        (lsgan_generator_loss(fake), ref_gen),
        (feature_matching_loss(real, fake), ref_fm),
    ]:
        assert abs(float(ours) - ref.item()) <= 1e-6 * abs(ref.item()), (float(ours), ref.item())


def test_feature_matching_stops_gradients_into_real_features():
    real, fake = _outputs(0), _outputs(1)
    grad_real, grad_fake = jax.grad(feature_matching_loss, argnums=(0, 1))(real, fake)
    assert all(not np.asarray(g).any() for g in jax.tree_util.tree_leaves(grad_real))
    # The logits take no part in feature matching; every other fake map gets a gradient.
    assert all(not np.asarray(maps[-1]).any() for maps in grad_fake)
    assert all(np.asarray(g).any() for maps in grad_fake for g in maps[:-1])
    with pytest.raises(ValueError, match="real layer outputs"):
        feature_matching_loss([real[0]], [fake[0][:-1]])
