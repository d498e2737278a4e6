"""The persistent compilation cache: a second process compiles nothing for the same bucket; off writes
nothing; a folder JAX is already configured with is kept.

Compilations are counted in each child process with ``jax.monitoring`` listeners: every backend
compile request (``/jax/core/compile/backend_compile_duration``, recorded for hits too) minus the
requests served from the cache (``/jax/compilation_cache/cache_hits``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf
from conftest import run_python

from xcodec2_jax.inference import compilation_cache as cache
from xcodec2_jax.inference.batching import length_bucket

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 300

# Runs in a fresh process: counts compilations around one CLI call (argv) or one Python-API encode.
CHILD = r"""
import json, sys
from jax import monitoring

counts = {"requests": 0, "hits": 0}

def on_event(name, **kwargs):
    if name == "/jax/compilation_cache/cache_hits":
        counts["hits"] += 1

def on_duration(name, secs, **kwargs):
    if name == "/jax/core/compile/backend_compile_duration":
        counts["requests"] += 1

monitoring.register_event_listener(on_event)
monitoring.register_event_duration_secs_listener(on_duration)
mode, args = sys.argv[1], sys.argv[2:]
if mode == "cli":
    from xcodec2_jax.cli import main

    counts["rc"] = main(args)
else:
    import soundfile as sf
    from xcodec2_jax import Xcodec2Codec

    codec = Xcodec2Codec.from_pretrained(args[0])
    audio, rate = sf.read(args[1], dtype="float32")
    codec.encode(audio, rate)
    counts["rc"] = 0
    counts["cache_dir"] = codec.compilation_cache_dir
