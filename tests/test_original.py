"""Original-release checkpoints (``HKUSTAudio/xcodec2``, PyPI ``xcodec2``) against the original code itself.

The original modules (vendored in ``tests/_original_xcodec2``, built small and random by
``original_release.py``, with a 24-layer w2v-BERT) save their state dict in both weight-norm layouts;
``original_to_transformers`` + ``convert_state_dict`` load it, and our model must reproduce the
original's own ``encode_code``/``decode_code``: codes 100% equal, audio within 1e-4 of peak.
"""

from __future__ import annotations

import functools
import json
import os
import warnings

import jax
import numpy as np
import pytest
import torch
from conftest import load_speech, rel_err
from original_release import (
    ORIGINAL_SMALL,
    build_original,
    legacy_weight_norm_copy,
    original_decode,
    original_encode,
    original_modules,
    save_original,
    xcodec2_config_kwargs,
)

from xcodec2_jax import Xcodec2FeatureExtractor
from xcodec2_jax.config import Xcodec2Config
from xcodec2_jax.original import (
    OriginalCheckpointError,
    config_from_original,
    fold_weight_norm,
    is_original_config,
    is_original_format,
    original_to_transformers,
)
from xcodec2_jax.weights import convert_state_dict, load_params, read_state_dict

SEGMENT = 15000  # samples: not a multiple of 320, so the original pads it (to 15040, 47 codes)

# The original release's config.json (HKUSTAudio/xcodec2): almost no shapes, the rest hardcoded.
RELEASE_CONFIG_JSON = dict(
    semantic_hidden_size=1024,
    codec_encoder_hidden_size=1024,
    codec_decoder_hidden_size=1024,
    use_vocos=True,
    model_type="xcodec",
)


