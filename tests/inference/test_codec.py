"""Xcodec2Codec: the user-facing API, against the model run item by item on the feature pipeline."""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import pytest
import soundfile as sf
from conftest import load_speech

from xcodec2_jax import Xcodec2Codec, Xcodec2FeatureExtractor, Xcodec2Model
from xcodec2_jax.inference.batching import batch_bucket, length_bucket
from xcodec2_jax.utils.validation import audio_array as to_mono_float32


@pytest.fixture(scope="module")
def codec(small_ref):
    return Xcodec2Codec.from_pretrained(small_ref.path, batch_size=4, compilation_cache=False)


def _model_codes_alone(small_ref, audio):
    """The model on the feature pipeline, one item at a time: what the codec must reproduce."""
    feats = Xcodec2FeatureExtractor()(audio, sampling_rate=16000)
    return np.asarray(_encode_alone(small_ref.config)(small_ref.params, feats))[0, 0]


@functools.cache
def _encode_alone(config):
    """The model's encode, jitted once per config (then compiled once per item length)."""
    model = Xcodec2Model(config)
    return jax.jit(lambda p, x: model.apply({"params": p}, **x, method=Xcodec2Model.encode).audio_codes)


@pytest.mark.slow
def test_encode_list_equals_model_per_item(codec, small_ref):
    speech = load_speech()
    encoded = codec.encode(speech, 16000)
    assert encoded.codes.dtype == np.int32 and encoded.codes.shape[0] == len(speech)
    for i, audio in enumerate(speech):
        expected = _model_codes_alone(small_ref, audio)
        assert encoded.lengths[i] == len(expected) == math.ceil((len(audio) + 1) / 320)
        np.testing.assert_array_equal(encoded[i], expected)
        assert not encoded.codes[i, encoded.lengths[i] :].any()


@pytest.mark.slow
def test_single_item_gives_batch_of_one(codec, small_ref):
    audio = load_speech()[3]
    encoded = codec.encode(audio, 16000)
    assert encoded.codes.shape == (1, encoded.lengths[0])
    np.testing.assert_array_equal(encoded[0], _model_codes_alone(small_ref, audio))


@pytest.mark.slow
def test_batch_size_does_not_change_codes(codec):
    speech = load_speech()
    a = codec.encode(speech, 16000, batch_size=1)
    b = codec.encode(speech, 16000, batch_size=3)
    np.testing.assert_array_equal(a.codes, b.codes)


def test_44k_stereo_int16_file(codec, tmp_path):
    rng = np.random.default_rng(0)
    seconds = 1.3
    t = np.arange(int(44100 * seconds)) / 44100
    left = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.normal(size=t.size)
    stereo = np.stack([left, 0.5 * left], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 44100, subtype="PCM_16")
    audio, rate = sf.read(path, dtype="int16")
    assert audio.dtype == np.int16 and audio.shape[1] == 2
    encoded = codec.encode(audio, rate)
    resampled = round(len(audio) * 16000 / 44100)
    assert encoded.lengths[0] == math.ceil((resampled + 1) / 320)
    assert encoded.codes.shape == (1, encoded.lengths[0])


def test_downmix_and_int_scaling():
    stereo = np.array([[32767, -32768], [0, 16384]], np.int16)
    np.testing.assert_allclose(to_mono_float32(stereo), [(32767 - 32768) / 2 / 32768, 0.25], atol=1e-7)
    channels_first = np.zeros((2, 100), np.float32)
    channels_first[0] = 1.0
    np.testing.assert_allclose(to_mono_float32(channels_first), np.full(100, 0.5))
    np.testing.assert_allclose(to_mono_float32(np.array([0, 255], np.uint8)), [-1.0, 127 / 128])


@pytest.mark.slow
def test_one_compilation_per_bucket(codec):
    """20 different lengths inside one length bucket compile the encode function once."""
    rng = np.random.default_rng(0)
    before = codec.programs.encode.num_compiled()
    lengths = {math.ceil((n + 1) / 320) for n in range(28 * 320, 32 * 320 - 1, 64)}
    assert {length_bucket(n) for n in lengths} == {32}
    for n in range(28 * 320, 28 * 320 + 20 * 64, 64):
        codec.encode(rng.normal(scale=0.1, size=n).astype(np.float32), 16000)
    assert codec.programs.encode.num_compiled() - before == 1