counts["compiles"] = counts["requests"] - counts["hits"]
print("COUNTS " + json.dumps(counts))
"""


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (cache.ENV_VAR, "JAX_COMPILATION_CACHE_DIR")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **extra)
    return env


def _child(mode: str, args: list[str], env: dict) -> dict:
    counts = run_python(CHILD, [mode, *args], env, "COUNTS ", TIMEOUT_S)
    assert counts["rc"] == 0, counts
    return counts


def _files(folder) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}


def _entries(folder) -> set[str]:
    """JAX's executables (``<module>-<key>-cache``) at the folder's top level."""
    return {f for f in _files(folder) if os.sep not in f and f.endswith("-cache")}


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    """Two noise files of different lengths inside one length bucket (51 and 56 codes -> 56)."""
    folder = tmp_path_factory.mktemp("wavs")
    rng = np.random.default_rng(0)
    paths = []
    for name, n in (("a.wav", 16000), ("b.wav", 17600)):
        sf.write(folder / name, (0.1 * rng.standard_normal(n)).astype(np.float32), 16000)
        paths.append(str(folder / name))
    assert length_bucket(-(-(16000 + 1) // 320)) == length_bucket(-(-(17600 + 1) // 320))
    return paths


@pytest.mark.subprocess
@pytest.mark.slow
def test_second_process_compiles_nothing_for_the_same_bucket(small_ref, wavs, tmp_path):
    env = _env(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    folder = tmp_path / "xdg" / "xcodec2_jax" / "jax"  # the per-user default, no flag or variable set
    model = ["--model", small_ref.path]

    first = _child("cli", ["encode", wavs[0], "-o", str(tmp_path / "o1"), *model], env)
    assert first["compiles"] > 0 and first["hits"] == 0
    written = _files(folder)
    assert len(_entries(folder)) == first["compiles"], written

    second = _child("cli", ["encode", wavs[1], "-o", str(tmp_path / "o2"), *model], env)
    assert second["compiles"] == 0, second
    assert second["hits"] == first["compiles"]
    assert _files(folder) == written

    # What the cached executables compute is what a fresh compilation computes.
    third = _child("cli", ["encode", wavs[1], "-o", str(tmp_path / "o3"), *model, "--no-cache"], env)
    assert third["hits"] == 0 and third["compiles"] == first["compiles"]
    np.testing.assert_array_equal(np.load(tmp_path / "o2" / "b.npy"), np.load(tmp_path / "o3" / "b.npy"))
    assert _files(folder) == written


@pytest.mark.subprocess
@pytest.mark.slow
def test_off_switches_write_nothing(small_ref, wavs, tmp_path):
    xdg = tmp_path / "xdg"
    flag = _child(
        "cli",
        ["encode", wavs[0], "-o", str(tmp_path / "o"), "--model", small_ref.path, "--no-cache"],
        _env(XDG_CACHE_HOME=str(xdg)),
    )
    assert flag["compiles"] > 0 and flag["hits"] == 0
    variable = _child(
        "api", [small_ref.path, wavs[0]], _env(XDG_CACHE_HOME=str(xdg), XCODEC2_JAX_CACHE_DIR="off")
    )
    assert variable["cache_dir"] is None and variable["compiles"] > 0 and variable["hits"] == 0
    assert not xdg.exists()


@pytest.mark.subprocess
@pytest.mark.slow
def test_cache_dir_flag_and_variable(small_ref, wavs, tmp_path):
    """--cache-dir, then the variable naming the same folder from the Python API: a hit."""
    xdg, folder = tmp_path / "xdg", tmp_path / "mine"
    first = _child(
        "cli",
        ["encode", wavs[0], "-o", str(tmp_path / "o"), "--model", small_ref.path, "--cache-dir", str(folder)],
        _env(XDG_CACHE_HOME=str(xdg)),
    )
    assert first["compiles"] > 0 and len(_entries(folder)) == first["compiles"]
    second = _child(
        "api", [small_ref.path, wavs[1]], _env(XDG_CACHE_HOME=str(xdg), XCODEC2_JAX_CACHE_DIR=str(folder))
    )
    assert second["cache_dir"] == str(folder) and second["compiles"] == 0
    assert not xdg.exists()


JAX_CONFIGURED = r"""
import json, sys, warnings
import jax
from xcodec2_jax.inference.compilation_cache import enable_compilation_cache

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    used = enable_compilation_cache(sys.argv[1] if len(sys.argv) > 1 else None)
jax.jit(lambda x: x * 2 + 1)(1.0).block_until_ready()
threshold = jax.config.jax_persistent_cache_min_compile_time_secs
warning = f"{len(caught)} {caught[0].message if caught else ''}"
print("RESULT " + json.dumps({"threshold": threshold, "used": used, "warning": warning}))
"""


@pytest.mark.subprocess
def test_a_folder_jax_is_configured_with_is_kept(tmp_path):
    jax_dir, xdg = tmp_path / "jax", tmp_path / "xdg"
    env = _env(JAX_COMPILATION_CACHE_DIR=str(jax_dir), XDG_CACHE_HOME=str(xdg))
    for args, warned in (([], 0), ([str(tmp_path / "asked")], 1)):
        result = run_python(JAX_CONFIGURED, args, env, "RESULT ", TIMEOUT_S)
        threshold, used, warning = result["threshold"], result["used"], result["warning"]
        assert used == str(jax_dir)
        assert float(threshold) == 1.0  # JAX's own, left alone in a folder that is not ours
        assert warning.startswith(f"{warned} ") and (not warned or "keeping it" in warning)
    assert not xdg.exists() and not (tmp_path / "asked").exists()


def test_resolve_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.resolve_cache_dir() == str(tmp_path / "xdg" / "xcodec2_jax" / "jax")
    assert cache.resolve_cache_dir(True) == cache.resolve_cache_dir(None)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.default_cache_dir() == str(tmp_path / "home" / ".cache" / "xcodec2_jax" / "jax")
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "env"))
    assert cache.resolve_cache_dir() == str(tmp_path / "env")
    assert cache.resolve_cache_dir(tmp_path / "arg") == str(tmp_path / "arg")
    for off in ("off", "OFF", "0", "false", "none"):
        monkeypatch.setenv(cache.ENV_VAR, off)
        assert cache.resolve_cache_dir() is None
    assert cache.resolve_cache_dir(False) is None and cache.resolve_cache_dir("off") is None
    for bad in (3, "", 1.5):
        with pytest.raises(ValueError, match="compilation_cache must be"):
            cache.resolve_cache_dir(bad)
