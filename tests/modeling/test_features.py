"""Feature extractor parity: numpy path vs transformers' Xcodec2FeatureExtractor, JAX path vs numpy path.

torchaudio cannot load beside the CPU torch used here, so the reference's one torchaudio call,
``compliance.kaldi.fbank``, is swapped for transformers' own numpy kaldi fbank (the computation
SeamlessM4TFeatureExtractor._extract_fbank_features does, 6.6e-5 from torchaudio's), returned as a float32
tensor like torchaudio's. Everything else in the reference (padding, masks, normalisation, stacking) runs
as shipped.
"""

import importlib
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from xcodec2_jax.modeling.features import (
    Xcodec2FeatureExtractor,
    fbank_features_jax,
    kaldi_mel_filter_bank,
    num_feature_frames,
    povey_window,
)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function  # noqa: E402

# Through the lazy package the extractor is a dummy placeholder (torchaudio missing); the module itself is
# importable and its class usable, since @requires on a class only attaches metadata.
hf_fe = importlib.import_module("transformers.models.xcodec2.feature_extraction_xcodec2")

DATA = Path(__file__).parent.parent / "data"
WAVS = sorted(DATA.glob("*.wav"))
FEATURE_TOL = 1e-3
JAX_TOL = 1e-4
MASK_KEYS = ("input_values", "padding_mask", "input_features_mask")


def load(path):
    audio, sr = sf.read(path, dtype="float32")
    assert sr == 16000 and audio.ndim == 1
    return audio


def noise(n, seed=0, scale=0.1):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def speech():
    assert len(WAVS) >= 3, "tests/data/*.wav missing"
    return [load(p) for p in WAVS]


@pytest.fixture(scope="module")
def reference():
    window = window_function(400, "povey", periodic=False)
    mel_filters = mel_filter_bank(
        num_frequency_bins=257,
        num_mel_filters=80,
        min_frequency=20,
        max_frequency=8000,
        sampling_rate=16000,
        norm=None,
        mel_scale="kaldi",
        triangularize_in_mel_space=True,
    )

    def fbank(waveform, **kwargs):
        assert kwargs["window_type"] == "povey" and kwargs["dither"] == 0.0 and kwargs["num_mel_bins"] == 80
        features = spectrogram(
            waveform[0].numpy(),
            window,
            frame_length=400,
            hop_length=160,
            fft_length=512,
            power=2.0,
            center=False,
            preemphasis=0.97,
            mel_filters=mel_filters,
            log_mel="log",
            mel_floor=1.192092955078125e-07,
            remove_dc_offset=True,
        ).T
        return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))

    fake = types.SimpleNamespace(compliance=types.SimpleNamespace(kaldi=types.SimpleNamespace(fbank=fbank)))
    # The module skipped `import torchaudio`; give it the name.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_fe, "torchaudio", fake, raising=False)
        extractor = hf_fe.Xcodec2FeatureExtractor()

        def run(audio, **kwargs):
            out = extractor(audio, sampling_rate=16000, **kwargs)
            return {k: v.numpy() for k, v in out.items()}

        yield run


@pytest.fixture(scope="module")
def fe():
    return Xcodec2FeatureExtractor()


def assert_matches_reference(ours, ref, label, tol=FEATURE_TOL):
    for key in MASK_KEYS:
        assert ours[key].dtype == ref[key].dtype, key
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    assert ours["input_features"].shape == ref["input_features"].shape
    assert ours["input_features"].dtype == np.float32
    diff = float(np.abs(ours["input_features"] - ref["input_features"]).max())
    print(f"{label}: numpy vs reference features max abs diff {diff:.2e}")
    assert diff <= tol
    return diff


def assert_jax_matches(fe, ours, label):
    lengths = ours["padding_mask"].sum(-1)
    features, mask = fe.jax_features(ours["input_values"], lengths)
    np.testing.assert_array_equal(np.asarray(mask), ours["input_features_mask"])
    diff = float(np.abs(np.asarray(features) - ours["input_features"]).max())
    print(f"{label}: jax vs numpy features max abs diff {diff:.2e}")
    assert diff <= JAX_TOL
    return diff


