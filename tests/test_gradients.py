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
import torch
from conftest import load_speech, rel_err

from xcodec2_jax import Xcodec2FeatureExtractor, Xcodec2Model
from xcodec2_jax.checkpoint import convert_state_dict
from xcodec2_jax.checkpoint.io import flatten
from xcodec2_jax.fsq import fsq_quantize, round_straight_through
from xcodec2_jax.model import checkpoint_shapes, stack_layers

TOLERANCE = 1e-4


def _inputs():
    audio = [a[:16000] for a in load_speech()[:2]]
    return {k: np.asarray(v) for k, v in Xcodec2FeatureExtractor()(audio, sampling_rate=16000).items()}


def _weights(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _torch_param_grads(model, loss, extra=()):
    """d loss / d (every parameter, every tensor of ``extra``); unreached parameters get zeros."""
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, [*params, *extra], allow_unused=True)
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


def test_encoder_gradients_match_torch(small_ref):
    """d(sum(w * hidden)) / d(encoder params, input_values), hidden: the pre-quantization states."""
    config, tmodel = small_ref.config, small_ref.model
    feats = _inputs()
    values = torch.from_numpy(feats["input_values"]).requires_grad_()
    # transformers' encode up to its quantizer, step by step.
    with torch.no_grad():
        semantic = tmodel.semantic_encoder(torch.from_numpy(feats["input_features"])).last_hidden_state
    semantic = tmodel.semantic_adapter(semantic.transpose(1, 2))
    fused = torch.cat([semantic, tmodel.acoustic_encoder(values)], dim=1)
    hidden = tmodel.fc_encoder(fused.transpose(1, 2))
    w = _weights(tuple(hidden.shape), 3)
    ref_params, (ref_values,) = _torch_param_grads(tmodel, (hidden * torch.from_numpy(w)).sum(), [values])

    model = Xcodec2Model(config)

    def loss(params, input_values):
        h = model.apply(
            {"params": params},
            input_values,
            feats["input_features"],
            method=Xcodec2Model.encoder_hidden_states,
        )
        assert h.shape == w.shape
        return jnp.sum(h * w)

    g_params, g_values = jax.jit(jax.grad(loss, argnums=(0, 1)))(small_ref.params, feats["input_values"])
    ref_flat = _to_flax(ref_params, config)
    modules = ["acoustic_encoder", "semantic_adapter", "fc_encoder"]
    _compare(
        "encoder",
        {m: g_params[m] for m in modules},
        {p: v for p, v in ref_flat.items() if p[0] in modules},
        modules,
    )
    _frozen_zero({"semantic_encoder": g_params["semantic_encoder"]}, ref_flat)
    err, rel = rel_err(g_values, ref_values)
    print(f"encoder: d/d input_values max err {err:.3e} ({rel:.2e} of peak)")
    assert rel <= TOLERANCE


def test_straight_through_encode_decode(small_ref):
    """Audio -> encode (straight-through latents) -> decode -> sum(w * audio): gradients of every
    parameter and of input_values as torch's (which rounds with z + (round(z) - z).detach())."""
    config, tmodel = small_ref.config, small_ref.model
    feats = _inputs()
    values = torch.from_numpy(feats["input_values"]).requires_grad_()
    enc = tmodel.encode(values, torch.from_numpy(feats["input_features"]), output_latents=True)
    audio = tmodel.decode(latents=enc.latents).audio_values
    w = _weights(tuple(audio.shape), 4)
    ref_params, (ref_values,) = _torch_param_grads(tmodel, (audio * torch.from_numpy(w)).sum(), [values])

    model = Xcodec2Model(config)

    def loss(params, input_values):
        out = model.apply(
            {"params": params},
            input_values,
            feats["input_features"],
            output_latents=True,
            method=model.encode,
        )
        audio = model.apply({"params": params}, latents=out.latents, method=Xcodec2Model.decode)
        return jnp.sum(audio.audio_values * w), out.audio_codes

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    (g_params, g_values), codes = grad(small_ref.params, feats["input_values"])
    np.testing.assert_array_equal(np.asarray(codes), enc.audio_codes.numpy())
    assert len(np.unique(np.asarray(codes))) >= 20, "codes are not spread: the comparison would mean little"
    ref_flat = _to_flax(ref_params, config)
    modules = ["acoustic_encoder", "semantic_adapter", "fc_encoder", "quantizer", "acoustic_decoder"]
    worst = _compare("encode-decode", g_params, ref_flat, modules)
    _frozen_zero(g_params, ref_flat)
    err, rel = rel_err(g_values, ref_values)
    print(f"encode-decode: d/d input_values max err {err:.3e} ({rel:.2e} of peak); worst module {worst:.2e}")
    assert rel <= TOLERANCE
    g_values = np.asarray(g_values)
    assert np.isfinite(g_values).all() and np.abs(g_values).max() > 0


def test_straight_through_forward_is_plain_rounding(small_ref):
    """Codes and latents bit for bit those of plain rounding (whose gradient is zero), in the model
    and on values around every rounding boundary, signed zeros included."""
    model, feats = Xcodec2Model(small_ref.config), _inputs()

    def encode(module, straight_through):
        hidden = module.encoder_hidden_states(feats["input_values"], feats["input_features"])
        return module.quantizer(hidden, straight_through=straight_through)

    run = jax.jit(lambda p, st: model.apply({"params": p}, st, method=encode), static_argnums=1)
    (st_latents, st_codes), (latents, codes) = run(small_ref.params, True), run(small_ref.params, False)
    np.testing.assert_array_equal(np.asarray(st_codes), np.asarray(codes))
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
