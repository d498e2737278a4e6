"""Long audio in windows: exact code counts and lengths, agreement with the one-piece codec at least
what benchmarks/bench_long.py measured for this config, windows batched with other items, and a
crossfade whose weights sum to one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import load_speech

from xcodec2_jax import Xcodec2Codec
from xcodec2_jax.inference import windows

HOP = 320
# The test's windows: 6 s, of which 1.5 s of context on each side (3 s cores).
WINDOW_S, CONTEXT_S = 6.0, 1.5
# Measured by `python -m benchmarks.bench_long quality --config small` (README, "Long audio") on the
# same speech, config and windows: 96.8% of the codes agree at 1.5 s of encode context, windowed
# decode at 1.5 s of context is 16.1 dB from the one-piece decode.
MIN_AGREEMENT = 0.96
MIN_DECODE_SNR_DB = 15.5


@pytest.fixture(scope="module")
def codec(small_ref):
    return Xcodec2Codec.from_pretrained(small_ref.path, batch_size=4, compilation_cache=False)


@pytest.fixture(scope="module")
def long_speech():
    """About 20 s of speech: the test utterances twice, with a little silence between them."""
    gap = np.zeros(4000, np.float32)
    parts = [p for _ in range(2) for audio in load_speech() for p in (audio, gap)]
    return np.concatenate(parts)[:-1234]  # not a multiple of the hop


@pytest.fixture(scope="module")
def whole_codes(codec, long_speech):
    return codec.encode(long_speech, 16000, max_window_seconds=None)[0]


@pytest.fixture(scope="module")
def windowed_codes(codec, long_speech):
    return codec.encode(long_speech, 16000, max_window_seconds=WINDOW_S, context_seconds=CONTEXT_S)


def _snr_db(ref, x):
    return 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((x - ref).astype(np.float64) ** 2))


def test_plan_tiles_the_item():
    for n, window, context in [(1000, 300, 50), (301, 300, 50), (999, 100, 0), (37, 40, 10)]:
        plan = windows.plan(0, n, window, context, hop=HOP, fade=64)
        assert plan[0].keep_start == 0 and plan[-1].keep_end == n
        for a, b in zip(plan[:-1], plan[1:], strict=True):
            assert a.keep_end == b.keep_start and a.fade_right == b.fade_left
        for w in plan:
            assert w.end - w.start <= window and w.start <= w.keep_start < w.keep_end <= w.end
            assert w.keep_start - w.start == min(context, w.keep_start)
            assert w.end - w.keep_end == min(context, n - w.keep_end)
    with pytest.raises(ValueError, match="no core"):
        windows.plan(0, 1000, 100, 50)


def test_crossfade_weights_sum_to_one():
    n = 500
    plan = windows.plan(0, n, 120, 20, hop=HOP, fade=3200)
    assert len(plan) > 3 and all(w.fade_left == 1600 for w in plan[1:])
    out = np.zeros(n * HOP, np.float32)
    for w in plan:
        windows.add_decoded(out, np.ones((w.end - w.start) * HOP, np.float32), w, HOP)
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


@pytest.mark.slow
def test_windowed_encode(long_speech, whole_codes, windowed_codes):
    n = math.ceil((len(long_speech) + 1) / HOP)
    whole, windowed = whole_codes, windowed_codes
    assert windowed.lengths[0] == len(whole) == n
    agreement = np.mean(windowed[0] == whole)
    assert MIN_AGREEMENT <= agreement < 1.0


@pytest.mark.slow
def test_windows_batch_with_other_items(codec, long_speech, windowed_codes):
    """A long file and short ones in one call: the windows ride in the same batches as the short
    items (fewer encoder calls than batching them apart), and every item gets what it gets alone."""
    short = load_speech()[:2]
    items = [short[0], long_speech, short[1]]
    calls = []
    encode = codec.programs.encode
    codec.programs.encode = lambda params, inputs: (
        calls.append(len(inputs["input_values"])) or encode(params, inputs)
    )
    try:
        together = codec.encode(
            items, 16000, batch_size=5, max_window_seconds=WINDOW_S, context_seconds=CONTEXT_S
        )
    finally:
        codec.programs.encode = encode
    windows_long = len(windows.plan(0, together.lengths[1], round(WINDOW_S * 50), round(CONTEXT_S * 50)))
    assert windows_long == 8
    assert len(calls) == math.ceil((windows_long + 2) / 5) < math.ceil(windows_long / 5) + 1
    np.testing.assert_array_equal(together[1], windowed_codes[0])
    apart = codec.encode(short, 16000)
    for i, j in ((0, 0), (2, 1)):
        np.testing.assert_array_equal(together[i], apart[j])


@pytest.mark.slow
def test_windowed_decode(codec, whole_codes):
    codes = whole_codes
    whole = codec.decode(codes, max_window_seconds=None)[0]
    windowed = codec.decode(codes, max_window_seconds=WINDOW_S, context_seconds=CONTEXT_S)[0]
    assert windowed.shape == whole.shape == (len(codes) * HOP,) and windowed.dtype == np.float32
    assert MIN_DECODE_SNR_DB <= _snr_db(whole, windowed) < 200
    # Batched with a short item and returned as a list: the same audio.
    both = codec.decode([codes[:40], codes], max_window_seconds=WINDOW_S, context_seconds=CONTEXT_S)
    np.testing.assert_allclose(both[1], windowed, atol=1e-5 * np.abs(whole).max())
    assert both[0].shape == (40 * HOP,)


def test_bad_window_settings(codec):
    codes = np.zeros(400, np.int32)
    with pytest.raises(ValueError, match="no core"):
        codec.decode(codes, max_window_seconds=2.0, context_seconds=1.0)
    with pytest.raises(ValueError, match="max_window_seconds"):
        codec.encode(np.zeros(16000, np.float32), 16000, max_window_seconds="long")
    with pytest.raises(ValueError, match="context_seconds"):
        codec.encode(np.zeros(16000, np.float32), 16000, context_seconds=float("nan"))