def test_filter_bank_and_window_match_transformers():
    ref = mel_filter_bank(
        257, 80, 20, 8000, 16000, norm=None, mel_scale="kaldi", triangularize_in_mel_space=True
    )
    np.testing.assert_allclose(kaldi_mel_filter_bank(), ref, atol=1e-12)
    np.testing.assert_allclose(povey_window(), window_function(400, "povey", periodic=False), atol=1e-15)


@pytest.mark.parametrize("index", range(len(WAVS)), ids=[p.stem for p in WAVS])
def test_utterance_matches_reference(reference, fe, speech, index):
    ours = fe(speech[index])
    assert_matches_reference(ours, reference(speech[index]), WAVS[index].stem)
    assert_jax_matches(fe, ours, WAVS[index].stem)


def test_padded_batch_matches_reference(reference, fe, speech):
    ours = fe(speech)
    b, _, t = ours["input_values"].shape
    assert b == len(speech) and t % 320 == 0
    assert ours["input_features"].shape == (b, num_feature_frames(t), 160) == (b, t // 320, 160)
    assert_matches_reference(ours, reference(speech), "speech batch")
    assert_jax_matches(fe, ours, "speech batch")
    # Each item's features are those it gets alone, followed by padding.
    for i, audio in enumerate(speech):
        alone = fe(audio)["input_features"][0]
        np.testing.assert_array_equal(ours["input_features"][i, : len(alone)], alone)
        assert (ours["input_features"][i, len(alone) :] == 1.0).all()


@pytest.mark.parametrize(
    "case",
    ["multiple_of_hop", "one_less_than_hop", "one_sample", "ten_ms", "two_hops", "loud", "quiet"],
)
def test_edge_cases_match_reference(reference, fe, speech, case):
    audio = {
        "multiple_of_hop": noise(320 * 25),
        "one_less_than_hop": noise(319),  # with the appended zero: exactly one hop
        "one_sample": np.array([0.3], np.float32),
        "ten_ms": noise(160),
        "two_hops": noise(640),
        "loud": speech[0] * 1e3,
        "quiet": speech[1] * 1e-3,
    }[case]
    ours = fe(audio)
    assert np.isfinite(ours["input_features"]).all()
    assert_matches_reference(ours, reference(audio), case)
    assert_jax_matches(fe, ours, case)


def test_mixed_batch_matches_reference(reference, fe, speech):
    audio = [noise(1), speech[2], noise(320 * 3, seed=1), noise(160, seed=2)]
    ours = fe(audio)
    assert_matches_reference(ours, reference(audio), "mixed batch")
    assert_jax_matches(fe, ours, "mixed batch")


def test_silence_is_finite(reference, fe, speech):
    ours = fe([np.zeros(16000, np.float32), speech[0]])
    ref = reference([np.zeros(16000, np.float32), speech[0]])
    for key in MASK_KEYS:
        np.testing.assert_array_equal(ours[key], ref[key])
    valid = ours["input_features_mask"][0] == 1
    # Constant log(eps) columns normalise to exactly 0 here; the reference gives float32 rounding noise
    # of its mean amplified by 1/sqrt(1e-7), a few 1e-3.
    assert (ours["input_features"][0, valid] == 0.0).all()
    assert np.abs(ref["input_features"][0, valid]).max() < 1e-2
    np.testing.assert_allclose(ours["input_features"][1], ref["input_features"][1], atol=FEATURE_TOL)
    features, _ = fe.jax_features(ours["input_values"], ours["padding_mask"].sum(-1))
    assert (np.asarray(features)[0, valid] == 0.0).all()


def test_truncation_matches_reference(reference, fe, speech):
    for max_length in (30000, 32000, 12345):
        ours = fe(speech, max_length=max_length, truncation=True)
        assert_matches_reference(ours, reference(speech, max_length=max_length, truncation=True), "truncated")
        # Without truncation the reference ignores max_length when padding to the longest.
        ours = fe(speech, max_length=max_length)
        assert_matches_reference(ours, reference(speech, max_length=max_length), "max_length ignored")


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_length=100000), dict(max_length=20000, truncation=True)],
    ids=["pad", "pad_and_truncate"],
)
def test_padding_max_length(reference, fe, speech, kwargs):
    ours, ref = fe(speech, padding="max_length", **kwargs), reference(speech, padding="max_length", **kwargs)
    t = ours["input_values"].shape[-1]
    assert t == -(-kwargs["max_length"] // 320) * 320
    for key in ("input_values", "padding_mask"):
        np.testing.assert_array_equal(ours[key], ref[key])
    # The reference pads the feature frames to max_length *frames* (max_length / 2 stacked), which no
    # longer lines up with the T/320 acoustic frames; we stop at T/320. The frames we keep agree.
    f = num_feature_frames(t)
    assert ours["input_features"].shape[1] == f < ref["input_features"].shape[1]
    np.testing.assert_array_equal(ours["input_features_mask"], ref["input_features_mask"][:, :f])
    diff = np.abs(ours["input_features"] - ref["input_features"][:, :f]).max()
    print(f"max_length {kwargs}: numpy vs reference features max abs diff {diff:.2e}")
    assert diff <= FEATURE_TOL
    assert_jax_matches(fe, ours, "max_length")


def test_input_forms_agree(fe, speech):
    audio = speech[3]
    base = fe(audio)
    for variant in (audio[None], [audio], (audio[None],), audio.astype(np.float64), list(map(float, audio))):
        out = fe(variant)
        for key, value in base.items():
            np.testing.assert_array_equal(out[key], value, err_msg=key)
    assert set(base) == {"input_values", "padding_mask", "input_features", "input_features_mask"}
    assert base["padding_mask"].dtype == np.int32 and base["input_features_mask"].dtype == np.int32


def test_jax_compiles_once_per_padded_shape(fe, speech):
    from xcodec2_jax.utils.compat import jax_monitoring

    batch, length = 3, 320 * 70
    audio = np.zeros((batch, length), np.float32)
    for i, a in enumerate(speech[:batch]):
        audio[i, : min(len(a), length)] = a[:length]
    event = jax_monitoring.backend_compile_event()
    assert event, "JAX's compile event is gone: this test cannot count compilations"
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if name == event else None
    )
    fbank_features_jax(audio, [length, 1, 1])  # the (B, T) program, compiled once
    before = len(compiles)
    traces = []

    @jax.jit
    def wrapped(x, lengths):
        traces.append(1)
        return fbank_features_jax(x, lengths)

    for lengths in ([length, 5000, 1], np.array([0, length, 320], np.int64), jnp.array([7000, 9000, 17])):
        fbank_features_jax(audio, lengths)
        wrapped(audio, jnp.asarray(lengths, jnp.int32))
    # The outer jit's one program; fbank_features_jax itself compiled nothing more for other lengths.
    assert len(compiles) - before == 1
    assert len(traces) == 1

    # A length counts the appended zero, so item i of length L is the numpy path's x[:L-1] plus a 0 at L-1;
    # a length of 0 is all padding.
    x = audio.copy()
    x[1, length - 1] = x[2, 319] = 0.0
    features, mask = fbank_features_jax(x, [0, length, 320])
    assert (np.asarray(features)[0] == 1.0).all() and (np.asarray(mask)[0] == 0).all()
    ref = fe([x[1, : length - 1], x[2, :319]])
    np.testing.assert_allclose(np.asarray(features)[1:], ref["input_features"], atol=JAX_TOL)
    np.testing.assert_array_equal(np.asarray(mask)[1:], ref["input_features_mask"])


