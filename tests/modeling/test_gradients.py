"""Gradients against torch autograd on the same weights, and the straight-through FSQ.

Each loss is a fixed random weighting of an output (``sum(w * y)``), so its gradient is the
vector-Jacobian product of that output with ``w``. Torch's gradients are converted to the Flax
layout with the checkpoint loader's own key mapping and compared module by module: the error of
every top-level module's gradients is bounded by 1e-4 of that module's largest gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import load_speech, rel_err

from xcodec2_jax import Xcodec2FeatureExtractor, Xcodec2Model
from xcodec2_jax.checkpoint import convert_state_dict
from xcodec2_jax.modeling.fsq import fsq_quantize, round_straight_through
from xcodec2_jax.modeling.layout import checkpoint_shapes, stack_layers
from xcodec2_jax.utils.tree import flatten

TOLERANCE = 1e-4


def _inputs():
    audio = [a[:16000] for a in load_speech()[:2]]
    return {k: np.asarray(v) for k, v in Xcodec2FeatureExtractor()(audio, sampling_rate=16000).items()}


def _weights(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _torch_param_grads(model, loss, extra=(), retain_graph=False):
    """d loss / d (every parameter, every tensor of ``extra``); unreached parameters get zeros."""
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, [*params, *extra], allow_unused=True, retain_graph=retain_graph)
    as_np = [
        np.zeros(tuple(p.shape), np.float32) if g is None else g.numpy()
        for p, g in zip(params, grads[: len(params)], strict=True)
    ]
    return dict(zip(names, as_np, strict=True)), [g.numpy() for g in grads[len(params) :]]


def _to_flax(torch_grads, config) -> dict:
    return flatten(stack_layers(convert_state_dict(torch_grads, checkpoint_shapes(config)), config))


def _compare(name, ours, ref_flat, modules):
    """Per top-level module: max abs error over its gradients relative to its largest gradient."""
    ours = flatten(ours)
    assert set(ours) == set(ref_flat)
    worst = 0.0
    for module in modules:
        paths = [p for p in ref_flat if p[0] == module]
        peak = max(float(np.abs(ref_flat[p]).max()) for p in paths)
        err = max(float(np.abs(np.asarray(ours[p], np.float64) - ref_flat[p]).max()) for p in paths)
        print(
            f"{name}: {module}: {len(paths)} tensors, peak |grad| {peak:.3e}, "
            f"max err {err:.3e} ({err / peak:.2e})"
        )
        assert peak > 0, f"{module} gets no gradient: the comparison would mean nothing"
        assert err <= TOLERANCE * peak, (module, err, peak)
        worst = max(worst, err / peak)
    return worst


def _frozen_zero(ours, ref_flat, module="semantic_encoder"):
    """The semantic encoder is frozen in both (the reference runs it under torch.no_grad())."""
    for path, value in flatten(ours).items():
        if path[0] == module:
            assert not np.any(np.asarray(value)) and not np.any(ref_flat[path]), path


@pytest.mark.slow
def test_decoder_gradients_match_torch(small_ref):
    """d(sum(w * audio)) / d(decoder params, latents), audio decoded from latents."""
    config, tmodel = small_ref.config, small_ref.model
    latents = _weights((2, config.quantization_dim, 25), 1) * 0.5
    w = _weights((2, 1, 25 * config.hop_length), 2)

    t_latents = torch.from_numpy(latents).requires_grad_()
    audio = tmodel.decode(latents=t_latents).audio_values
    ref_params, (ref_latents,) = _torch_param_grads(tmodel, (audio * torch.from_numpy(w)).sum(), [t_latents])

    model = Xcodec2Model(config)

    def loss(params, latents):
        out = model.apply({"params": params}, latents=latents, method=Xcodec2Model.decode)
        return jnp.sum(out.audio_values * w)

    g_params, g_latents = jax.jit(jax.grad(loss, argnums=(0, 1)))(small_ref.params, jnp.asarray(latents))
    decoder = {"acoustic_decoder": g_params["acoustic_decoder"]}
    ref_flat = {p: v for p, v in _to_flax(ref_params, config).items() if p[0] == "acoustic_decoder"}
    _compare("decoder", decoder, ref_flat, ["acoustic_decoder"])
    err, rel = rel_err(g_latents, ref_latents)
    print(f"decoder: d/d latents max err {err:.3e} ({rel:.2e} of peak)")
    assert rel <= TOLERANCE


@pytest.mark.slow
def test_encoder_gradients_match_torch(small_ref):
    """Two losses, each against torch: ``sum(w_h * hidden)`` of the pre-quantization hidden states
    and ``sum(w_l * latents)`` of the straight-through latents, differentiated w.r.t. every
    parameter and input_values. The second reaches ``quantizer.project_in`` (and, through it, the
    encoder and the audio) only through the straight-through rounding."""
    config, tmodel = small_ref.config, small_ref.model
    feats = _inputs()
    values = torch.from_numpy(feats["input_values"]).requires_grad_()
    # transformers' encode, step by step, to keep its pre-quantization hidden states.
    with torch.no_grad():
        semantic = tmodel.semantic_encoder(torch.from_numpy(feats["input_features"])).last_hidden_state
    semantic = tmodel.semantic_adapter(semantic.transpose(1, 2))
    fused = torch.cat([semantic, tmodel.acoustic_encoder(values)], dim=1)
    hidden = tmodel.fc_encoder(fused.transpose(1, 2))
    latents, ref_codes = tmodel.quantizer(hidden)
    w_h, w_l = _weights(tuple(hidden.shape), 3), _weights(tuple(latents.shape), 4)
    refs = [
        _torch_param_grads(tmodel, (out * torch.from_numpy(w)).sum(), [values], retain_graph=True)
        for out, w in ((hidden, w_h), (latents, w_l))
    ]

    model = Xcodec2Model(config)

    def encode(module, input_values):
        hidden = module.encoder_hidden_states(input_values, feats["input_features"])
        latents, codes = module.quantizer(hidden)
        return hidden, latents, codes

    @jax.jit
    def grads(params, input_values):
        (h, lat, codes), vjp = jax.vjp(
            lambda p, v: model.apply({"params": p}, v, method=encode), params, input_values
        )
        # Both cotangents through one batched backward pass: one compilation instead of two.
        no_codes = np.zeros((2, *codes.shape), jax.dtypes.float0)
        cotangents = (jnp.stack([w_h, jnp.zeros_like(h)]), jnp.stack([jnp.zeros_like(lat), w_l]), no_codes)
        return jax.vmap(vjp)(cotangents), codes

    (g_params, g_values), codes = grads(small_ref.params, feats["input_values"])
    np.testing.assert_array_equal(np.asarray(codes), ref_codes[..., 0].numpy())
    assert len(np.unique(np.asarray(codes))) >= 20, "codes are not spread: the comparison would mean little"
    cases = (
        ("hidden states", ["acoustic_encoder", "semantic_adapter", "fc_encoder"]),
        ("straight-through latents", ["acoustic_encoder", "semantic_adapter", "fc_encoder", "quantizer"]),
    )
    for i, (name, modules) in enumerate(cases):
        ours = jax.tree.map(lambda g, i=i: g[i], g_params)
        ref_flat = _to_flax(refs[i][0], config)
        in_modules = {p: v for p, v in ref_flat.items() if p[0] in modules}
        _compare(name, {m: ours[m] for m in modules}, in_modules, modules)
        _frozen_zero(ours, ref_flat)
        err, rel = rel_err(g_values[i], refs[i][1][0])
        print(f"{name}: d/d input_values max err {err:.3e} ({rel:.2e} of peak)")
        assert rel <= TOLERANCE
        assert np.isfinite(np.asarray(g_values[i])).all() and np.abs(np.asarray(g_values[i])).max() > 0
    # The latents loss reaches project_in only through the straight-through rounding.
    assert np.abs(np.asarray(g_params["quantizer"]["project_in"]["kernel"][1])).max() > 0


def test_straight_through_forward_is_plain_rounding(small_ref):
    """Codes and latents bit for bit those of plain rounding (whose gradient is zero), on the
    reference's pre-quantization hidden states and on values around every rounding boundary,
    signed zeros included; the straight-through derivative is exactly 1 / half width."""
    tmodel = small_ref.model
    feats = {k: torch.from_numpy(v) for k, v in _inputs().items()}
    with torch.no_grad():
        semantic = tmodel.semantic_encoder(feats["input_features"]).last_hidden_state.transpose(1, 2)
        acoustic = tmodel.acoustic_encoder(feats["input_values"])
        fused = torch.cat([tmodel.semantic_adapter(semantic), acoustic], 1)
        hidden = tmodel.fc_encoder(fused.transpose(1, 2))
        ref_codes = tmodel.quantizer(hidden)[1][..., 0].numpy()
    model = Xcodec2Model(small_ref.config)

    def quantize(module, hidden, straight_through):
        return module.quantizer(hidden, straight_through)

    run = jax.jit(lambda p, h, st: model.apply({"params": p}, h, st, method=quantize), static_argnums=2)
    hidden = hidden.numpy()
    st_latents, st_codes = run(small_ref.params, hidden, True)
    latents, codes = run(small_ref.params, hidden, False)
    np.testing.assert_array_equal(np.asarray(st_codes), ref_codes)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    assert np.asarray(st_latents).tobytes() == np.asarray(latents).tobytes()

    z = jnp.concatenate([jnp.linspace(-3.0, 3.0, 60001), jnp.asarray([-0.0, -0.3, -0.5, 0.5, 1.5, 2.5])])
    st = jax.jit(round_straight_through)(z)
    assert np.asarray(st).tobytes() == np.asarray(jnp.round(z)).tobytes()
    assert np.signbit(np.asarray(st)).sum() > np.asarray(st < 0).sum()  # -0.0 kept where round gives it
    np.testing.assert_array_equal(jax.grad(lambda z: jnp.sum(round_straight_through(z) * 3.0))(z), 3.0)
    assert not np.any(jax.grad(lambda z: jnp.sum(jnp.round(z)))(z))
    levels = small_ref.config.quantization_levels
    zq = jnp.tile(z[:, None], (1, len(levels)))
    half_width = np.asarray([lv // 2 for lv in levels], np.float32)
    g = jax.grad(lambda z: jnp.sum(fsq_quantize(z, levels)[0]))(zq)
    np.testing.assert_array_equal(g, np.broadcast_to(1.0 / half_width, g.shape))
