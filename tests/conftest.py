"""Shared fixtures: reference PyTorch models with random weights, saved and reloaded for real.

The hub is out of reach, so reference checkpoints are transformers' ``Xcodec2Model`` with random
weights written by ``save_pretrained``; our ``load_params`` reads them back. The default init gives
near-constant FSQ codes (which would make code comparisons vacuous), so weights are rescaled to
spread them: ``project_in`` ×50, SnakeBeta alpha/beta from U(-0.5, 0.5), and every norm's affine
parameters perturbed so a wrong norm path cannot hide behind ones and zeros.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile

import numpy as np
import pytest

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")

# Codecs built with the default cache settings keep their compilations and traced programs in a
# folder of this test session (inherited by the CLI subprocesses), never in the user's ~/.cache;
# the folder is made when the session starts (not when this file is imported: benchmarks import its
# helpers) and removed when it ends.
_SESSION_CACHE = None


def pytest_configure(config):
    global _SESSION_CACHE
    if "XCODEC2_JAX_CACHE_DIR" not in os.environ:
        _SESSION_CACHE = tempfile.mkdtemp(prefix="xcodec2-jax-test-cache-")
        os.environ["XCODEC2_JAX_CACHE_DIR"] = _SESSION_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
        os.environ.pop("XCODEC2_JAX_CACHE_DIR", None)


@pytest.fixture(scope="module", autouse=True)
def _release_module_memory(request):
    """What a test module compiled and built goes with it: JAX's in-memory caches of compiled
    programs (full-size ones hold hundreds of MB), the module's garbage, and the freed heap. A module
    with ``KEEP_TRACED = True`` leaves its (small) traced programs to the next module, which reuses them."""
    yield
    import gc

    import jax

    from xcodec2_jax.utils.compat.libc import malloc_trim

    if not getattr(request.module, "KEEP_TRACED", False):
        jax.clear_caches()
    gc.collect()
    malloc_trim()


@pytest.fixture(scope="session", autouse=True)
def _remove_temporary_files(tmp_path_factory):
    """Every test's temporary folder goes when the session ends: the suite leaves nothing behind."""
    yield
    base = tmp_path_factory.getbasetemp()
    shutil.rmtree(base, ignore_errors=True)
    current = base.parent / f"{base.name.rsplit('-', 1)[0]}-current"
    if current.is_symlink() and os.path.realpath(current) == str(base):
        current.unlink()
    try:
        base.parent.rmdir()  # pytest's per-user folder, if no other session left anything there
    except OSError:
        pass


# Markers follow from what a test uses, so that no test can forget one: `slow` for full-size models
# and everything under integration/, `subprocess` for child processes, `torch` for a PyTorch reference.
_TORCH_FIXTURES = {"small_ref", "full_ref", "original_small", "original_ref", "tiny_ref"}
_SLOW_FIXTURES = {"full_ref"}


def pytest_collection_modifyitems(config, items):
    # The full-size checks first, while the process's heap is small: its peak memory is the suite's.
    items.sort(key=lambda item: item.fspath.basename != "test_full_size.py")
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        # Parametrized over fixture names (request.getfixturevalue): the name is in the test's id.
        callspec = getattr(item, "callspec", None)
        fixtures |= {name for name in _TORCH_FIXTURES if callspec is not None and name in callspec.id}
        path = str(item.fspath)
        if fixtures & _SLOW_FIXTURES or f"{os.sep}integration{os.sep}" in path:
            item.add_marker(pytest.mark.slow)
        if f"{os.sep}integration{os.sep}" in path:
            item.add_marker(pytest.mark.subprocess)
        if fixtures & _TORCH_FIXTURES or f"{os.sep}parity{os.sep}" in path:
            item.add_marker(pytest.mark.torch)


# A small config with odd sizes: 3 decoder layers, levels (5, 5, 5, 4) (odd half widths), a 5-layer
# conformer with a short relative-position window, hop 320 so the semantic and acoustic frame rates
# agree as the model requires.
SMALL_CONFIG = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    encoder_hidden_size=16,
    downsampling_ratios=[4, 8, 10],
    quantization_dim=64 + 48,
    quantization_levels=[5, 5, 5, 4],
    semantic_model_config=dict(
        model_type="wav2vec2-bert",
        hidden_size=48,
        num_hidden_layers=5,
        num_attention_heads=4,
        intermediate_size=80,
        left_max_position_embeddings=6,
        right_max_position_embeddings=3,
        conv_depthwise_kernel_size=7,
    ),
)


# SMALL_CONFIG with one conformer and one decoder layer: a train step compiles in half the time.
TINY_CONFIG = dict(
    SMALL_CONFIG,
    num_hidden_layers=1,
    semantic_model_config=dict(SMALL_CONFIG["semantic_model_config"], num_hidden_layers=1),
)

# X-Codec2's recipe with narrow discriminators (X-Codec-2.0's are 16 and 32 wide) and a learning rate of
# 1e-3 throughout (the warm-up rises from 1e-3 to 1e-3): the step compiles and runs in a fraction of the
# time with every loss of the recipe. The training tests share it, and so share one compiled step. No
# dropout: the step is compared with transformers' decoder, which has none (the devices test has it).
QUICK_RECIPE = dict(
    mpd_channels=4, spec_channels=8, learning_rate=1e-3, initial_learning_rate=1e-3, dropout=0.0
)