def test_jax_ignores_samples_past_length(fe, speech):
    ours = fe([speech[0], speech[3]])
    x = ours["input_values"].copy()
    lengths = ours["padding_mask"].sum(-1)
    x[1, 0, lengths[1] :] = 0.5  # garbage in the padding
    features, mask = fbank_features_jax(x, lengths)
    np.testing.assert_allclose(np.asarray(features), ours["input_features"], atol=JAX_TOL)
    np.testing.assert_array_equal(np.asarray(mask), ours["input_features_mask"])


def test_num_feature_frames():
    assert [num_feature_frames(320 * k) for k in (1, 2, 50)] == [1, 2, 50]
    assert Xcodec2FeatureExtractor().num_feature_frames(32000) == 100


def item_error(index):
    return pytest.raises(ValueError, match=f"item {index}:")


def test_bad_inputs(fe):
    good = noise(1000)
    with pytest.raises(ValueError, match="resample"):
        fe(good, sampling_rate=22050)
    with item_error(0):
        fe(np.zeros((2, 1000), np.float32))
    with item_error(1):
        fe([good, np.zeros((1, 2, 100), np.float32)])
    with item_error(2):
        fe([good, good, np.zeros((2, 100), np.float32)])
    with pytest.raises(ValueError, match="item 1: empty"):
        fe([good, np.zeros(0, np.float32)])
    for bad in (np.nan, np.inf, -np.inf):
        x = good.copy()
        x[10] = bad
        with item_error(2):
            fe([good, good, x])
    with item_error(0):
        fe(np.zeros(100, np.int16))
    with pytest.raises(ValueError):
        fe([])
    with pytest.raises(ValueError, match="padding"):
        fe(good, padding=False)
    with pytest.raises(ValueError, match="max_length"):
        fe(good, truncation=True)
    with item_error(1):
        fe([good, noise(5000)], padding="max_length", max_length=2000)
    with pytest.raises(ValueError, match="multiple of 320"):
        fbank_features_jax(np.zeros((1, 1000), np.float32), [1000])
    with pytest.raises(ValueError):
        Xcodec2FeatureExtractor(sampling_rate=24000)