@pytest.mark.slow
def test_decode_shapes_and_equality_to_model(codec, small_ref):
    codes = np.random.default_rng(0).integers(0, small_ref.config.codebook_size, (3, 20)).astype(np.int32)
    audio = codec.decode(codes)
    assert audio.shape == (3, 20 * 320) and audio.dtype == np.float32
    model = Xcodec2Model(small_ref.config)
    ref = model.apply({"params": small_ref.params}, codes[:, None], method=Xcodec2Model.decode).audio_values
    np.testing.assert_allclose(audio, np.asarray(ref)[:, 0], atol=1e-5 * np.abs(ref).max())
    single = codec.decode(codes[0])
    assert single.shape == (1, 20 * 320)
    lengths = [20, 7, 13]
    trimmed = codec.decode(codes, lengths=lengths)
    for i, n in enumerate(lengths):
        alone = model.apply(
            {"params": small_ref.params}, codes[i : i + 1, None, :n], method=Xcodec2Model.decode
        )
        np.testing.assert_allclose(
            trimmed[i], np.asarray(alone.audio_values)[0, 0], atol=1e-5 * np.abs(ref).max()
        )


@pytest.mark.slow
def test_encode_decode_roundtrip_object(codec):
    speech = load_speech()[:2]
    encoded = codec.encode(speech, 16000)
    audio = codec.decode(encoded)
    assert [len(a) for a in audio] == [n * 320 for n in encoded.lengths]


