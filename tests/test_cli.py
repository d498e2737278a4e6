"""The command line in process: argument errors and the params cache command (the commands that
run the model, in subprocesses, are in integration/test_cli_runs.py)."""

from __future__ import annotations

import numpy as np
import pytest

from xcodec2_jax.checkpoint import prepared
from xcodec2_jax.cli import main


def _entry(params_dir, tmp_path, name: str) -> str:
    source = tmp_path / f"{name}.bin"
    source.write_bytes(b"\0" * 4096)
    key, sources = prepared.entry_key([str(source)], f"config-{name}", None)
    params = {"m": {"w": np.arange(16, dtype=np.float32)}}
    assert prepared.prepare(str(params_dir), key, sources, lambda file: params, max_bytes=1 << 30) is not None
    return key


def test_cache_list_and_clear(tmp_path, capsys):
    cache = tmp_path / "cache"
    params_dir = cache / prepared.PARAMS_DIR
    first, second = _entry(params_dir, tmp_path, "a"), _entry(params_dir, tmp_path, "b")
    assert main(["cache", "list", "--cache-dir", str(cache)]) == 0
    listing = capsys.readouterr().out
    assert first in listing and second in listing and str(tmp_path) in listing
    assert main(["cache", "clear", "--cache-dir", str(cache), first]) == 0
    assert [e.key for e in prepared.entries(str(params_dir))] == [second]
    assert main(["cache", "clear", "--cache-dir", str(cache), "nosuchkey"]) == 2
    assert "no params cache entry 'nosuchkey'" in capsys.readouterr().err
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert prepared.entries(str(params_dir)) == []


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_params_cache_limit_must_be_a_size(tmp_path, capsys, value):
    code = main(["encode", str(tmp_path / "x.wav"), "-o", str(tmp_path), "--params-cache-max-gb", value])
    assert code == 2
    assert "--params-cache-max-gb" in capsys.readouterr().err