def spread_weights_(model, seed: int = 0) -> None:
    """Rescale a random transformers Xcodec2Model in place so its codes spread (see module doc).

    Calibrated on test speech: the acoustic and semantic branches are scaled to unit spread (the
    default init leaves the acoustic branch ~1e-4, too small to move any code), and ``project_in``
    is standardised per FSQ dimension so every level is used.
    """
    import torch

    from xcodec2_jax import Xcodec2FeatureExtractor

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".alpha", ".beta")):
                p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
            elif "norm" in name.split(".")[-2] and name.endswith(".weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name.split(".")[-2] and name.endswith(".bias"):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))

        audio = load_speech()[0][:48000]
        feats = {
            k: torch.from_numpy(v) for k, v in Xcodec2FeatureExtractor()(audio, sampling_rate=16000).items()
        }
        acoustic = model.acoustic_encoder(feats["input_values"])
        model.acoustic_encoder.conv2.weight.div_(acoustic.std())
        model.acoustic_encoder.conv2.bias.div_(acoustic.std())
        semantic = model.semantic_encoder(feats["input_features"]).last_hidden_state.transpose(1, 2)
        model.semantic_adapter.conv4.weight.div_(model.semantic_adapter(semantic).std())
        fused = torch.cat(
            [model.semantic_adapter(semantic), model.acoustic_encoder(feats["input_values"])], 1
        )
        z = model.quantizer.project_in(model.fc_encoder(fused.transpose(1, 2)))
        mean, std = z.mean(dim=(0, 1)), z.std(dim=(0, 1))
        proj = model.quantizer.project_in
        proj.weight.div_(std[:, None])
        proj.bias.sub_(mean).div_(std)


def build_reference(config_kwargs: dict | None = None, seed: int = 0):
    import torch
    from transformers import Xcodec2Config as TorchConfig
    from transformers import Xcodec2Model as TorchModel

    torch.manual_seed(seed)
    model = TorchModel(TorchConfig(**(config_kwargs or {}))).eval()
    spread_weights_(model, seed)
    return model


class Reference:
    """A reference torch model and the directory its ``save_pretrained`` checkpoint lives in."""

    def __init__(self, model, path: str):
        self.model = model
        self.path = path
        self._params = None

    @property
    def config(self):
        from xcodec2_jax.config import Xcodec2Config

        return Xcodec2Config.from_pretrained(self.path)

    @property
    def params(self):
        if self._params is None:
            from xcodec2_jax import load_params

            self._params = load_params(self.path)
        return self._params


def _make_reference(tmp_path_factory, name: str, config_kwargs) -> Reference:
    model = build_reference(config_kwargs)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    return Reference(model, path)


@pytest.fixture(scope="session")
def small_ref(tmp_path_factory) -> Reference:
    return _make_reference(tmp_path_factory, "small", SMALL_CONFIG)


@pytest.fixture(scope="module")
def full_ref(tmp_path_factory) -> Reference:
    """The full-size reference (2.5 GB of weights): built per test module and released with it, so
    that the suite never holds two at once."""
    ref = _make_reference(tmp_path_factory, "full", None)
    yield ref
    shutil.rmtree(ref.path, ignore_errors=True)


def speech_files() -> list[str]:
    return sorted(glob.glob(os.path.join(DATA_DIR, "*.wav")))


def load_speech() -> list[np.ndarray]:
    import soundfile as sf

    out = []
    for f in speech_files():
        audio, sr = sf.read(f, dtype="float32")
        assert sr == 16000, f
        out.append(audio)
    return out


def rel_err(ours, ref) -> tuple[float, float]:
    """(max abs error, max abs error / peak of the reference)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    err = float(np.abs(ours - ref).max())
    return err, err / float(np.abs(ref).max())


def module_params(state, target, **kwargs):
    """``convert_state_dict`` for a sub-module's parameter tree ``target`` (e.g. from ``eval_shape``
    of its ``init``), whose scanned layers are stacked under a ``layers`` node.

    The state dict keeps one entry per layer (``layers.3.x``): the target is unstacked to match
    (each stacked leaf of leading size n becomes ``layers_0 .. layers_{n-1}``), converted strictly,
    and the result restacked.
    """
    import jax

    from xcodec2_jax.checkpoint import convert_state_dict
    from xcodec2_jax.utils.tree import flatten as _flatten
    from xcodec2_jax.utils.tree import unflatten as _unflatten

    per_layer, stacks = {}, {}
    for path, leaf in _flatten(target).items():
        if "layers" not in path:
            per_layer[path] = leaf
            continue
        i = path.index("layers")
        stacks[path] = leaf.shape[0]
        for n in range(leaf.shape[0]):
            per_layer[path[:i] + (f"layers_{n}",) + path[i + 1 :]] = jax.ShapeDtypeStruct(
                leaf.shape[1:], leaf.dtype
            )
    flat = convert_state_dict(state, per_layer, **kwargs)
    out = {}
    for path, value in flat.items():
        layer = next((p for p in path if p.startswith("layers_") and p[7:].isdigit()), None)
        if layer is None:
            out[path] = value
    for path, count in stacks.items():
        i = path.index("layers")
        out[path] = np.stack([flat[path[:i] + (f"layers_{n}",) + path[i + 1 :]] for n in range(count)])
    return _unflatten(out)


def run_python(code: str, args: list[str], env: dict, marker: str, timeout: float = 300) -> dict:
    """Run ``code`` in a fresh interpreter (bounded by ``timeout``) and return the JSON it printed
    on its last line starting with ``marker``; a non-zero exit fails with the child's stderr."""
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [s for s in result.stdout.splitlines() if s.startswith(marker)][-1]
    return json.loads(line.removeprefix(marker))
