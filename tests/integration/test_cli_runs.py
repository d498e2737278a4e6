"""The xcodec2-jax command line: outputs, exit codes and one-line errors, with a random checkpoint."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from conftest import speech_files

from xcodec2_jax.cli import build_parser, main
from xcodec2_jax.inference import compilation_cache as cache


@pytest.fixture(autouse=True)
def _no_compilation_cache(monkeypatch):
    """In-process runs leave the user's cache folder alone (tests/test_cache.py runs it in children)."""
    monkeypatch.setenv(cache.ENV_VAR, "off")


@pytest.fixture()
def wav_dir(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    files = speech_files()[:3]
    shutil.copy(files[0], src / "a.wav")
    shutil.copy(files[1], src / "b.wav")
    shutil.copy(files[2], src / "sub" / "c.wav")
    return src


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("xcodec2-jax:")]


def test_encode_folder_decode_and_roundtrip(small_ref, wav_dir, tmp_path, capsys):
    codes_dir, audio_dir = tmp_path / "codes", tmp_path / "audio"
    assert (
        main(["encode", str(wav_dir), "-o", str(codes_dir), "--model", small_ref.path, "--batch-size", "2"])
        == 0
    )
    outputs = sorted(p.relative_to(codes_dir).as_posix() for p in codes_dir.rglob("*.npy"))
    assert outputs == ["a.npy", "b.npy", "sub/c.npy"]
    for rel in ("a", "b", "sub/c"):
        codes = np.load(codes_dir / f"{rel}.npy")
        n = sf.info(str(wav_dir / f"{rel}.wav")).frames
        assert codes.dtype == np.int32 and codes.shape == (math.ceil((n + 1) / 320),)

    assert main(["decode", str(codes_dir), "-o", str(audio_dir), "--model", small_ref.path]) == 0
    for rel in ("a", "b", "sub/c"):
        audio, rate = sf.read(audio_dir / f"{rel}.wav")
        assert rate == 16000 and len(audio) == 320 * len(np.load(codes_dir / f"{rel}.npy"))

    out = tmp_path / "rt.wav"
    assert main(["roundtrip", str(wav_dir / "a.wav"), str(out), "--model", small_ref.path]) == 0
    audio, rate = sf.read(out)
    assert rate == 16000 and len(audio) == sf.info(str(wav_dir / "a.wav")).frames

    # Existing outputs are kept without --overwrite (exit 2, one line), replaced with it.
    before = os.path.getmtime(out)
    assert main(["roundtrip", str(wav_dir / "a.wav"), str(out), "--model", small_ref.path]) == 2
    assert "exists" in _lines(capsys.readouterr().err)[0]
    assert os.path.getmtime(out) == before
    assert (
        main(["roundtrip", str(wav_dir / "a.wav"), str(out), "--model", small_ref.path, "--overwrite"]) == 0
    )


def test_bad_inputs_exit_2_and_good_files_still_done(small_ref, wav_dir, tmp_path, capsys):
    (wav_dir / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    sf.write(wav_dir / "nan.wav", np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    sf.write(wav_dir / "empty.wav", np.zeros(0, np.float32), 16000)
    out = tmp_path / "codes"
    assert main(["encode", str(wav_dir), "-o", str(out), "--model", small_ref.path]) == 2
    errors = _lines(capsys.readouterr().err)
    assert len(errors) == 3
    for name, problem in (("corrupt.wav", "cannot read"), ("nan.wav", "NaN"), ("empty.wav", "empty")):
        assert any(name in line and problem in line for line in errors), (name, errors)
    assert sorted(p.name for p in out.rglob("*.npy")) == ["a.npy", "b.npy", "c.npy"]

    np.save(tmp_path / "big.npy", np.array([1, 2, 65536], np.int64))
    np.save(tmp_path / "ok.npy", np.load(out / "a.npy"))
    wavs = tmp_path / "wavs"
    code = main(
        [
            "decode",
            str(tmp_path / "big.npy"),
            str(tmp_path / "ok.npy"),
            "-o",
            str(wavs),
            "--model",
            small_ref.path,
        ]
    )
    assert code == 2
    errors = _lines(capsys.readouterr().err)
    assert len(errors) == 1 and "big.npy" in errors[0] and "[0, 500)" in errors[0]
    assert (wavs / "ok.wav").exists() and not (wavs / "big.wav").exists()


def test_missing_model_is_one_line(tmp_path, capsys, monkeypatch, wav_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert (
        main(["encode", str(wav_dir / "a.wav"), "-o", str(tmp_path / "o"), "--model", "nobody/nothing"]) == 2
    )
    errors = _lines(capsys.readouterr().err)
    assert len(errors) == 1 and "nobody/nothing" in errors[0]


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "xcodec2_jax", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "encode" in result.stdout and "roundtrip" in result.stdout


def test_console_command_freezes_the_collector_and_main_does_not(small_ref, wav_dir, tmp_path):
    import gc

    frozen = gc.get_freeze_count()
    wav = str(wav_dir / "a.wav")
    assert main(["encode", wav, "-o", str(tmp_path / "in"), "--model", small_ref.path]) == 0
    assert gc.get_freeze_count() == frozen  # a program calling main keeps its collector as it was

    child = (
        "import gc, sys; from xcodec2_jax.cli import console_main; code = console_main(); "
        "print('frozen', gc.get_freeze_count() > 0); sys.exit(code)"
    )
    argv = ["encode", wav, "-o", str(tmp_path / "out"), "--model", small_ref.path]
    env = dict(os.environ, **{cache.ENV_VAR: "off"})
    result = subprocess.run(
        [sys.executable, "-c", child, *argv], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "frozen True" in result.stdout
    assert np.array_equal(np.load(tmp_path / "out" / "a.npy"), np.load(tmp_path / "in" / "a.npy"))


def test_cache_flags():
    parse = build_parser().parse_args
    args = parse(["encode", "a.wav", "-o", "out"])
    assert args.cache_dir is None and not args.no_cache
    assert parse(["encode", "a.wav", "-o", "out", "--cache-dir", "/tmp/c"]).cache_dir == "/tmp/c"
    assert parse(["decode", "a.npy", "-o", "out", "--no-cache"]).no_cache
    with pytest.raises(SystemExit):
        parse(["roundtrip", "a.wav", "b.wav", "--no-cache", "--cache-dir", "/tmp/c"])


def test_precision_flag(tmp_path, monkeypatch, capsys):
    import xcodec2_jax.inference.codec

    seen = []

    def stub(*args, **kwargs):  # records what the CLI asks for; loading nothing keeps the test fast
        seen.append(kwargs["precision"])
        raise OSError("stub")

    monkeypatch.setattr(xcodec2_jax.inference.codec.Xcodec2Codec, "from_pretrained", stub)
    wav = speech_files()[0]
    for flag in ([], ["--precision", "default"], ["--precision", "tensorfloat32"]):
        assert main(["encode", wav, "-o", str(tmp_path / "o"), *flag]) == 2
    assert seen == [None, "default", "tensorfloat32"]
    assert len(_lines(capsys.readouterr().err)) == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["encode", "a", "-o", "o", "--precision", "fast"])
