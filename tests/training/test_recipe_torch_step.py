"""One step of X-Codec2's GAN recipe (``RecipeTrainer``) against the same step in PyTorch.

The torch step (``benchmarks/torch_recipe.py``, which ``bench_train`` times) is X-Codec-2.0's
``lightning_module.py`` ``training_step`` on transformers' ``Xcodec2Model`` sub-modules: the generator
runs once; the discriminators (kan-bayashi's ``HiFiGANMultiPeriodDiscriminator`` and X-Codec-2.0's
``SpecDiscriminator``) take an LSGAN step on the detached output; then the generator takes a step on 15
· mel + adversarial + feature matching, through the updated discriminators, + 5 · semantic MSE of
``SemanticDecoder(fc_post_s(latents))`` on the frozen w2v-BERT output. Both optimisers are torch's AdamW
(betas (0.8, 0.9)) after ``clip_grad_norm_(1.0)``. The torch modules stay in eval mode (transformers'
decoder has no dropout) and ours run without dropout (``QUICK_RECIPE``'s ``dropout=0``).

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

from benchmarks.torch_recipe import ADAM_EPS, WEIGHT_DECAY, RecipeStep, heads_params, training_modules
from xcodec2_jax import load_params
from xcodec2_jax.inference.compilation_cache import enable_compilation_cache
from xcodec2_jax.modeling.features import fbank_features_jax
from xcodec2_jax.training.discriminators import (
    params_from_torch,
)
from xcodec2_jax.training.recipe import Recipe
from xcodec2_jax.training.run import trainer_for
from xcodec2_jax.utils.tree import flatten

MPD_CHANNELS, SPEC_CHANNELS = QUICK_RECIPE["mpd_channels"], QUICK_RECIPE["spec_channels"]
# Step 0 runs at the initial learning rate; 1e-3 (not the recipe's 1e-5) makes its steps large against the
# float32 spacing of the parameters.
RECIPE = Recipe(**QUICK_RECIPE)  # the training tests' recipe: test_train's run reuses this traced step
KEEP_TRACED = True  # conftest keeps the tiny step's trace and compilation for test_train (30 s less)
SAMPLES = 8000  # 0.5 s, 25 codes
CROPS = (16000, 12000)  # where the two crops start in the first two test clips (see the module doc)
LOSS_TOL, UPDATE_TOL, GRADIENT_TOL = 1e-5, 1e-4, 1e-4


def _torch_training_modules(config):
    """The training-only heads and the discriminators in torch, random (narrow discriminators)."""
    from parallel_wavegan_release import hifigan_module

    mpd_class = hifigan_module().HiFiGANMultiPeriodDiscriminator
    return training_modules(config, mpd_class, MPD_CHANNELS, SPEC_CHANNELS)


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
    tree = {**load_params(str(folder)), **heads_params(*heads, grads=grads)}
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
    enable_compilation_cache()  # as train() does, so the step compiles with the same options
    speech = load_speech()
    audio = np.stack([speech[0][CROPS[0] : CROPS[0] + SAMPLES], speech[1][CROPS[1] : CROPS[1] + SAMPLES]])
    features = np.array(fbank_features_jax(audio, np.full((2,), SAMPLES, np.int32))[0])

    model = tiny_ref.model
    heads, mpd, spec = _torch_training_modules(model.config)

    # Ours, from the same weights.
    generator = {**tiny_ref.params, **heads_params(*heads)}
    discriminators = {
        "mpd": params_from_torch(mpd.state_dict())["params"],
        "spec": params_from_torch(spec.state_dict())["params"],
    }
    trainer = trainer_for(tiny_ref.config, RECIPE)  # the one test_train's runs use: traced once
    state, frozen = trainer.init_state(generator, discriminators)
    old = jax.device_get({"generator": state.generator, "discriminators": state.discriminator})
    state, metrics = trainer.step(state, frozen, audio)
    ours = jax.device_get({"generator": state.generator, "discriminators": state.discriminator})
    metrics = jax.device_get(metrics)
    jax_seconds = time.perf_counter() - start

    lr = RECIPE.initial_learning_rate
    assert float(metrics["learning_rate"]) == pytest.approx(lr)
    torch_losses = RecipeStep(model, heads, mpd, spec, lr)(audio, features)

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
