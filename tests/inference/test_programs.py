"""Traced programs kept beside the compilation cache: a second process with the same cache folder does
not trace the model again, and gets the same codes; with the cache off nothing is kept."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf
from conftest import run_python

from xcodec2_jax.inference import compilation_cache as cache
from xcodec2_jax.inference import programs
from xcodec2_jax.utils.compat import jax_monitoring

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 300

# Counts how often the model's encode and decode are traced around one encode + decode.
CHILD = r"""
import json, sys
import soundfile as sf
from xcodec2_jax import Xcodec2Codec
from xcodec2_jax.modeling.model import Xcodec2Model

cache_setting = None if sys.argv[3] == "default" else False
codec = Xcodec2Codec.from_pretrained(sys.argv[1], compilation_cache=cache_setting)
# Counted from here: loading traces the model once for its parameter shapes.
traces = {"encode": 0, "decode": 0}
for name in traces:
    wrapped = getattr(Xcodec2Model, name)

    def counting(self, *args, _name=name, _wrapped=wrapped, **kwargs):
        traces[_name] += 1
        return _wrapped(self, *args, **kwargs)

    setattr(Xcodec2Model, name, counting)
audio, rate = sf.read(sys.argv[2], dtype="float32")
encoded = codec.encode(audio, rate)
audio_out = codec.decode(encoded)[0]
encoded_again = codec.encode(audio[: len(audio) - 5], rate)  # the same bucket: no new program
assert codec.programs.encode.num_compiled() == 1, codec.programs.encode.num_compiled()
result = {"traces": traces, "codes": encoded[0].tolist(), "peak": float(abs(audio_out).max())}
print("RESULT " + json.dumps({**result, "cache_dir": codec.compilation_cache_dir}))
"""


def _run(checkpoint, wav, env, setting="default") -> dict:
    return run_python(CHILD, [checkpoint, wav, setting], env, "RESULT ", TIMEOUT_S)


@pytest.fixture
def wav(tmp_path):
    path = str(tmp_path / "speech.wav")
    rng = np.random.default_rng(0)
    sf.write(path, (0.1 * rng.standard_normal(7000)).astype(np.float32), 16000, subtype="FLOAT")
    return path


def _env(cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update({cache.ENV_VAR: cache_dir, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
    return env


@pytest.mark.subprocess
@pytest.mark.slow
def test_second_process_traces_nothing(small_ref, wav, tmp_path):
    env = _env(str(tmp_path / "cache"))
    first = _run(small_ref.path, wav, env)
    assert first["traces"] == {"encode": 1, "decode": 1}
    kept = os.listdir(programs.programs_dir(first["cache_dir"]))
    assert sorted(name.split("-")[0] for name in kept) == ["decode", "encode"]
    second = _run(small_ref.path, wav, env)
    assert second["traces"] == {"encode": 0, "decode": 0}
    assert second["codes"] == first["codes"] and second["peak"] == first["peak"]
    assert len(set(first["codes"])) > 1  # codes that can tell a wrong program from a right one


@pytest.mark.subprocess
@pytest.mark.slow
def test_unreadable_program_is_traced_again(small_ref, wav, tmp_path):
    env = _env(str(tmp_path / "cache"))
    first = _run(small_ref.path, wav, env)
    folder = programs.programs_dir(first["cache_dir"])
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"not a program")
    again = _run(small_ref.path, wav, env)
    assert again["traces"] == {"encode": 1, "decode": 1} and again["codes"] == first["codes"]


@pytest.mark.subprocess
@pytest.mark.slow
def test_cache_off_keeps_nothing(small_ref, wav, tmp_path):
    env = _env(str(tmp_path / "cache"))
    out = _run(small_ref.path, wav, env, setting="off")
    assert out["cache_dir"] is None and out["traces"] == {"encode": 1, "decode": 1}
    assert not os.path.exists(tmp_path / "cache")


@pytest.mark.parametrize("kept", [True, False])
def test_heap_handed_back_after_compiling_a_program(tmp_path, monkeypatch, kept):
    """A compilation of a cached_jit program (programs kept or not) is followed by malloc_trim;
    calling a compiled one, and compiling a function that is not ours, are not."""
    import jax
    import jax.numpy as jnp

    trims = []
    monkeypatch.setattr(programs, "malloc_trim", lambda: trims.append(0))
    f = programs.CachedProgram(
        lambda x: jnp.sin(x) * 2, "test", "heap", str(tmp_path / "programs") if kept else None
    )
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(f(x)), np.sin(x) * 2, rtol=1e-6)
    assert trims == [0]
    f(x + 1)  # compiled already
    assert trims == [0]
    jax.jit(lambda x: jnp.cos(x) + 3)(x)  # someone else's compilation
    assert trims == [0]
    f(np.ones(7, np.float32))  # a new signature: compiled, trimmed
    assert trims == [0, 0]


def _compilations() -> list:
    """Backend compilations (and compilation-cache loads) recorded from now on, by JAX's own event
    (the listener stays registered: it only appends to this list)."""
    import jax

    seen = []

    def record(event, duration, **kwargs):
        if event == jax_monitoring.backend_compile_event():
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(record)
    return seen


@pytest.mark.parametrize("kept", [True, False])
def test_precompiled_program_runs_without_compiling(tmp_path, monkeypatch, kept):
    """precompile (here on another thread, as from_pretrained does it) compiles the program for the
    specs; the first call with such arguments then compiles nothing and gives the jitted result."""
    import threading

    import jax
    import jax.numpy as jnp

    trims = []
    monkeypatch.setattr(programs, "malloc_trim", lambda: trims.append(0))
    w, b = np.eye(4, dtype=np.float32) * 2, np.ones(4, np.float32)
    params = {"w": jax.device_put(w), "b": jax.device_put(b)}
    fn = lambda p, x: jnp.tanh(x @ p["w"]) + p["b"]  # noqa: E731
    f = programs.CachedProgram(fn, "test", f"ahead-{kept}", str(tmp_path / "programs") if kept else None)
    seen = _compilations()
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    specs = (
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params),
        jax.ShapeDtypeStruct(x.shape, x.dtype),
    )
    worker = threading.Thread(target=f.precompile, args=specs)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert len(seen) == 1 and trims == [0]  # compiled on that thread, and trimmed there
    out = np.asarray(f(params, x))
    assert len(seen) == 1  # the call compiled nothing
    np.testing.assert_allclose(out, np.asarray(jax.jit(fn)(params, x)), rtol=1e-6)
    assert len(seen) == 2  # (the reference jit compiles: the counter works)
    f.precompile(*specs)  # already there: nothing to do
    assert len(seen) == 2 and f.num_compiled() == 1


@pytest.mark.parametrize("kept", [True, False])
def test_call_during_precompile_waits_instead_of_compiling_again(tmp_path, monkeypatch, kept):
    """A call made while precompile is compiling its signature (on another thread) waits for that
    compilation and uses it: one compilation in all, not one per thread."""
    import threading

    import jax
    import jax.numpy as jnp

    compiling, release = threading.Event(), threading.Event()
    compile_lowered = jax.stages.Lowered.compile

    def held_compile(self, *args, **kwargs):
        compiling.set()
        assert release.wait(60)
        return compile_lowered(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", held_compile)
    f = programs.CachedProgram(
        lambda x: jnp.cos(x) * 3, "test", f"race-{kept}", str(tmp_path / "programs") if kept else None
    )
    seen = _compilations()
    x = np.arange(6, dtype=np.float32)
    ahead = threading.Thread(target=f.precompile, args=(jax.ShapeDtypeStruct(x.shape, x.dtype),))
    ahead.start()
    assert compiling.wait(60)
    out = []
    caller = threading.Thread(target=lambda: out.append(np.asarray(f(x))))
    caller.start()
    caller.join(timeout=1.0)
    assert caller.is_alive()  # waiting for the compilation in flight
    release.set()
    ahead.join(timeout=120)
    caller.join(timeout=120)
    assert not ahead.is_alive() and not caller.is_alive()
    np.testing.assert_allclose(out[0], np.cos(x) * 3, rtol=1e-6)
    assert len(seen) == 1 and f.num_compiled() == 1


@pytest.mark.subprocess
def test_precompiled_program_falls_back_when_placed_elsewhere(tmp_path):
    """Arguments on another device than the specs said: the jitted program runs instead."""
    code = r"""
