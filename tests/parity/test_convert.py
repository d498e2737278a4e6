"""convert/: checkpoint -> Orbax, verified against PyTorch; Orbax params load back identically."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import pytest
from conftest import run_python, speech_files
from original_release import build_original, save_original

from convert.convert import main
from xcodec2_jax import Xcodec2Codec, load_params
from xcodec2_jax.checkpoint import CheckpointMismatchError, is_orbax_checkpoint, save_orbax


def _same_tree(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.slow
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


_SHARDED_CHILD = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, orbax.checkpoint as ocp
import xcodec2_jax.checkpoint.orbax as orbax_checkpoint
from xcodec2_jax import load_params
assert jax.device_count() == 4, jax.devices()
calls = []
real = ocp.PyTreeCheckpointer.restore
def counted(self, *args, **kwargs):
    out = real(self, *args, **kwargs)
    calls.append([x.nbytes for x in jax.tree.leaves(out)])
    return out
ocp.PyTreeCheckpointer.restore = counted
limit = orbax_checkpoint.RESTORE_GROUP_BYTES = 64 << 10
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
out = {}
for dtype in (None, jnp.bfloat16):
    calls.clear()
    sharded = load_params(sys.argv[1], sharding=replicated, dtype=dtype)
    grouped = list(calls)
    calls.clear()
    whole = load_params(sys.argv[1], device=jax.devices()[0], dtype=dtype)
    out[str(dtype)] = dict(
        calls=len(grouped), leaves=sum(map(len, grouped)),
        bounded=all(sum(c) <= limit or len(c) == 1 for c in grouped),
        whole_calls=len(calls),
        shardings=sorted({f"{x.sharding.spec}{len(x.devices())}" for x in jax.tree.leaves(sharded)}),
        equal=jax.tree.structure(sharded) == jax.tree.structure(whole) and all(
            a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(whole))),
        dtypes=sorted({str(x.dtype) for x in jax.tree.leaves(sharded)}),
    )
print("RESULT" + json.dumps(out))
"""


@pytest.mark.subprocess
@pytest.mark.slow
def test_orbax_over_several_devices_restored_a_group_at_a_time(small_ref, tmp_path):
    """Over several devices Orbax reads each device's part, a group of arrays per call; to one device
    the arrays are read whole, without Orbax's restore; both give the same params, cast alike."""
    dst = tmp_path / "ckpt"
    save_orbax(dst, small_ref.params, small_ref.config)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    res = run_python(_SHARDED_CHILD, [str(dst)], env, "RESULT")
    leaves = len(jax.tree.leaves(small_ref.params))
    for dtype, r in res.items():
        assert r["calls"] > 3 and r["bounded"] and r["leaves"] == leaves, (dtype, r)
        assert r["whole_calls"] == 0, (dtype, r)
        assert r["shardings"] == ["P()4"], (dtype, r)
        assert r["equal"], (dtype, r)
    assert res["None"]["dtypes"] == ["float32"]
    assert res["<class 'jax.numpy.bfloat16'>"]["dtypes"] == ["bfloat16", "float32"]


def test_orbax_read_whole_into_the_loaders_buffers(small_ref, tmp_path, monkeypatch):
    """To the host or one device, each stored array is read by tensorstore straight into its
    parameter's buffer (no Orbax restore); the result equals the transformers checkpoint's load, for
    every placement, dtype and module subset, and a CPU device adopts the host buffers."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    import xcodec2_jax.checkpoint.orbax as orbax_checkpoint
    from xcodec2_jax.modeling.layout import ENCODE_MODULES

    dst = tmp_path / "ckpt"
    save_orbax(dst, small_ref.params, small_ref.config)
    # Larger arrays are read in slices of rows (of at most this many bytes), smaller ones whole.
    monkeypatch.setattr(orbax_checkpoint, "READ_SLICE_BYTES", 4 << 10)

    def refused(*args, **kwargs):
        raise AssertionError("Orbax's restore called")

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", refused)
    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", refused)
    device = jax.devices()[0]
    cases = [{}, {"device": device}, {"sharding": jax.sharding.SingleDeviceSharding(device)}]
    cases += [{"dtype": jnp.bfloat16}, {"device": device, "modules": ENCODE_MODULES}]
    for kwargs in cases:
        ours = load_params(dst, **kwargs)
        reference = load_params(small_ref.path, **kwargs)
        assert _same_tree(jax.tree.map(np.asarray, ours), jax.tree.map(np.asarray, reference)), kwargs
        leaves = jax.tree.leaves(ours)
        if "device" in kwargs or "sharding" in kwargs:
            assert all(isinstance(x, jax.Array) and x.devices() == {device} for x in leaves), kwargs
        else:
            assert all(isinstance(x, np.ndarray) for x in leaves), kwargs
    # Host arrays: 64-byte-aligned views of one buffer; a CPU device adopts each without a copy.
    host = [x for x in jax.tree.leaves(load_params(dst)) if x.size]
    start = min(x.ctypes.data for x in host)
    assert all(x.ctypes.data % 64 == 0 for x in host)
    assert max(x.ctypes.data + x.nbytes for x in host) - start < sum(x.nbytes + 64 for x in host)
    adopted = []
    real_put = jax.device_put

    def put(x, *args, **kwargs):
        out = real_put(x, *args, **kwargs)
        adopted.append(out.unsafe_buffer_pointer() == x.ctypes.data)
        return out

    monkeypatch.setattr(jax, "device_put", put)
    load_params(dst, device=device)
    assert len(adopted) == len(jax.tree.leaves(small_ref.params)) and all(adopted)
