"""Xcodec2Config: defaults equal to transformers', round trips, and errors naming the field."""

from __future__ import annotations

import dataclasses
import json

import jax
import pytest
from transformers import Xcodec2Config as TorchConfig

from xcodec2_jax import Xcodec2Config
from xcodec2_jax.config import SemanticConfig


def test_defaults_equal_transformers_defaults():
    ours = Xcodec2Config()
    ref = TorchConfig()
    for f in dataclasses.fields(Xcodec2Config):
        if f.name in ("semantic_model_config", "rope_theta"):
            continue
        value = getattr(ref, f.name)
        assert getattr(ours, f.name) == (tuple(value) if isinstance(value, list) else value), f.name
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    for f in dataclasses.fields(SemanticConfig):
        assert getattr(ours.semantic_model_config, f.name) == getattr(ref.semantic_model_config, f.name), (
            f.name
        )
    assert (ours.hop_length, ours.n_fft, ours.codebook_size) == (320, 1280, 65536)


def test_from_pretrained_reads_transformers_config(tmp_path):
    ref = TorchConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        downsampling_ratios=[2, 3],
        quantization_dim=64 + 32,
        semantic_model_config=dict(model_type="wav2vec2-bert", hidden_size=32),
    )
    ref.save_pretrained(tmp_path)
    ours = Xcodec2Config.from_pretrained(tmp_path)
    assert ours.hidden_size == 64 and ours.num_key_value_heads == 2 and ours.downsampling_ratios == (2, 3)
    assert ours.semantic_model_config.hidden_size == 32
    assert ours.semantic_model_config.num_hidden_layers == ref.semantic_model_config.num_hidden_layers


def test_round_trip_and_hashable(tmp_path):
    cfg = Xcodec2Config(quantization_levels=[5, 5, 4])
    assert cfg.quantization_levels == (5, 5, 4)
    assert Xcodec2Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.save_pretrained(tmp_path)
    assert Xcodec2Config.from_pretrained(tmp_path) == cfg
    # Usable as a static argument of jit.
    f = jax.jit(lambda x, c: x * c.hop_length, static_argnums=1)
    assert int(f(1, cfg)) == 320
    assert hash(cfg) == hash(Xcodec2Config(quantization_levels=(5, 5, 4)))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(hidden_size=1000), "hidden_size"),
        (dict(num_attention_heads=16, num_key_value_heads=5), "num_key_value_heads"),
        (dict(model_type="dac"), "model_type"),
        (dict(downsampling_ratios=(2, 0)), "downsampling_ratios"),
        (dict(quantization_levels=()), "quantization_levels"),
        (dict(quantization_dim=1000), "quantization_dim"),
        (
            dict(semantic_model_config=dict(hidden_size=1000, num_attention_heads=16)),
            "semantic_model_config.hidden_size",
        ),
        (dict(semantic_model_config=dict(model_type="bert")), "semantic_model_config.model_type"),
        (dict(encoder_hidden_size=-1), "encoder_hidden_size"),
    ],
)
def test_inconsistent_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        Xcodec2Config.from_dict(kwargs)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Xcodec2Config.from_pretrained(tmp_path)
