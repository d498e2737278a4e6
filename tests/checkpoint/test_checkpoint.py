"""The checkpoint package on transformers-format files: header, strict mapping, stacking, placement."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from xcodec2_jax import load_params
from xcodec2_jax.checkpoint import CheckpointMismatchError, path_to_torch_key, torch_key_to_path
from xcodec2_jax.modeling.layout import checkpoint_shapes, unstack_layers
from xcodec2_jax.modeling.model import abstract_params


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _copy_checkpoint(src, dst, mutate):
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), dst)
    state = load_file(os.path.join(src, "model.safetensors"))
    mutate(state)
    save_file(state, os.path.join(dst, "model.safetensors"))
    return dst


def test_key_paths_round_trip():
    for key in [
        "acoustic_decoder.layers.3.self_attn.q_proj.weight",
        "acoustic_encoder.block.0.res_unit1.snake1.act.alpha",
        "semantic_encoder.encoder.layers.15.conv_module.depthwise_conv.weight",
    ]:
        assert path_to_torch_key(torch_key_to_path(key)) == key
    assert torch_key_to_path("a.layers.3.b.weight") == ("a", "layers_3", "b", "weight")


@pytest.mark.parametrize("which", ["small_ref"])  # full_ref: parity/test_full_size.py
def test_every_key_used_and_every_leaf_filled(which, request):
    ref = request.getfixturevalue(which)
    params = load_params(ref.path)
    expected = dict(_flat(abstract_params(ref.config)))
    got = dict(_flat(params))
    assert set(got) == set(expected)
    for path, leaf in expected.items():
        assert got[path].shape == tuple(leaf.shape), path
        assert got[path].dtype == leaf.dtype, path
    # Every persistent tensor of the reference lands on exactly one parameter (or layer of a stacked
    # one), with its value, in the Flax layout (masked_spec_embed is training-only).
    # Read one tensor at a time: the full model's state is 2.5 GB beside its params.
    state = safe_open(os.path.join(ref.path, "model.safetensors"), framework="numpy")
    keys = set(state.keys()) - {"semantic_encoder.masked_spec_embed"}
    per_layer = unstack_layers(params, ref.config)
    assert per_layer.keys() == checkpoint_shapes(ref.config).keys()
    assert len(per_layer) == len(keys)
    by_key = {path_to_torch_key(p): v for p, v in per_layer.items()}
    assert by_key.keys() == keys
    for key in sorted(keys):
        value = state.get_tensor(key)
        if value.ndim == 2 and "distance_embedding" not in key:
            value = value.T  # Linear (out, in) -> (in, out)
        elif value.ndim == 3:
            value = value.transpose(2, 1, 0)  # Conv1d (out, in, k) -> (k, in, out)
        np.testing.assert_array_equal(np.asarray(by_key[key]), value, err_msg=key)


def test_extra_missing_and_wrong_shape_are_all_listed(small_ref, tmp_path):
    def mutate(state):
        state["acoustic_decoder.extra.weight"] = np.zeros((3,), np.float32)
        del state["acoustic_decoder.norm.bias"]
        state["quantizer.project_out.weight"] = np.zeros((7, 4), np.float32)

    bad = _copy_checkpoint(small_ref.path, str(tmp_path / "bad"), mutate)
    with pytest.raises(CheckpointMismatchError) as info:
        load_params(bad)
    err = info.value
    message = str(err)
    assert [k for k, _ in err.unexpected] == ["acoustic_decoder.extra.weight"]
    assert [k for k, _ in err.missing] == ["acoustic_decoder.norm.bias"]
    assert [k for k, *_ in err.mismatched] == ["quantizer.project_out.weight"]
    for fragment in ["acoustic_decoder.extra.weight", "acoustic_decoder.norm.bias", "(112, 4)", "(7, 4)"]:
        assert fragment in message


@pytest.mark.parametrize("kind", ["extra", "missing", "shape"])
def test_each_kind_of_mismatch_raises(small_ref, tmp_path, kind):
    def mutate(state):
        if kind == "extra":
            state["semantic_adapter.conv9.weight"] = np.zeros((1,), np.float32)
        elif kind == "missing":
            del state["acoustic_encoder.block.1.res_unit2.snake1.act.beta"]
        else:
            state["acoustic_decoder.layers.0.mlp.fc1.weight"] = np.zeros((96, 63), np.float32)

    with pytest.raises(CheckpointMismatchError, match=kind if kind != "shape" else "mismatch"):
        load_params(_copy_checkpoint(small_ref.path, str(tmp_path / kind), mutate))


def test_sharded_checkpoint_and_single_file(small_ref, tmp_path):
    state = load_file(os.path.join(small_ref.path, "model.safetensors"))
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(os.path.join(small_ref.path, "config.json"), out)
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(out / name))
        weight_map.update({k: name for k in ks})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded = dict(_flat(load_params(out)))
    single = dict(_flat(load_params(os.path.join(small_ref.path, "model.safetensors"))))
    assert sharded.keys() == single.keys()
    for k in single:
        np.testing.assert_array_equal(sharded[k], single[k])


def test_missing_files_are_clear(small_ref, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_params(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_params(tmp_path / "nowhere" / "model.safetensors")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(os.path.join(small_ref.path, "model.safetensors"), no_config)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_params(no_config)


def test_header_gives_every_shape_without_reading_tensors(small_ref, tmp_path):
    from safetensors import safe_open

    from xcodec2_jax.checkpoint import checkpoint_index, detect_format

    file = os.path.join(small_ref.path, "model.safetensors")
    index = checkpoint_index(small_ref.path)
    with safe_open(file, framework="numpy") as f:
        assert set(f.keys()) == set(index)
        for key in f.keys():
            assert index[key].shape == tuple(f.get_slice(key).get_shape()), key
            assert index[key].dtype == f.get_tensor(key).dtype, key
    assert detect_format(small_ref.path) == "transformers"

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        checkpoint_index(bad)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(file, "rb").read()[:-16])
    with pytest.raises(ValueError, match="does not fit"):
        checkpoint_index(truncated)


def test_device_and_sharding_placement_and_dtype(small_ref):
    import jax
    import jax.numpy as jnp

    host = load_params(small_ref.path)
    device = jax.devices()[0]
    placed = load_params(small_ref.path, device=device)
    flat_host, flat_placed = dict(_flat(host)), dict(_flat(placed))
    assert flat_host.keys() == flat_placed.keys()
    for path, value in flat_placed.items():
        assert isinstance(value, jax.Array) and value.devices() == {device}, path
        np.testing.assert_array_equal(np.asarray(value), flat_host[path])

    single = jax.sharding.SingleDeviceSharding(device)
    tree = jax.tree.map(lambda _: single, host)
    for leaf in jax.tree.leaves(load_params(small_ref.path, sharding=tree)):
        assert leaf.sharding == single

    # A cast to bfloat16 keeps the float32 islands (FSQ, norms, SnakeBeta, ISTFT head) in float32.
    from xcodec2_jax.modeling.layout import keeps_float32

    half = dict(_flat(load_params(small_ref.path, dtype=jnp.bfloat16, device=device)))
    for path, value in half.items():
        want = jnp.float32 if keeps_float32(path) else jnp.bfloat16
        assert value.dtype == want, path
        np.testing.assert_array_equal(np.asarray(value), flat_host[path].astype(want))
    assert half[("quantizer", "project_in", "kernel")].dtype == jnp.float32
    assert half[("acoustic_decoder", "norm", "scale")].dtype == jnp.float32
    assert half[("fc_encoder", "kernel")].dtype == jnp.bfloat16
    host_half = dict(_flat(load_params(small_ref.path, dtype=jnp.bfloat16)))
    assert all(host_half[p].dtype == v.dtype for p, v in half.items())

    with pytest.raises(ValueError, match="either sharding or device"):
        load_params(small_ref.path, device=device, sharding=single)
    with pytest.raises(ValueError, match="no entry"):
        load_params(small_ref.path, sharding={"fc_encoder": {"kernel": single}})


def test_orbax_in_either_layout(small_ref, tmp_path):
    """Orbax holds the model layout (scanned layers stacked); one written per layer loads too."""
    import jax

    from xcodec2_jax.checkpoint import detect_format, load_checkpoint, save_orbax

    params = load_params(small_ref.path)
    stacked, per_layer = tmp_path / "stacked", tmp_path / "per_layer"
    save_orbax(stacked, params, small_ref.config)
    flat = unstack_layers(params, small_ref.config)
    save_orbax(per_layer, _nest(flat), small_ref.config)
    for where in (stacked, per_layer):
        assert detect_format(where) == "orbax"
        config, restored = load_checkpoint(where, device=jax.devices()[0])
        assert config == small_ref.config
        assert dict(_flat(restored)).keys() == dict(_flat(params)).keys()
        for path, value in _flat(restored):
            np.testing.assert_array_equal(np.asarray(value), dict(_flat(params))[path])
    # Written uncompressed (a restore then skips decompressing every byte): the files hold at least
    # every parameter's bytes, which zstd would shrink by several percent for random float32 weights.
    param_bytes = sum(np.asarray(v).nbytes for _, v in _flat(params))
    stored = sum(f.stat().st_size for f in (stacked / "params").rglob("*") if f.is_file())
    assert stored >= param_bytes, (stored, param_bytes)


def _nest(flat):
    tree = {}
    for path, value in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.asarray(value)
    return tree


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_host_buffer_is_allocated_once_and_fits(small_ref, monkeypatch, dtype):
    """The buffer populated during the trace is the one the parameters are carved from: sized for the
    parameters (float32 islands included), not reallocated, and not much larger than they are."""
    import jax

    import xcodec2_jax.checkpoint as checkpoint
    from xcodec2_jax.checkpoint import io, place

    sizes = []
    real = io.populated_buffer

    def counting(nbytes):
        sizes.append(nbytes)
        return real(nbytes)

    monkeypatch.setattr(io, "populated_buffer", counting)
    monkeypatch.setattr(place, "populated_buffer", counting)
    monkeypatch.setattr(checkpoint, "populated_buffer", counting)
    params = load_params(small_ref.path, dtype=dtype, device=jax.devices("cpu")[0])
    used = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert len(sizes) == 1
    assert used <= sizes[0] <= used + 64 * 400  # padding: at most 64 bytes per tensor