import json, sys
import numpy as np, jax, jax.numpy as jnp
from xcodec2_jax.inference import programs
from xcodec2_jax.utils.compat import jax_monitoring
f = programs.CachedProgram(lambda x: x * 3 + 1, "test", "elsewhere", sys.argv[1])
d0, d1 = jax.devices()[:2]
spec = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(d1))
f.precompile(spec)
x = jax.device_put(np.arange(4, dtype=np.float32), d0)
out = f(x)
print("RESULT " + json.dumps({"out": np.asarray(out).tolist(), "again": np.asarray(f(x)).tolist()}))
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = REPO
    result = run_python(code, [str(tmp_path / "programs")], env, "RESULT ", TIMEOUT_S)
    assert result["out"] == result["again"] == [1.0, 4.0, 7.0, 10.0]


@pytest.mark.subprocess
@pytest.mark.slow
def test_read_back_program_skips_lapack_init_only_when_it_calls_none(tmp_path):
    """Lowering a read-back program whose module calls no LAPACK kernel does not import scipy (JAX
    initializes its CPU LAPACK kernels from scipy.linalg for any exported call); one that does call
    LAPACK (a Cholesky factorization) still gets its kernels and the right result, in a fresh
    process that has not initialized them otherwise."""
    code = r"""
import json, sys
import numpy as np, jax, jax.numpy as jnp
from xcodec2_jax.inference import programs
from xcodec2_jax.utils.compat import jax_monitoring
kind = sys.argv[2]
if kind == "plain":
    fn = lambda x: jnp.tanh(x) * 2
else:
    fn = lambda x: jnp.linalg.cholesky(x @ x.T + 4 * jnp.eye(3))
f = programs.CachedProgram(fn, "test", kind, sys.argv[1])
x = np.arange(9, dtype=np.float32).reshape(3, 3) / 10
out = np.asarray(f(x))
print("RESULT " + json.dumps({"out": out.tolist(), "scipy": "scipy.linalg" in sys.modules}))
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    folder = str(tmp_path / "programs")
    x = np.arange(9, dtype=np.float32).reshape(3, 3) / 10
    cases = [("plain", np.tanh(x) * 2), ("lapack", np.linalg.cholesky(x @ x.T + 4 * np.eye(3)))]
    for kind, expected in cases:
        first = run_python(code, [folder, kind], env, "RESULT ", TIMEOUT_S)  # traced and kept
        again = run_python(code, [folder, kind], env, "RESULT ", TIMEOUT_S)  # read back
        for result in (first, again):
            np.testing.assert_allclose(np.asarray(result["out"]), expected, rtol=1e-5, atol=1e-6)
        assert again["scipy"] is (kind == "lapack")