# HKUSTAudio/xcodec2-hf's preprocessor_config.json as published (what transformers' save_pretrained writes).
PUBLISHED = {
    "feature_extractor_type": "Xcodec2FeatureExtractor",
    "feature_size": 80,
    "hop_length": 320,
    "padding_side": "right",
    "padding_value": 1.0,
    "return_attention_mask": True,
    "sampling_rate": 16000,
}


def test_from_pretrained_reads_transformers_settings(tmp_path, speech):
    import json

    from transformers import FeatureExtractionMixin

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**PUBLISHED, "padding_value": 0.5}))
    loaded = Xcodec2FeatureExtractor.from_pretrained(tmp_path)
    assert (loaded.padding_value, loaded.hop_length, loaded.sampling_rate) == (0.5, 320, 16000)
    out = loaded(speech[0][:8000], sampling_rate=16000)
    want = Xcodec2FeatureExtractor(padding_value=0.5)(speech[0][:8000], sampling_rate=16000)
    for key in want:
        np.testing.assert_array_equal(out[key], want[key])

    # What ours writes is what transformers reads, and back.
    saved = tmp_path / "saved"
    saved.mkdir()
    loaded.save_pretrained(saved)
    settings, _ = FeatureExtractionMixin.get_feature_extractor_dict(str(saved))
    assert settings == {**PUBLISHED, "padding_value": 0.5}
    assert Xcodec2FeatureExtractor.from_pretrained(saved).padding_value == 0.5

    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="no preprocessor_config.json"):
        Xcodec2FeatureExtractor.from_pretrained(tmp_path / "empty")
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({**PUBLISHED, "feature_extractor_type": "NeuCodecFeatureExtractor"})
    )
    with pytest.raises(ValueError, match="NeuCodecFeatureExtractor"):
        Xcodec2FeatureExtractor.from_pretrained(tmp_path)
