"""Llasa speech tokens: text and id round trips, rejected tokens, and ``decode --llasa-text``."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from xcodec2_jax.cli import main
from xcodec2_jax.inference import compilation_cache as cache
from xcodec2_jax.inference.llasa import (
    CODEBOOK_SIZE,
    LLASA_SPEECH_OFFSET,
    codes_to_ids,
    codes_to_text,
    ids_to_codes,
    text_to_codes,
)


def test_text_round_trip_and_format():
    codes = np.array([0, 9, 123, 65535, 7], np.int32)
    text = codes_to_text(codes)
    assert text == "<|s_0|><|s_9|><|s_123|><|s_65535|><|s_7|>"
    back = text_to_codes(text)
    assert back.dtype == np.int32 and back.tolist() == codes.tolist()
    rng = np.random.default_rng(0)
    many = rng.integers(0, CODEBOOK_SIZE, 2000)
    assert text_to_codes(codes_to_text(many)).tolist() == many.tolist()
    # One item straight from the model, (1, 1, N), is accepted as N codes.
    assert codes_to_text(codes[None, None]) == text
    assert codes_to_text(np.zeros(0, np.int32)) == "" and text_to_codes("no speech").size == 0


def test_other_tokens_ignored():
    generated = (
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|SPEECH_GENERATION_START|>"
        "<|s_12|> <|s_40000|>\n<|s_3|>hello<|SPEECH_GENERATION_END|><|eot_id|>"
    )
    assert text_to_codes(generated).tolist() == [12, 40000, 3]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("<|s_1|><|s_abc|>", "'<|s_abc|>' at character 7"),
        ("<|s_-1|>", "'<|s_-1|>'"),
        ("<|s_|>", "'<|s_|>'"),
        ("<|s_007|>", "'<|s_007|>'"),
        ("<|s_1 |>", "'<|s_1 |>'"),
        ("<|s_5|><|s_12", "'<|s_12' at character 7"),
        ("<|s_65536|>", "'<|s_65536|>' at character 0 is out of range"),
    ],
)
def test_malformed_or_out_of_range_tokens_rejected(text, named):
    with pytest.raises(ValueError) as info:
        text_to_codes(text)
    assert named in str(info.value)


def test_codebook_size_bounds_tokens_and_codes():
    assert text_to_codes("<|s_499|>", codebook_size=500).tolist() == [499]
    with pytest.raises(ValueError, match=r"'<\|s_500\|>'.*500 entries"):
        text_to_codes("<|s_499|><|s_500|>", codebook_size=500)
    with pytest.raises(ValueError, match=r"code 65536 at position 1"):
        codes_to_text([3, 65536])
    with pytest.raises(ValueError, match=r"code -2 at position 0"):
        codes_to_ids([-2], LLASA_SPEECH_OFFSET)
    with pytest.raises(ValueError, match="integers"):
        codes_to_text(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        codes_to_text(np.zeros((2, 3), np.int32))


def test_id_round_trip_and_offset_checks():
    assert LLASA_SPEECH_OFFSET == 128256 + 8  # Llama 3's vocabulary, then Llasa's 8 special tokens
    codes = np.array([0, 1, 65535, 4242])
    ids = codes_to_ids(codes, LLASA_SPEECH_OFFSET)
    assert ids.tolist() == [128264, 128265, 128264 + 65535, 128264 + 4242]
    back = ids_to_codes(ids, LLASA_SPEECH_OFFSET)
    assert back.dtype == np.int32 and back.tolist() == codes.tolist()
    assert ids_to_codes(codes_to_ids(codes, 1000), 1000).tolist() == codes.tolist()

    # The raw codes mistaken for ids (LLaSA_training#20): the first one below the range is named.
    with pytest.raises(ValueError, match=r"token id 0 at position 0 is not a speech token"):
        ids_to_codes(codes, LLASA_SPEECH_OFFSET)
    with pytest.raises(ValueError, match=r"token id 193800 at position 1"):
        ids_to_codes([128264, 128264 + 65536], LLASA_SPEECH_OFFSET)
    # skip_other drops the base vocabulary's tokens (here <|SPEECH_GENERATION_START/END|>), not ids above.
    generated = [128260, *ids.tolist(), 128261]
    assert ids_to_codes(generated, LLASA_SPEECH_OFFSET, skip_other=True).tolist() == codes.tolist()
    with pytest.raises(ValueError, match=r"token id 193800 at position 2"):
        ids_to_codes([128260, 128264, 193800], LLASA_SPEECH_OFFSET, skip_other=True)
    for bad in (-1, 1.5, "128264", True):
        with pytest.raises(ValueError, match="offset"):
            codes_to_ids(codes, bad)


def test_cli_decodes_llasa_text(small_ref, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(cache.ENV_VAR, "off")
    codes = np.random.default_rng(1).integers(0, 500, 37)
    (tmp_path / "gen.txt").write_text(
        "<|SPEECH_GENERATION_START|>" + codes_to_text(codes, codebook_size=500) + "<|SPEECH_GENERATION_END|>"
    )
    (tmp_path / "big.txt").write_text("<|s_1|><|s_500|>")
    (tmp_path / "none.txt").write_text("<|SPEECH_GENERATION_END|>")
    np.save(tmp_path / "codes.npy", codes.astype(np.int32))
    out = tmp_path / "wav"
    args = ["-o", str(out), "--model", small_ref.path]
    names = [str(tmp_path / n) for n in ("gen.txt", "big.txt", "none.txt")]
    assert main(["decode", "--llasa-text", *names, *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("xcodec2-jax:")]
    assert len(errors) == 2
    assert "big.txt" in errors[0] and "'<|s_500|>'" in errors[0] and "out of range" in errors[0]
    assert "none.txt" in errors[1] and "no speech tokens" in errors[1]
    assert sorted(p.name for p in out.iterdir()) == ["gen.wav"]

    # The text decodes to exactly what the same codes give as .npy.
    assert main(["decode", str(tmp_path / "codes.npy"), *args]) == 0
    from_text, rate = sf.read(out / "gen.wav")
    from_npy, _ = sf.read(out / "codes.wav")
    assert rate == 16000 and len(from_text) == 320 * len(codes)
    np.testing.assert_array_equal(from_text, from_npy)
    assert np.abs(from_text).max() > 0