@pytest.mark.parametrize(
    "audio, rate, message",
    [
        ([np.zeros(100, np.float32), np.zeros(0, np.float32)], 16000, "item 1: audio is empty"),
        ([np.full(100, np.nan, np.float32)], 16000, "item 0: audio contains NaN"),
        ([np.zeros((2, 3, 4), np.float32)], 16000, "item 0: audio must be 1-D"),
        ([np.array(["a"])], 16000, "item 0: audio must be numeric"),
        ([np.zeros(100, np.float32)], 0, "sampling_rate"),
        ([], 16000, "no audio"),
    ],
)
def test_bad_audio(codec, audio, rate, message):
    with pytest.raises(ValueError, match=message):
        codec.encode(audio, rate)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_bad_batch_size_is_one_clear_error(codec, small_ref, batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Xcodec2Codec(small_ref.config, None, batch_size=batch_size, compilation_cache=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        codec.encode(np.zeros(1000, np.float32), 16000, batch_size=batch_size)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        codec.decode(np.zeros(5, np.int32), batch_size=batch_size)


@pytest.mark.parametrize("rate", [1, 1e9])
def test_implausible_sampling_rate_is_refused_with_the_range(codec, rate):
    with pytest.raises(ValueError, match=r"sampling_rate must be .* between 1000 and 768000"):
        codec.encode(np.zeros(1600, np.float32), rate)


def test_ambiguous_two_dimensional_audio_is_refused(codec):
    """(17, T) could be 17 channels or 17 samples of T channels: refused, saying the layout to use."""
    with pytest.raises(ValueError, match=r"item 0: cannot tell samples from channels.*\(samples, channels\)"):
        codec.encode(np.zeros((17, 16000), np.float32), 16000)


def test_bad_codes(codec):
    with pytest.raises(ValueError, match=r"item 1: .*\[0, 500\)"):
        codec.decode([np.zeros(5, np.int32), np.full(5, 500, np.int32)])
    with pytest.raises(ValueError, match="integer"):
        codec.decode(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="lengths"):
        codec.decode(np.zeros((2, 5), np.int32), lengths=[5, 6])


def test_from_pretrained_unknown_repo_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(OSError, match="not a local directory.*Hub"):
        Xcodec2Codec.from_pretrained("nobody/not-a-model")


def test_buckets():
    assert [length_bucket(n) for n in (1, 8, 9, 11, 17, 100, 1000)] == [8, 8, 10, 12, 20, 112, 1024]
    assert [batch_bucket(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert batch_bucket(5, 6) == 6


def test_precision_is_passed_to_the_model(small_ref):
    config, params = small_ref.config, small_ref.params
    for precision in (None, "highest", "default", "tensorfloat32"):
        codec = Xcodec2Codec(config, params, precision=precision, compilation_cache=False)
        assert codec.precision == precision and codec.model.precision == precision
    with pytest.raises(ValueError, match="precision"):
        Xcodec2Codec(config, params, precision="fast", compilation_cache=False)
    with pytest.raises(ValueError, match="precision"):
        Xcodec2Codec.from_pretrained(small_ref.path, precision="float16", compilation_cache=False)


def test_cpu_compiler_options_by_default_and_overridable(codec, small_ref):
    """The codec compiles with CPU_COMPILER_OPTIONS on a CPU (test_encode_list_equals_model_per_item
    checks its codes against the model under plain jax.jit, i.e. XLA's defaults)."""
    from xcodec2_jax.inference.programs import CPU_COMPILER_OPTIONS

    assert codec.compiler_options == CPU_COMPILER_OPTIONS
    plain = Xcodec2Codec(small_ref.config, small_ref.params, compilation_cache=False, compiler_options={})
    assert plain.compiler_options == {}
    with pytest.raises(Exception, match="no_such_xla_option"):
        Xcodec2Codec(
            small_ref.config,
            small_ref.params,
            compilation_cache=False,
            compiler_options={"no_such_xla_option": True},
        ).decode(np.zeros(8, np.int32))


_AHEAD_CHILD = r"""
import json, sys
import jax, numpy as np
from xcodec2_jax import Xcodec2Codec
from xcodec2_jax.utils.compat import jax_monitoring
lengths = [5000, 3100, 900]
rng = np.random.default_rng(3)
audio = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]
compiled = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiled.append(event) if event == jax_monitoring.backend_compile_event()
    else None
)
codec = Xcodec2Codec.from_pretrained(sys.argv[1], batch_size=2, compilation_cache=sys.argv[2],
                                     encode_lengths=lengths)
ahead = list(codec.programs.encode.programs.values())
before = len(compiled)
codes = codec.encode(audio, 16000)
print("RESULT " + json.dumps({
    "ahead": [type(p).__name__ for p in ahead], "compiled_ahead": before,
    "compiled_by_encode": len(compiled) - before, "codes": [c.tolist() for c in codes],
}))
"""


@pytest.mark.subprocess
@pytest.mark.slow
def test_programs_compiled_while_loading(codec, small_ref, tmp_path):
    """A first-ever process: from_pretrained(encode_lengths=...) compiles the encode programs while
    the checkpoint loads, and encode of audio of those lengths then compiles nothing and gives the
    codes it gives otherwise. A later load maps the prepared checkpoint; precompile_encode also
    works after loading."""
    import os

    import jax
    from conftest import run_python

    from xcodec2_jax.utils.compat import jax_monitoring

    cache = str(tmp_path / "cache")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(
        {
            "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        }
    )
    child = run_python(_AHEAD_CHILD, [small_ref.path, cache], env, "RESULT ", 300)
    # Two batches of different shapes: two programs, both compiled ahead, and nothing by encode.
    assert child["ahead"] == ["_Compiled", "_Compiled"] and child["compiled_ahead"] >= 2
    assert child["compiled_by_encode"] == 0
    rng = np.random.default_rng(3)
    audio = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (5000, 3100, 900)]
    expected = codec.encode(audio, 16000)
    for got, want in zip(child["codes"], expected, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)

    compiled = []

    def record(event, duration, **kwargs):
        if event == jax_monitoring.backend_compile_event():
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(record)
    mapped = Xcodec2Codec.from_pretrained(small_ref.path, batch_size=2, compilation_cache=cache)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(mapped.params))
    assert mapped.precompile_encode([len(a) for a in audio]) == 2
    before = len(compiled)
    np.testing.assert_array_equal(mapped.encode(audio, 16000).codes, expected.codes)
    assert len(compiled) == before


@pytest.mark.parametrize("lengths", [[], [0], [-5], [1.5], [True]])
def test_precompile_encode_rejects_bad_lengths(codec, lengths):
    with pytest.raises(ValueError, match="positive sample counts"):
        codec.precompile_encode(lengths)
