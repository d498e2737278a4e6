"""One step of X-Codec2's GAN recipe (``RecipeTrainer``) against the same step in PyTorch.

The torch step is X-Codec-2.0's ``lightning_module.py`` ``training_step`` on transformers'
``Xcodec2Model`` sub-modules: the generator runs once; the discriminators (kan-bayashi's
``HiFiGANMultiPeriodDiscriminator`` and X-Codec-2.0's ``SpecDiscriminator``) take an LSGAN step on the
detached output; then the generator takes a step on 15 · mel + adversarial + feature matching, through
the updated discriminators, + 5 · semantic MSE of ``SemanticDecoder(fc_post_s(latents))`` on the frozen
w2v-BERT output. Both optimisers are torch's AdamW (betas (0.8, 0.9)) after ``clip_grad_norm_(1.0)``.
The torch modules stay in eval mode (no dropout), as ours have none.

Both sides start from the same weights (a tiny random checkpoint, small discriminators) and the same
batch and features (the semantic features come from our extractor: torchaudio does not load here).
Every loss must agree to 1e-5.

The updated parameters cannot be held to 1e-4 of each tensor's largest update: AdamW's first step moves
each element by lr · g / (|g| + 1e-8), about ±lr wherever |g| is well above 1e-8, but where |g| is
within a few orders of magnitude of 1e-8 the step is decided by float32 rounding of g (a difference of
1e-9 in g, a 1e-7 part of a tensor's largest gradient, changes the step by a tenth of lr). Every large
tensor has such elements, and the spread test weights make one tensor (the acoustic encoder's conv2,
weights in the hundreds) all of them. So the test takes torch's clipped gradients too, and asks of each
element that our new value be the AdamW step of a gradient within 1e-4 of the tensor's largest gradient
from torch's (the step itself within 1e-4 of the largest update, or two float32 spacings of the value);
torch's own new values must pass the same check with torch's gradients. The plain update error is
printed as well: up to a few 1e-2, from the near-zero gradients.

The comparison needs every element's gradient to be smooth in the rounding: an activation within
rounding of a kink (LeakyReLU's at 0) has a derivative that rounding picks. Crops starting at 4000 and
8000, for one, put a multi-period pre-activation on real speech 5e-10 from 0 (its peak 0.24), and the
period-5 gradients then differ by 1e-2 of their largest; the crops below have none.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest
from conftest import QUICK_RECIPE, TINY_CONFIG, _make_reference, load_speech
from test_discriminators import MPD_TORCH_PARAMS, _randomise_, _torch_spec_discriminator
from test_gan_losses import _torch_mel_loss

from xcodec2_jax import load_params
from xcodec2_jax.inference.compilation_cache import enable_compilation_cache
from xcodec2_jax.modeling.features import fbank_features_jax
from xcodec2_jax.training.discriminators import (
    MPD_PERIODS,
    params_from_torch,
)
from xcodec2_jax.training.recipe import Recipe, RecipeTrainer
from xcodec2_jax.utils.tree import flatten

MPD_CHANNELS, SPEC_CHANNELS = QUICK_RECIPE["mpd_channels"], QUICK_RECIPE["spec_channels"]
# Step 0 runs at the initial learning rate; 1e-3 (not the recipe's 1e-5) makes its steps large against the
# float32 spacing of the parameters.
RECIPE = Recipe(**QUICK_RECIPE)  # the training tests' recipe: test_train's run reuses this compiled step
SAMPLES = 8000  # 0.5 s, 25 codes
CROPS = (16000, 12000)  # where the two crops start in the first two test clips (see the module doc)
ADAM_EPS, WEIGHT_DECAY = 1e-8, 0.01  # the reference's AdamW: torch's eps and weight decay
LOSS_TOL, UPDATE_TOL, GRADIENT_TOL = 1e-5, 1e-4, 1e-4


def _torch_semantic_decoder(channels: int):
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


def _torch_training_modules(config):
    """The training-only heads (``fc_post_s``, ``SemanticDecoder``) and the discriminators (MPD, spec),
    in torch, random: discriminator biases and weight-norm magnitudes away from their init."""
    import torch
    from parallel_wavegan_release import hifigan_module

    semantic_width = config.semantic_model_config.hidden_size
    torch.manual_seed(0)
    heads = (
        torch.nn.Linear(config.quantization_dim, semantic_width),
        _torch_semantic_decoder(semantic_width),
    )
    mpd_kwargs = dict(MPD_TORCH_PARAMS, channels=MPD_CHANNELS)
    mpd = hifigan_module().HiFiGANMultiPeriodDiscriminator(list(MPD_PERIODS), mpd_kwargs)
    spec = _torch_spec_discriminator(SPEC_CHANNELS)
    _randomise_(mpd, seed=1)
    _randomise_(spec, seed=2)
    return heads, mpd, spec


def _torch_step(model, heads, mpd, spec, audio, features, lr):
    """X-Codec-2.0's ``training_step`` (discriminators, then generator) on torch modules, in place;
    returns its losses."""
    import torch
    import torch.nn.functional as F

    fc_post_s, semantic_decoder = heads
    generator_params = [
        p for name, p in model.named_parameters() if not name.startswith("semantic_encoder.")
    ] + [p for m in heads for p in m.parameters()]
    discriminator_params = [*mpd.parameters(), *spec.parameters()]

    def adamw(params):
        return torch.optim.AdamW(params, lr=lr, betas=(0.8, 0.9), eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)

    gen_opt, disc_opt = adamw(generator_params), adamw(discriminator_params)

    def discriminate(x):
        return mpd(x) + spec(x)

    # forward
    wav = torch.from_numpy(audio)
    with torch.no_grad():
        target = model.semantic_encoder(torch.from_numpy(features)).last_hidden_state.transpose(1, 2)
    hidden = torch.cat([model.semantic_adapter(target), model.acoustic_encoder(wav.unsqueeze(1))], dim=1)
    hidden = model.fc_encoder(hidden.transpose(1, 2))
    latents, _ = model.quantizer(hidden)  # (B, N, quantization_dim), straight-through rounding
    y_ = model.acoustic_decoder(latents)[..., : wav.shape[-1]]  # (B, 1, T)
    semantic = semantic_decoder(fc_post_s(latents).transpose(1, 2))
    semantic_loss = F.mse_loss(semantic, target)
    y = wav.unsqueeze(1)

    # discriminators
    real, fake = discriminate(y), discriminate(y_.detach())
    disc_loss = sum(
        F.mse_loss(r[-1], torch.ones_like(r[-1])) + F.mse_loss(f[-1], torch.zeros_like(f[-1]))
        for r, f in zip(real, fake, strict=True)
    )
    disc_opt.zero_grad()
    disc_loss.backward()
    torch.nn.utils.clip_grad_norm_(discriminator_params, 1.0)
    disc_opt.step()

    # generator, through the updated discriminators
    for p in discriminator_params:
        p.requires_grad_(False)
    mel_loss = _torch_mel_loss(y_.squeeze(1), y.squeeze(1))
    fake = discriminate(y_)
    adv_loss = sum(F.mse_loss(f[-1], torch.ones_like(f[-1])) for f in fake)
    with torch.no_grad():
        real = discriminate(y)
    fm_loss = sum(F.l1_loss(f[j], r[j]) for r, f in zip(real, fake, strict=True) for j in range(len(f) - 1))
    gen_loss = 15.0 * mel_loss + adv_loss + fm_loss + 5.0 * semantic_loss
    for p in discriminator_params:
        p.requires_grad_(True)
    gen_opt.zero_grad()
    gen_loss.backward()
    torch.nn.utils.clip_grad_norm_(generator_params, 1.0)
    gen_opt.step()
    losses = {
        "loss/generator": gen_loss,
        "loss/discriminator": disc_loss,
        "loss/mel": mel_loss,
        "loss/adversarial": adv_loss,
        "loss/feature_matching": fm_loss,
        "loss/semantic": semantic_loss,
    }
    return {k: float(v.item()) for k, v in losses.items()}


def _heads_params(fc_post_s, semantic_decoder, grads: bool = False) -> dict:
    """Our ``fc_post_s`` and ``semantic_decoder`` from the torch modules (their gradients with
    ``grads``): Dense kernels (in, out), conv kernels (k, in, out)."""

    def value(p):
        return (p.grad if grads else p).detach().numpy().copy()

    def conv(module):
        return value(module.weight).transpose(2, 1, 0)

    residual = semantic_decoder.residual_blocks
    return {
        "fc_post_s": {"kernel": value(fc_post_s.weight).T, "bias": value(fc_post_s.bias)},
        "semantic_decoder": {
            "conv1": {"kernel": conv(semantic_decoder.initial_conv)},
            "conv2": {"kernel": conv(residual[1]), "bias": value(residual[1].bias)},
            "conv3": {"kernel": conv(residual[3]), "bias": value(residual[3].bias)},
            "conv4": {"kernel": conv(semantic_decoder.final_conv)},
        },
    }


def _torch_generator(model, heads, folder, trainable, grads: bool = False) -> dict:
    """The torch generator's trainable parts in our tree, through the checkpoint loader (``grads``: their
    gradients instead, written over the weights: call it last)."""
    import torch

    if grads:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.startswith("semantic_encoder."):
                    assert p.grad is not None, name
                    p.copy_(p.grad)
    model.save_pretrained(str(folder))
    tree = {**load_params(str(folder)), **_heads_params(*heads, grads=grads)}
    return {k: tree[k] for k in trainable}


def _implied_gradient_error(old, new, grad, lr, tol):
    """Per element, how far ``grad`` lies from the gradients whose first AdamW step (clipped gradient g:
    new = old · (1 - lr · wd) - lr · g / (|g| + eps)) lands within ``tol`` of ``new``."""
    u = (old * (1 - lr * WEIGHT_DECAY) - new) / lr
    with np.errstate(divide="ignore", invalid="ignore"):

        def inverse(v):  # the g with g / (|g| + eps) = v, for v in [-1, 1]
            return np.where(np.abs(v) >= 1, np.sign(v) * np.inf, ADAM_EPS * v / (1 - np.abs(v)))

        low, high = inverse(np.clip(u - tol / lr, -1, 1)), inverse(np.clip(u + tol / lr, -1, 1))
    return np.maximum(low - grad, 0) + np.maximum(grad - high, 0)


def _compare_updates(old: dict, ours: dict, ref: dict, grads: dict, lr: float) -> dict:
    """Worst tensors of our updated parameters against torch's: ``update`` max |ours - torch| / max
    |torch - old|; ``gradient`` the gradient disagreement that our update implies (see the module doc),
    relative to the tensor's largest gradient; ``torch`` the same of torch's own update (~0)."""
    old, ours, ref, grads = (flatten(t) for t in (old, ours, ref, grads))
    assert ours.keys() == ref.keys() == old.keys() == grads.keys()
    worst = {"update": (0.0, None), "gradient": (0.0, None), "torch": (0.0, None)}
    for path, r in ref.items():
        r, a, o, g = (np.asarray(x, np.float64) for x in (r, ours[path], old[path], grads[path]))
        assert a.shape == r.shape == o.shape == g.shape, path
        update = np.abs(r - o).max()
        assert update > 0, path  # every tensor moved
        # A float32 parameter holds its new value to its spacing: torch rounds twice (decay, then step),
        # and the spread test weights reach hundreds, where that spacing is a tenth of the step.
        spacing = np.spacing(np.maximum(np.abs(o), np.abs(r)).astype(np.float32)).astype(np.float64)
        tol = UPDATE_TOL * update + 2 * spacing
        errors = {
            "update": np.abs(a - r).max() / update,
            "gradient": _implied_gradient_error(o, a, g, lr, tol).max() / np.abs(g).max(),
            "torch": _implied_gradient_error(o, r, g, lr, tol).max() / np.abs(g).max(),
        }
        for name, err in errors.items():
            if err >= worst[name][0]:
                worst[name] = (float(err), "/".join(path))
    return worst


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    return _make_reference(tmp_path_factory, "recipe_step", TINY_CONFIG)


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # the references' own weight norm
def test_recipe_step_matches_torch(tiny_ref, tmp_path):
    start = time.perf_counter()
    enable_compilation_cache()  # the compiled step is kept for test_train's runs of the same recipe
    speech = load_speech()
    audio = np.stack([speech[0][CROPS[0] : CROPS[0] + SAMPLES], speech[1][CROPS[1] : CROPS[1] + SAMPLES]])
    features = np.array(fbank_features_jax(audio, np.full((2,), SAMPLES, np.int32))[0])

    model = tiny_ref.model
    heads, mpd, spec = _torch_training_modules(model.config)

    # Ours, from the same weights.
    generator = {**tiny_ref.params, **_heads_params(*heads)}
    discriminators = {
        "mpd": params_from_torch(mpd.state_dict())["params"],
        "spec": params_from_torch(spec.state_dict())["params"],
    }
    trainer = RecipeTrainer(tiny_ref.config, RECIPE, devices=jax.devices()[:1])
    state, frozen = trainer.init_state(generator, discriminators)
    old = jax.device_get({"generator": state.generator, "discriminators": state.discriminator})
    state, metrics = trainer.step(state, frozen, audio)
    ours = jax.device_get({"generator": state.generator, "discriminators": state.discriminator})
    metrics = jax.device_get(metrics)
    jax_seconds = time.perf_counter() - start

    lr = RECIPE.initial_learning_rate
    assert float(metrics["learning_rate"]) == pytest.approx(lr)
    torch_losses = _torch_step(model, heads, mpd, spec, audio, features, lr)

    def discriminator_tree(grads=False):
        def state(module):
            return {n: p.grad if grads else p for n, p in module.named_parameters()}

        return {
            "mpd": params_from_torch(state(mpd))["params"],
            "spec": params_from_torch(state(spec))["params"],
        }

    trainable = list(ours["generator"])
    ref = {
        "generator": _torch_generator(model, heads, tmp_path / "updated", trainable),
        "discriminators": discriminator_tree(),
    }
    grads = {
        "generator": _torch_generator(model, heads, tmp_path / "grads", trainable, grads=True),
        "discriminators": discriminator_tree(grads=True),
    }

    loss_errors = {
        name: abs(float(metrics[name]) - value) / abs(value) for name, value in torch_losses.items()
    }
    updates = {k: _compare_updates(old[k], ours[k], ref[k], grads[k], lr) for k in ref}
    print(f"\nrecipe step vs torch ({jax_seconds:.1f} s ours, {time.perf_counter() - start:.1f} s in all)")
    for name, err in loss_errors.items():
        print(
            f"  {name:22s} ours {float(metrics[name]):.7g} torch {torch_losses[name]:.7g} rel err {err:.1e}"
        )
    for part, worst in updates.items():
        for name, (err, where) in worst.items():
            print(f"  {part:14s} {name:8s} worst {err:.1e} at {where}")
    for name, err in loss_errors.items():
        assert err <= LOSS_TOL, (name, float(metrics[name]), torch_losses[name])
    for part, worst in updates.items():
        assert worst["torch"][0] <= 1e-6, (part, worst["torch"])  # torch took the AdamW step assumed
        assert worst["gradient"][0] <= GRADIENT_TOL, (part, worst["gradient"])
