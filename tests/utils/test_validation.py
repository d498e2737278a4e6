"""Bad input gets one clear ValueError naming the argument, item or file (issue probes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xcodec2_jax.config import Xcodec2Config
from xcodec2_jax.utils import validation


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "8", None])
def test_positive_int_refuses(value):
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer"):
        validation.positive_int(value, "batch_size")


@pytest.mark.parametrize("rate", [1, 999, 1e9, 768_001, float("nan"), float("inf"), True, "16000"])
def test_sampling_rate_outside_the_plausible_range(rate):
    with pytest.raises(ValueError, match="sampling_rate"):
        validation.sampling_rate(rate)


def test_sampling_rate_message_gives_the_range():
    with pytest.raises(ValueError, match="between 1000 and 768000"):
        validation.sampling_rate(1)
    assert validation.sampling_rate(8000) == 8000.0
    assert validation.sampling_rate(np.int64(44100)) == 44100.0


def test_audio_layouts():
    stereo = np.ones((100, 2), np.float32) * [1.0, 0.0]
    np.testing.assert_allclose(validation.audio_array(stereo), np.full(100, 0.5))
    np.testing.assert_allclose(validation.audio_array(stereo.T), np.full(100, 0.5))  # (channels, samples)
    with pytest.raises(ValueError, match=r"item 3: cannot tell samples from channels.*\(17, 48000\)"):
        validation.audio_array(np.zeros((17, 48000), np.float32), "item 3")
    with pytest.raises(ValueError, match=r"\(samples, channels\) with at most 16 channels"):
        validation.audio_array(np.zeros((48000, 17), np.float32).T)


def test_codes_validator_names_the_first_bad_code():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 10\): code 12 at position 2"):
        validation.codes([1, 2, 12, -1], 10)
    with pytest.raises(ValueError, match="integer dtype"):
        validation.codes([1.0], 10)
    assert validation.codes(np.array([[1, 9]], np.int64), 10).dtype == np.int32


def test_malformed_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'} is not valid JSON"):
        Xcodec2Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="does not hold a JSON object"):
        Xcodec2Config.from_pretrained(tmp_path / "config.json")
