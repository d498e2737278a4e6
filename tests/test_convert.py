"""convert/: checkpoint -> Orbax, verified against PyTorch; Orbax params load back identically."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import pytest
from conftest import speech_files
from original_release import build_original, save_original

from convert.convert import main
from xcodec2_jax import Xcodec2Codec, load_params
from xcodec2_jax.checkpoint import CheckpointMismatchError, is_orbax_checkpoint, save_orbax


def _same_tree(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_convert_transformers_checkpoint_and_verify(small_ref, tmp_path, capsys):
    dst = tmp_path / "orbax"
    assert main([small_ref.path, str(dst), "--verify", speech_files()[0]]) == 0
    out = capsys.readouterr().out
    with capsys.disabled():
        print(out)
    assert "codes agreement 100.00%" in out
    assert is_orbax_checkpoint(dst) and (dst / "config.json").exists()

    start = time.perf_counter()
    restored = load_params(dst)
    orbax_s = time.perf_counter() - start
    start = time.perf_counter()
    converted = load_params(small_ref.path)
    safetensors_s = time.perf_counter() - start
    with capsys.disabled():
        print(f"load: Orbax {orbax_s:.2f} s, safetensors conversion {safetensors_s:.2f} s")
    assert _same_tree(restored, converted)

    # The codec loads the Orbax directory too, and refuses to clobber it.
    codec = Xcodec2Codec.from_pretrained(dst)
    assert codec.config == small_ref.config
    assert main([small_ref.path, str(dst)]) == 2
    assert "exists" in capsys.readouterr().err


def test_convert_original_checkpoint(tmp_path, capsys):
    model = build_original(seed=1)
    src = tmp_path / "original"
    src.mkdir()
    save_original(model, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(model.config.to_dict()))
    dst = tmp_path / "orbax"
    # The original small model has 4 decoder heads, which its weights cannot show; shapes still load.
    assert main([str(src), str(dst)]) == 0
    assert _same_tree(load_params(dst), load_params(str(src)))


def test_orbax_restore_is_strict_and_sharded(small_ref, tmp_path):
    params = small_ref.params
    dst = tmp_path / "ckpt"
    save_orbax(dst, params, small_ref.config)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = load_params(dst, sharding=sharding)
    leaf = jax.tree.leaves(restored)[0]
    assert isinstance(leaf, jax.Array) and leaf.sharding == sharding
    assert _same_tree(jax.tree.map(np.asarray, restored), params)

    bad = dict(params)
    bad["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
    save_orbax(tmp_path / "bad", bad, small_ref.config)
    with pytest.raises(CheckpointMismatchError, match="extra"):
        load_params(tmp_path / "bad")
    with pytest.raises(FileExistsError):
        save_orbax(dst, params, small_ref.config)
    assert os.path.isdir(dst / "params")
