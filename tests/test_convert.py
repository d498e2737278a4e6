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


def test_orbax_groups_bound_each_restore():
    from xcodec2_jax.checkpoint.orbax import _groups

    sizes = [5, 300, 40, 40, 90, 1]
    specs = {(f"p{i}",): jax.ShapeDtypeStruct((n,), np.float32) for i, n in enumerate(sizes)}
    groups = _groups(specs, 100 * 4)
    assert sorted(p for g in groups for p in g) == sorted(specs)  # each parameter exactly once
    sizes = [sum(specs[p].shape[0] for p in g) for g in groups]
    assert groups[0] == [("p1",)]  # biggest first, alone when over the limit
    assert all(s <= 100 for s in sizes[1:]) and len(groups) == 3


def test_orbax_restored_a_group_at_a_time(small_ref, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    import xcodec2_jax.checkpoint.orbax as orbax_checkpoint

    dst = tmp_path / "ckpt"
    save_orbax(dst, small_ref.params, small_ref.config)
    restored_bytes = []
    real = ocp.PyTreeCheckpointer.restore

    def counted(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        restored_bytes.append([x.nbytes for x in jax.tree.leaves(out)])
        return out

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", counted)
    limit = 64 << 10
    monkeypatch.setattr(orbax_checkpoint, "RESTORE_GROUP_BYTES", limit)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for placement in ({"sharding": sharding}, {}):
        restored_bytes.clear()
        restored = load_params(dst, **placement)
        assert len(restored_bytes) > 3
        # Every call restored one group: at most the limit, or a single larger array.
        assert all(sum(call) <= limit or len(call) == 1 for call in restored_bytes)
        assert sum(map(len, restored_bytes)) == len(jax.tree.leaves(small_ref.params))
        if placement:
            assert all(leaf.sharding == sharding for leaf in jax.tree.leaves(restored))
        assert _same_tree(jax.tree.map(np.asarray, restored), small_ref.params)
