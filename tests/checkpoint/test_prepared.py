"""The params cache: checkpoints kept in the model's layout and memory-mapped at the next load."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest

from xcodec2_jax import Xcodec2Codec, load_params
from xcodec2_jax.checkpoint import load_checkpoint, save_orbax
from xcodec2_jax.modeling.layout import per_layer
from xcodec2_jax.utils.tree import flatten


def _entries(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _assert_same_params(ours, expected):
    ours, expected = flatten(ours), flatten(expected)
    assert ours.keys() == expected.keys()
    for path, value in expected.items():
        got = np.asarray(ours[path])
        assert got.dtype == value.dtype, path
        np.testing.assert_array_equal(got, value, err_msg=str(path))


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_second_load_maps_the_prepared_file_and_gives_the_same_params(small_ref, tmp_path, dtype):
    cache = tmp_path / "params"
    expected = load_params(small_ref.path, dtype=dtype)
    first = load_params(small_ref.path, dtype=dtype, params_cache=cache)
    _assert_same_params(first, expected)
    assert [e.rsplit(".", 1)[1] for e in _entries(cache)] == ["json", "params"]
    data = os.path.join(cache, _entries(cache)[1])

    device = jax.devices()[0]
    second = load_params(small_ref.path, dtype=dtype, device=device, params_cache=cache)
    _assert_same_params(second, expected)
    # Adopted, not copied: every device buffer is the mapped file's memory, 64-byte aligned.
    from xcodec2_jax.checkpoint.place import place_tree
    from xcodec2_jax.checkpoint.prepared import lookup

    host = lookup(str(cache), _entries(cache)[0].rsplit(".", 1)[0])
    placed = flatten(place_tree(host, device))
    for path, leaf in flatten(host).items():
        assert os.path.samefile(_memmap_file(leaf), data), path
        assert placed[path].unsafe_buffer_pointer() == leaf.ctypes.data, path
        assert leaf.ctypes.data % 64 == 0, path


def _memmap_file(array):  # noqa: D103
    while not isinstance(array, np.memmap) or array.filename is None:
        array = array.base
    return array.filename


def test_a_changed_checkpoint_is_prepared_again_and_the_stale_entry_removed(small_ref, tmp_path):
    source = tmp_path / "ckpt"
    shutil.copytree(small_ref.path, source)
    cache = tmp_path / "params"
    load_params(source, params_cache=cache)
    before = _entries(cache)

    from safetensors.numpy import load_file, save_file

    file = source / "model.safetensors"
    state = load_file(file)
    key = "acoustic_decoder.head.linear.bias"
    state[key] = state[key] + 1.0
    save_file(state, file)
    changed = load_params(source, params_cache=cache)
    bias = changed["acoustic_decoder"]["head"]["linear"]["bias"]
    np.testing.assert_array_equal(np.asarray(bias), state[key])
    after = _entries(cache)
    assert len(after) == 2 and set(after).isdisjoint(before)


def test_an_unreadable_entry_is_replaced_with_a_warning(small_ref, tmp_path):
    cache = tmp_path / "params"
    expected = load_params(small_ref.path)
    load_params(small_ref.path, params_cache=cache)
    data = next(cache / e for e in _entries(cache) if e.endswith(".params"))
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.warns(UserWarning, match="unreadable prepared checkpoint"):
        again = load_params(small_ref.path, params_cache=cache)
    _assert_same_params(again, expected)
    assert os.path.getsize(data) > 0 and load_params(small_ref.path, params_cache=cache) is not None


def test_orbax_checkpoints_are_prepared_too(small_ref, tmp_path):
    params = load_params(small_ref.path)
    save_orbax(tmp_path / "orbax", params, small_ref.config)
    cache = tmp_path / "params"
    config, first = load_checkpoint(tmp_path / "orbax", params_cache=cache)
    assert config == small_ref.config and len(_entries(cache)) == 2
    _, second = load_checkpoint(tmp_path / "orbax", params_cache=cache)
    _assert_same_params(first, params)
    _assert_same_params(second, params)


def test_codec_keeps_the_prepared_checkpoint_beside_its_compilation_cache(small_ref):
    """(Every codec test runs on the mapped params too: the suite's cache folder is on.)"""
    from xcodec2_jax.checkpoint.prepared import checkpoint_files, entry_key, params_dir

    first = Xcodec2Codec.from_pretrained(small_ref.path)
    folder = params_dir(first.compilation_cache_dir)
    key, _ = entry_key(checkpoint_files(small_ref.path, "transformers"), first.config, None)
    assert os.path.isfile(os.path.join(folder, key + ".params"))
    second = Xcodec2Codec.from_pretrained(small_ref.path)
    # The codec holds the decoder's layers per layer (layout.per_layer), as views of the same arrays.
    _assert_same_params(second.params, per_layer(load_params(small_ref.path)))


def test_load_prepared_only_maps_what_is_there(small_ref, tmp_path):
    """load_prepared gives None (and writes nothing) until the folder holds the checkpoint, then the
    same params as the load that prepared it, placed as asked."""
    from xcodec2_jax.checkpoint import load_prepared

    folder = tmp_path / "params"
    assert load_prepared(small_ref.path, params_cache=folder) is None
    assert not folder.exists() or not os.listdir(folder)
    _, loaded = load_checkpoint(small_ref.path, params_cache=folder)
    config, mapped = load_prepared(small_ref.path, params_cache=folder, device=jax.devices()[0])
    assert config == small_ref.config
    flat, want = flatten(mapped), flatten(loaded)
    assert flat.keys() == want.keys()
    for path, value in flat.items():
        assert isinstance(value, jax.Array)
        np.testing.assert_array_equal(np.asarray(value), want[path])


def test_modules_load_a_strictly_checked_subset_in_every_format(small_ref, tmp_path):
    from xcodec2_jax.modeling.layout import ENCODE_MODULES, MODULES
    from xcodec2_jax.modeling.model import abstract_params

    assert sorted(abstract_params(small_ref.config)) == sorted(MODULES)
    full = load_params(small_ref.path)
    save_orbax(tmp_path / "orbax", full, small_ref.config)
    cache = tmp_path / "params"
    for source in (small_ref.path, tmp_path / "orbax"):
        for kwargs in ({}, {"params_cache": cache}, {"params_cache": cache}):  # prepared, then mapped
            subset = load_params(source, modules=ENCODE_MODULES, **kwargs)
            assert sorted(subset) == sorted(ENCODE_MODULES)
            _assert_same_params(subset, {m: full[m] for m in ENCODE_MODULES})
    # The encoder-only entry is one of its own, smaller than the whole checkpoint's.
    load_params(small_ref.path, params_cache=cache)
    sizes = sorted(os.path.getsize(cache / f) for f in os.listdir(cache) if f.endswith(".params"))
    assert len(sizes) == 3 and sizes[0] < sizes[-1]  # encoder-only from both formats, then whole

    with pytest.raises(ValueError, match="unknown module"):
        load_params(small_ref.path, modules=["decoder"])
    with pytest.raises(ValueError, match="non-empty"):
        load_params(small_ref.path, modules="quantizer")


def test_modules_still_check_the_whole_checkpoint(small_ref, tmp_path):
    from xcodec2_jax.checkpoint import CheckpointMismatchError
    from xcodec2_jax.modeling.layout import ENCODE_MODULES

    bad = dict(load_params(small_ref.path))
    bad["acoustic_decoder"] = dict(bad["acoustic_decoder"], extra={"kernel": np.zeros((2, 2), np.float32)})
    save_orbax(tmp_path / "bad", bad, small_ref.config)
    with pytest.raises(CheckpointMismatchError, match="extra"):
        load_params(tmp_path / "bad", modules=ENCODE_MODULES)


@pytest.mark.slow
def test_encode_only_codec_encodes_the_same_and_refuses_to_decode(small_ref, tmp_path):
    from conftest import speech_files

    from xcodec2_jax.inference.audio import read_audio

    audio = read_audio(speech_files()[0])
    full = Xcodec2Codec.from_pretrained(small_ref.path, compilation_cache=tmp_path / "cache")
    part = Xcodec2Codec.from_pretrained(
        small_ref.path, compilation_cache=tmp_path / "cache", encode_only=True
    )
    assert part.encode_only and not full.encode_only and "acoustic_decoder" not in part.params
    # (In the suite the params cache may map the encoder's entry already, which skips compiling
    # while loading; compiling ahead explicitly checks the same specs.)
    assert part.precompile_encode([len(audio)]) == 1
    compiled = part.programs.encode.num_compiled()
    codes = part.encode(audio, part.sampling_rate)
    assert (
        part.programs.encode.num_compiled() == compiled
    )  # the program compiled ahead, for the encoder's params
    np.testing.assert_array_equal(codes.codes, full.encode(audio, full.sampling_rate).codes)
    with pytest.raises(ValueError, match="encode_only"):
        part.decode(codes)
    with pytest.raises(ValueError, match="encode_only"):
        part.decode_stream()