def _segments() -> list[np.ndarray]:
    """Equal-length pieces of the test speech (6 of them), so one compiled encode serves all."""
    return [a[s : s + SEGMENT] for a in load_speech() for s in range(0, len(a) - SEGMENT + 1, 25000)]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The original model, its checkpoint in both weight-norm layouts, and its own outputs."""
    model = build_original(seed=0)
    root = tmp_path_factory.mktemp("original")
    paths = {}
    for layout, m in (("parametrizations", model), ("weight_g", legacy_weight_norm_copy(model))):
        paths[layout] = str(root / layout)
        os.makedirs(paths[layout])
        save_original(m, os.path.join(paths[layout], "model.safetensors"))
        with open(os.path.join(paths[layout], "config.json"), "w", encoding="utf-8") as f:
            json.dump(model.config.to_dict(), f)

    segments = _segments()
    outs = [original_encode(model, a) for a in segments]
    codes = np.concatenate([o[0] for o in outs])
    audio = original_decode(model, codes)
    return dict(
        model=model,
        paths=paths,
        segments=segments,
        codes=codes,
        input_values=np.concatenate([o[1] for o in outs]),
        input_features=np.concatenate([o[2] for o in outs]),
        audio=audio,
    )


def _small_config() -> Xcodec2Config:
    return Xcodec2Config.from_dict(xcodec2_config_kwargs(ORIGINAL_SMALL))


# --------------------------------------------------------------------------------------------------
# Format detection, weight norm, strictness, config


def test_detects_original_format(original):
    state = read_state_dict(original["paths"]["weight_g"])
    assert is_original_format(state)
    assert not is_original_format(original_to_transformers(state))
    with open(os.path.join(original["paths"]["weight_g"], "config.json"), encoding="utf-8") as f:
        assert is_original_config(json.load(f))
    assert not is_original_config(Xcodec2Config().to_dict())


@pytest.mark.parametrize("layout", ["weight_g", "parametrizations"])
def test_weight_norm_folding_matches_torch(layout):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 5, 7)
    if layout == "weight_g":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(conv)
        g, v = conv.weight_g, conv.weight_v
    else:
        torch.nn.utils.parametrizations.weight_norm(conv)
        g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    with torch.no_grad():
        g.mul_(torch.rand(g.shape) + 0.5)
        if layout == "weight_g":
            conv(torch.zeros(1, 6, 7))  # the legacy hook recomputes .weight before each forward
        expected = conv.weight.detach().numpy()
    ours = fold_weight_norm(g.detach().numpy(), v.detach().numpy())
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    err, rel = rel_err(ours, expected)
    print(f"{layout}: folded weight vs torch: max abs err {err:.3e}, relative {rel:.3e}")
    assert rel <= 1e-6


def test_mapping_is_strict_and_lists_every_problem(original):
    state = read_state_dict(original["paths"]["weight_g"])
    converted = original_to_transformers(state)
    layers = {int(k.split(".")[3]) for k in converted if k.startswith("semantic_encoder.encoder.layers.")}
    assert layers == set(range(16))  # layers 16..23 dropped: X-Codec2 reads hidden_states[16]
    assert not any(k.endswith(("filter", "window")) for k in converted)

    bad = dict(state)
    bad["generator.backbone.transformers.0.att.bogus.weight"] = np.zeros(3, np.float32)
    bad["fc_prior.scale"] = np.zeros(3, np.float32)
    del bad["CodecEnc.conv_blocks.1.block.4.weight_v"]
    with pytest.raises(OriginalCheckpointError) as info:
        original_to_transformers(bad)
    message = str(info.value)
    for key in ("att.bogus.weight", "fc_prior.scale", "conv_blocks.1.block.4.weight_g"):
        assert key in message
    assert len(info.value.problems) == 3


def test_config_from_original(original):
    path = original["paths"]["parametrizations"]
    state = read_state_dict(path)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config_json = json.load(f)
    # Decoder heads are the one size the weights cannot tell (the original hardcodes 16).
    inferred = config_from_original(config_json, state, num_attention_heads=ORIGINAL_SMALL["heads"])
    assert Xcodec2Config.from_dict(inferred) == _small_config()
    shapes = {k: v.shape for k, v in state.items()}
    assert config_from_original(config_json, shapes, num_attention_heads=ORIGINAL_SMALL["heads"]) == inferred

    # The release's config.json alone gives the release's hardcoded shapes = transformers' defaults.
    assert Xcodec2Config.from_dict(config_from_original(RELEASE_CONFIG_JSON)) == Xcodec2Config()
    with pytest.warns(UserWarning, match="lacks"):
        assert Xcodec2Config.from_dict(config_from_original({})) == Xcodec2Config()
    # FSQ buffers, non-persistent in the vector-quantize-pytorch the release pins, are dropped if
    # present; their levels are then taken as stored.
    stored = {**state, "generator.quantizer.layers.0._levels": np.array([5, 5, 5, 5, 4, 4, 4, 4], np.int32)}
    assert original_to_transformers(stored).keys() == original_to_transformers(state).keys()
    assert (
        config_from_original(config_json, stored, num_attention_heads=4)["quantization_levels"]
        == [5] * 4 + [4] * 4
    )
    with pytest.raises(ValueError, match="semantic_hidden_size"):
        config_from_original({**config_json, "semantic_hidden_size": 48}, state)


# --------------------------------------------------------------------------------------------------
# RoPE of the original decoder


def test_original_rope_is_a_no_op():
    """The original feeds torchtune's RoPE (expects (b, s, h, d)) with q, k of shape (b, h, t, d): it
    rotates by head index, the same for q and k of a head, so attention is unchanged. Rotating by time
    instead would change it a lot, so this comparison would see a real rotation."""
    orig = original_modules()
    torch.manual_seed(0)
    rope = orig.RotaryPositionalEmbeddings(dim=64)  # the release: hidden 1024, 16 heads, pos_meb_dim 64
    attention = orig.Attention(dim=1024, n_heads=16, rotary_embed=rope).eval()
    x = torch.randn(2, 60, 1024)

    class Identity(torch.nn.Module):
        def forward(self, q):
            return q

    class ByTime(torch.nn.Module):
        def forward(self, q):
            return rope(q.transpose(1, 2)).transpose(1, 2)

    with torch.no_grad():
        as_released = attention(x).numpy()
        attention.rotary_embed = Identity()
        without = attention(x).numpy()
        attention.rotary_embed = ByTime()
        by_time = attention(x).numpy()
    _, no_op = rel_err(without, as_released)
    _, time_effect = rel_err(by_time, as_released)
    print(f"original attention without RoPE vs as released: {no_op:.3e}; by time instead: {time_effect:.3e}")
    assert no_op <= 1e-5
    assert time_effect >= 1e-2


# --------------------------------------------------------------------------------------------------
# Parity with the original modules


def _print_parity(name, agree, n_codes, n_distinct, audio_rel):
    print(
        f"{name}: codes agreement {100 * agree:.2f}% of {n_codes} ({n_distinct} distinct); "
        f"decoded audio max err / peak {audio_rel:.3e}"
    )


def test_our_features_are_the_inputs_the_original_builds(original):
    feats = Xcodec2FeatureExtractor()(original["segments"], sampling_rate=16000)
    np.testing.assert_array_equal(feats["input_values"], original["input_values"])
    err, _ = rel_err(feats["input_features"], original["input_features"])
    print(f"input_features vs the original's (SeamlessM4TFeatureExtractor): max abs err {err:.3e}")
    assert err <= 1e-4
    assert feats["input_features_mask"].all()


def test_transformers_port_matches_original(original):
    """transformers' Xcodec2Model, loaded strictly from the converted state dict (a cross-check of the
    names and of the port itself)."""
    from transformers import Xcodec2Config as TorchConfig
    from transformers import Xcodec2Model as TorchModel

    state = original_to_transformers(read_state_dict(original["paths"]["weight_g"]))
    model = TorchModel(TorchConfig(**xcodec2_config_kwargs(ORIGINAL_SMALL))).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    with torch.no_grad():
        codes = model.encode(
            torch.from_numpy(original["input_values"]), torch.from_numpy(original["input_features"])
        ).audio_codes.numpy()
        audio = model.decode(torch.from_numpy(original["codes"]).long()).audio_values.numpy()
    agree = float(np.mean(codes == original["codes"]))
    _, rel = rel_err(audio, original["audio"])
    _print_parity("transformers vs original", agree, codes.size, len(np.unique(original["codes"])), rel)
    assert agree == 1.0
    assert rel <= 1e-4


@functools.cache
def _jitted(config: Xcodec2Config):
    from xcodec2_jax.model import Xcodec2Model

    model = Xcodec2Model(config)
    encode = jax.jit(lambda p, f: model.apply({"params": p}, **f, method=Xcodec2Model.encode))
    decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=Xcodec2Model.decode))
    return encode, decode


@functools.cache
def _abstract(config: Xcodec2Config):
    from xcodec2_jax.model import abstract_params

    return abstract_params(config)


@pytest.mark.parametrize("layout", ["weight_g", "parametrizations"])
def test_jax_matches_original(original, layout):
    path = original["paths"][layout]
    state = read_state_dict(path)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config_json = json.load(f)
    config = Xcodec2Config.from_dict(
        config_from_original(config_json, state, num_attention_heads=ORIGINAL_SMALL["heads"])
    )
    # The public entry point: load_params detects the original format by its key names.
    params = load_params(path, config)
    encode, decode = _jitted(config)

    feats = Xcodec2FeatureExtractor()(original["segments"], sampling_rate=16000)
    codes = np.asarray(encode(params, feats).audio_codes)
    audio = np.asarray(decode(params, original["codes"].astype(np.int32)).audio_values)

    expected = original["codes"]
    agree = float(np.mean(codes == expected))
    n_distinct = len(np.unique(expected))
    err, rel = rel_err(audio, original["audio"])
    _print_parity(f"JAX vs original ({layout})", agree, codes.size, n_distinct, rel)
    print(f"  decoded audio max abs err {err:.3e}, peak {np.abs(original['audio']).max():.3e}")
    assert codes.shape == expected.shape
    assert n_distinct >= 20
    assert agree == 1.0
    assert rel <= 1e-4


def _permute_for_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """transformers' converter's row permutation of q/k (interleaved pairs -> halves, per head)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def test_converter_rope_permutation_is_irrelevant_to_our_decoder(original):
    """transformers' converter permutes q and k rows within each head; permuting both alike leaves every
    q·k, hence our (RoPE-free) decoder, unchanged, so the plain split is exact and so is the permuted one."""
    path = original["paths"]["weight_g"]
    state = original_to_transformers(read_state_dict(path))
    config = _small_config()
    permuted = dict(state)
    for key in state:
        if key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            permuted[key] = _permute_for_rope(state[key], config.num_attention_heads)
    assert any(not np.array_equal(permuted[k], state[k]) for k in state)
    _, decode = _jitted(config)
    codes = original["codes"].astype(np.int32)
    plain = np.asarray(decode(convert_state_dict(state, _abstract(config)), codes).audio_values)
    perm = np.asarray(decode(convert_state_dict(permuted, _abstract(config)), codes).audio_values)
    _, rel = rel_err(perm, plain)
    print(f"decoded audio, converter-permuted q/k rows vs plain split: {rel:.3e} of peak")
    assert rel <= 1e-5


