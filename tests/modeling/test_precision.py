"""Precision is explicit, never a global flag.

What the model lowers is read back as StableHLO text: in float32 every dot and convolution must carry
HIGHEST (XLA's DEFAULT is TF32 on A100/H100 and one bfloat16 pass on TPUs, which would move FSQ's
rounding boundaries); ``precision="default"`` is the explicit opt-in; under bfloat16 compute FSQ,
the norms, softmax and the ISTFT must still compute in float32, and ``load_params(dtype=bfloat16)``
must leave their parameters float32. Both device lowerings ("cpu" and "generic", the one GPUs and
TPUs get) are checked, whatever backend runs the test.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL_CONFIG

from xcodec2_jax.config import Xcodec2Config
from xcodec2_jax.modeling.layout import keeps_float32
from xcodec2_jax.modeling.model import Xcodec2Model, abstract_params
from xcodec2_jax.modeling.nn.layers import resolve_precision

CONFIG = Xcodec2Config.from_dict(SMALL_CONFIG)
FRAMES = 12
_OP = re.compile(r"stablehlo\.(dot_general|convolution)\b")
_PRECISION = re.compile(r"precision(?:_config)? = \[([^\]]*)\]")


def _lowered(dtype=jnp.float32, precision=None, lowering="cpu", isolate=True, mask=True) -> dict[str, str]:
    """StableHLO text of encode and decode of the small config, for abstract (shape-only) params."""
    model = Xcodec2Model(CONFIG, dtype=dtype, precision=precision, lowering=lowering)
    params = abstract_params(CONFIG)
    hop = CONFIG.hop_length
    values = jax.ShapeDtypeStruct((2, 1, FRAMES * hop), jnp.float32)
    features = jax.ShapeDtypeStruct((2, FRAMES, 160), jnp.float32)
    frame_mask = jax.ShapeDtypeStruct((2, FRAMES), jnp.int32)
    codes = jax.ShapeDtypeStruct((2, 1, FRAMES), jnp.int32)

    def encode(p, v, f, m):
        out = model.apply(
            {"params": p}, v, f, input_features_mask=m, isolate_items=isolate, method=Xcodec2Model.encode
        )
        return out.audio_codes

    def decode(p, c, m):
        out = model.apply({"params": p}, c, audio_codes_mask=m if mask else None, method=Xcodec2Model.decode)
        return out.audio_values

    return {
        "encode": jax.jit(encode).lower(params, values, features, frame_mask).as_text(),
        "decode": jax.jit(decode).lower(params, codes, frame_mask).as_text(),
    }


def _precisions(text: str) -> list[str]:
    """The precision attribute of every dot_general and convolution, 'NONE' where it has none."""
    out = []
    for line in text.splitlines():
        if _OP.search(line):
            m = _PRECISION.search(line)
            out.append(m[1].replace("#stablehlo<precision ", "").replace(">", "") if m else "NONE")
    return out


def test_no_global_precision_flag():
    assert jax.config.jax_default_matmul_precision is None


@pytest.mark.parametrize("lowering", ["cpu", "generic"])
@pytest.mark.parametrize("isolate", [False, True])
def test_float32_lowers_every_dot_and_convolution_at_highest(lowering, isolate):
    for name, text in _lowered(lowering=lowering, isolate=isolate, mask=isolate).items():
        found = _precisions(text)
        assert len(found) >= 10, (name, found)  # the lowering has the model's dots, not a stub
        left = [p for p in found if p != "HIGHEST, HIGHEST"]
        assert not left, f"{name} ({lowering}): {len(left)} of {len(found)} ops not HIGHEST: {left[:5]}"


@pytest.mark.slow
def test_generic_lowering_uses_convolutions_and_unchunked_attention():
    cpu, generic = _lowered(lowering="cpu")["encode"], _lowered(lowering="generic")["encode"]
    # The CPU variant turns k <= 3 convolutions into matmuls and chunks attention queries in a loop.
    assert generic.count("stablehlo.convolution") > cpu.count("stablehlo.convolution")
    assert "stablehlo.while" in cpu


def test_precision_default_is_an_explicit_opt_in():
    for name, text in _lowered(precision="default").items():
        found = _precisions(text)
        assert found.count("DEFAULT, DEFAULT") >= 10, name
        # FSQ's projections (and, in decode, the ISTFT head) stay HIGHEST whatever is chosen.
        assert "HIGHEST, HIGHEST" in found, name
    assert resolve_precision("tensorfloat32") == jax.lax.Precision.HIGH
    assert resolve_precision(None, jnp.bfloat16) == jax.lax.Precision.DEFAULT


def test_bad_precision_and_lowering_are_clear_errors():
    with pytest.raises(ValueError, match="precision must be"):
        Xcodec2Model(CONFIG, precision="fast")
    with pytest.raises(ValueError, match="lowering must be"):
        Xcodec2Model(CONFIG, lowering="gpu")


_TENSOR = re.compile(r"tensor<(?:[0-9?]+x)*([a-z0-9]+)>")


def _result_types(text: str, op: str) -> list[str]:
    """Element types of the results of every ``stablehlo.<op>`` in the text."""
    out = []
    for line in text.splitlines():
        if f"stablehlo.{op}" in line or f'"stablehlo.{op}"' in line:
            out += _TENSOR.findall(line.rsplit("->", 1)[-1] if "->" in line else line.rsplit(":", 1)[-1])
    return out


@pytest.mark.parametrize("lowering", ["cpu", "generic"])
def test_bfloat16_keeps_its_float32_islands(lowering):
    texts = _lowered(dtype=jnp.bfloat16, lowering=lowering)
    enc, dec = texts["encode"], texts["decode"]
    # The compute really is bfloat16...
    assert "bf16" in enc and "bf16" in dec
    # ...but FSQ's bound (tanh), rounding and index arithmetic are float32,
    assert set(_result_types(enc, "tanh")) == {"f32"}
    assert set(_result_types(enc, "round_nearest_even") + _result_types(enc, "round_nearest_afz")) == {"f32"}
    # project_in (the only dot with as many outputs as FSQ levels) takes float32 operands,
    levels = len(CONFIG.quantization_levels)
    fsq_dots = [
        line
        for line in enc.splitlines()
        if "stablehlo.dot_general" in line and re.search(rf"-> tensor<(?:\d+x)*{levels}xf32>", line)
    ]
    assert fsq_dots and all("bf16" not in line for line in fsq_dots)
    # every reduction (norm statistics, softmax) runs on float32 values (or on integers / booleans),
    for name, text in texts.items():
        kinds = set(_result_types(text, "reduce"))
        assert kinds and "bf16" not in kinds, (name, kinds)
    # and the ISTFT's inverse FFT is float32 (complex64 in, f32 out).
    assert set(_result_types(dec, "fft")) <= {"f32", "complex<f32>"} and _result_types(dec, "fft")


def test_load_params_bfloat16_leaves_float32_islands(small_ref):
    from xcodec2_jax import load_params
    from xcodec2_jax.utils.tree import flatten as _flatten

    flat = _flatten(load_params(small_ref.path, dtype=jnp.bfloat16))
    islands = [p for p in flat if keeps_float32(p)]
    # FSQ, norms, SnakeBeta and the ISTFT head are all there, and all float32; the rest is bf16.
    for must in (("quantizer", "project_in", "kernel"), ("acoustic_decoder", "head", "linear", "kernel")):
        assert must in islands
    assert any(p[-2:] == ("act", "beta") for p in islands)
    assert any("layer_norm" in "/".join(p) for p in islands)
    assert all(np.asarray(flat[p]).dtype == np.float32 for p in islands), [
        p for p in islands if np.asarray(flat[p]).dtype != np.float32
    ]
    others = [p for p in flat if p not in islands]
    assert others and all(np.asarray(flat[p]).dtype == jnp.bfloat16 for p in others)
