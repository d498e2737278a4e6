"""The NNX face: an NNX module holding the codec encodes, decodes and takes gradients exactly as the
Linen model does on the same parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import load_speech
from flax import nnx

from xcodec2_jax import Xcodec2FeatureExtractor, Xcodec2Model
from xcodec2_jax.modeling.nnx import to_nnx
from xcodec2_jax.utils.tree import flatten


class Probe(nnx.Module):
    """NNX research code: the codec and a head of its own on the decoded audio."""

    def __init__(self, codec, rngs: nnx.Rngs):
        self.codec = codec
        self.head = nnx.Linear(1, 1, rngs=rngs)

    def __call__(self, latents):
        audio = self.codec.decode(latents=latents).audio_values
        return jnp.mean(self.head(audio[..., None]) ** 2)


def test_nnx_module_encodes_decodes_and_differentiates_like_linen(small_ref):
    config, params = small_ref.config, small_ref.params
    audio = [load_speech()[0][:8000]]
    inputs = {k: jnp.asarray(v) for k, v in Xcodec2FeatureExtractor()(audio, sampling_rate=16000).items()}
    linen = Xcodec2Model(config)
    encode = jax.jit(lambda p, v, f: linen.apply({"params": p}, v, f, output_latents=True, method="encode"))
    expected = encode(params, inputs["input_values"], inputs["input_features"])

    codec = to_nnx(config, params)
    state = flatten(nnx.to_pure_dict(nnx.state(codec, nnx.Param)))
    assert state.keys() == flatten(params).keys()
    out = nnx.jit(lambda m, v, f: m.encode(v, f, output_latents=True))(
        codec, inputs["input_values"], inputs["input_features"]
    )
    np.testing.assert_array_equal(out.audio_codes, expected.audio_codes)
    decoded = nnx.jit(lambda m, c: m.decode(c).audio_values)(codec, out.audio_codes)
    reference = jax.jit(lambda p, c: linen.apply({"params": p}, c, method="decode").audio_values)
    np.testing.assert_allclose(decoded, reference(params, expected.audio_codes), rtol=0, atol=1e-6)

    # Gradients through an NNX module holding the codec equal jax.grad of the Linen model's.
    probe = Probe(codec, nnx.Rngs(0))
    grads = nnx.jit(nnx.grad(lambda m: m(out.latents)))(probe)
    w, b = probe.head.kernel[...], probe.head.bias[...]

    def linen_loss(p):
        audio = linen.apply({"params": p}, latents=out.latents, method=Xcodec2Model.decode).audio_values
        return jnp.mean((audio[..., None] @ w + b) ** 2)

    expected_grads = flatten(jax.jit(jax.grad(linen_loss))(params))
    got = flatten(nnx.to_pure_dict(grads.codec))
    assert got.keys() == expected_grads.keys()
    decoder = [p for p in got if p[0] == "acoustic_decoder"]
    assert max(float(np.abs(expected_grads[p]).max()) for p in decoder) > 0
    for path in got:
        scale = max(float(np.abs(expected_grads[path]).max()), 1e-30)
        np.testing.assert_allclose(
            got[path], expected_grads[path], rtol=0, atol=1e-5 * scale, err_msg=str(path)
        )