def test_full_size_release_layout(monkeypatch):
    """The release's full-size modules (w2v-BERT 2.0 with 24 layers, ``CodecEncoder_Transformer()``,
    ``CodecDecoderVocos()``), shapes only: the rewrite gives exactly transformers' full-size key set and
    shapes, and the shapes plus the release's config.json give the default config."""
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel
    from transformers import Xcodec2Config as TorchConfig
    from transformers import Xcodec2Model as TorchModel

    orig = original_modules()
    residual_fsq = orig.codec_decoder_vocos.ResidualFSQ

    def residual_fsq_off_meta(**kwargs):  # FSQ calls .item() in __init__, which meta tensors cannot
        with torch.device("cpu"):
            return residual_fsq(**kwargs)

    monkeypatch.setattr(orig.codec_decoder_vocos, "ResidualFSQ", residual_fsq_off_meta)
    parts = {}
    with torch.device("meta"):
        w2v_bert = Wav2Vec2BertConfig(
            num_hidden_layers=24, position_embeddings_type="relative_key", feature_projection_input_dim=160
        )
        parts["semantic_model"] = Wav2Vec2BertModel(w2v_bert)
        parts["SemanticEncoder_module"] = orig.SemanticEncoder(1024, 1024, 1024)
        parts["CodecEnc"] = orig.CodecEncoder_Transformer()
        parts["fc_prior"] = torch.nn.Linear(2048, 2048)
        parts["fc_post_a"] = torch.nn.Linear(2048, 1024)
        parts["generator"] = orig.CodecDecoderVocos()
        reference = TorchModel(TorchConfig())
    shapes = {f"{name}.{k}": tuple(v.shape) for name, m in parts.items() for k, v in m.state_dict().items()}
    assert any(k.endswith("parametrizations.weight.original1") for k in shapes)

    assert Xcodec2Config.from_dict(config_from_original(RELEASE_CONFIG_JSON, shapes)) == Xcodec2Config()
    # Zero-stride stand-ins: the rewrite never copies a tensor except the weight-normed and qkv ones.
    converted = original_to_transformers({k: np.broadcast_to(np.float32(1), s) for k, s in shapes.items()})
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in converted.items()} == expected


def test_load_params_infers_the_config_from_original_weights(original):
    """Without a config, the shapes come from the weights (heads default to the release's 16)."""
    path = original["paths"]["parametrizations"]
    params = load_params(path)
    state = original_to_transformers(read_state_dict(path))
    assert params["acoustic_decoder"]["fc"]["kernel"].shape == state["acoustic_decoder.fc.weight"].T.shape
    assert len([k for k in params["semantic_encoder"]["encoder"]]) == 16
