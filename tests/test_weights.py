"""load_params: strict mapping of transformers checkpoints onto the Flax tree."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from xcodec2_jax import load_params
from xcodec2_jax.model import abstract_params
from xcodec2_jax.weights import CheckpointMismatchError, path_to_torch_key, torch_key_to_path


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


@pytest.mark.parametrize("which", ["small_ref", "full_ref"])
def test_every_key_used_and_every_leaf_filled(which, request):
    ref = request.getfixturevalue(which)
    params = ref.params
    expected = dict(_flat(abstract_params(ref.config)))
    got = dict(_flat(params))
    assert set(got) == set(expected)
    for path, leaf in expected.items():
        assert got[path].shape == tuple(leaf.shape), path
    # Every persistent tensor of the reference lands somewhere (masked_spec_embed is training-only).
    state = load_file(os.path.join(ref.path, "model.safetensors"))
    used = [k for k in state if k != "semantic_encoder.masked_spec_embed"]
    assert len(used) == len(got)
    # Values, not just shapes: a conv kernel and a linear kernel in the Flax layout.
    key = "acoustic_decoder.embed.weight"
    np.testing.assert_array_equal(
        params["acoustic_decoder"]["embed"]["kernel"], state[key].transpose(2, 1, 0)
    )
    key = "acoustic_decoder.fc.weight"
    np.testing.assert_array_equal(params["acoustic_decoder"]["fc"]["kernel"], state[key].T)


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
