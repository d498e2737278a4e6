"""Original-release checkpoints (``HKUSTAudio/xcodec2``, PyPI ``xcodec2``) against the original code itself.

The original modules (fetched from PyPI by ``original_release``, built small and random by
``original_release.py``, with a 24-layer w2v-BERT) save their state dict in the four layouts a user
may hold: weight norm as ``weight_g``/``weight_v`` or ``parametrizations.weight.original0/1``, times
SnakeBeta's log-magnitude as ``act.beta`` (the Hub's file) or ``act.bias`` (the 0.1.5 code). The real
loader reads each file, and our model must reproduce the original's own ``encode_code``/
``decode_code``: codes 100% equal, audio within 1e-4 of peak.
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

from xcodec2_jax import Xcodec2FeatureExtractor, load_checkpoint
from xcodec2_jax.checkpoint import (
    OriginalCheckpointError,
    checkpoint_index,
    convert_state_dict,
    detect_format,
    fold_weight_norm,
    load_params,
    original_to_transformers,
    read_state_dict,
    save_orbax,
)
from xcodec2_jax.checkpoint.original import PATTERNS, WN_SUFFIXES, match_key
from xcodec2_jax.config import Xcodec2Config, config_from_original, is_original_config, is_original_format
from xcodec2_jax.modeling.layout import checkpoint_shapes, stack_layers

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


# (weight-norm layout, SnakeBeta name): the Hub's file, the 0.1.5 code's modules, and the two mixes.
LAYOUTS = {
    "hub": ("weight_g", "beta"),
    "0.1.5": ("parametrizations", "bias"),
    "weight_g+bias": ("weight_g", "bias"),
    "parametrizations+beta": ("parametrizations", "beta"),
}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The original model, its checkpoint in every layout, and its own outputs."""
    model = build_original(seed=0)
    legacy = legacy_weight_norm_copy(model)
    root = tmp_path_factory.mktemp("original")
    paths = {}
    for name, (weight_norm, snake) in LAYOUTS.items():
        paths[name] = str(root / name)
        os.makedirs(paths[name])
        m = legacy if weight_norm == "weight_g" else model
        save_original(m, os.path.join(paths[name], "model.safetensors"), snake=snake)
        with open(os.path.join(paths[name], "config.json"), "w", encoding="utf-8") as f:
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


def test_layouts_are_what_they_claim(original):
    for name, (weight_norm, snake) in LAYOUTS.items():
        keys = set(checkpoint_index(original["paths"][name]))
        wn = {s for k in keys for s in WN_SUFFIXES if k.endswith(s)}
        assert wn == (
            {".weight_g", ".weight_v"}
            if weight_norm == "weight_g"
            else set(WN_SUFFIXES) - {".weight_g", ".weight_v"}
        )
        acts = {k.rsplit(".", 1)[1] for k in keys if ".act." in k}
        assert acts == {"alpha", snake}, name
        # Per encoder block: 3 residual units of 2 SnakeBetas, and 1 before the strided conv; 1 at the end.
        assert sum(k.endswith(f".act.{snake}") for k in keys) == 7 * len(ORIGINAL_SMALL["up_ratios"]) + 1


def test_detects_original_format(original):
    for path in original["paths"].values():
        assert detect_format(path) == "original"
    state = read_state_dict(original["paths"]["hub"])
    assert is_original_format(state)
    assert not is_original_format(original_to_transformers(state))
    with open(os.path.join(original["paths"]["hub"], "config.json"), encoding="utf-8") as f:
        data = json.load(f)
    assert is_original_config(data)
    assert not is_original_config(Xcodec2Config().to_dict())
    # config.py parses transformers' config.json only; the original one points to the loader.
    with pytest.raises(ValueError, match="load_checkpoint"):
        Xcodec2Config.from_dict(data)


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
    state = read_state_dict(original["paths"]["weight_g+bias"])
    converted = original_to_transformers(state)
    layers = {int(k.split(".")[3]) for k in converted if k.startswith("semantic_encoder.encoder.layers.")}
    assert layers == set(range(16))  # layers 16..23 dropped: X-Codec2 reads hidden_states[16]
    assert not any(k.endswith(("filter", "window")) for k in converted)
    assert not any(k.endswith("act.bias") for k in converted)

    bad = dict(state)
    bad["generator.backbone.transformers.0.att.bogus.weight"] = np.zeros(3, np.float32)
    bad["fc_prior.scale"] = np.zeros(3, np.float32)
    del bad["CodecEnc.conv_blocks.1.block.4.weight_v"]
    # SnakeBeta's log-magnitude under both names in one module.
    snake = "CodecEnc.conv_blocks.1.block.3.act"
    bad[f"{snake}.beta"] = state[f"{snake}.bias"]
    with pytest.raises(OriginalCheckpointError) as info:
        original_to_transformers(bad)
    message = str(info.value)
    for key in ("att.bogus.weight", "fc_prior.scale", "conv_blocks.1.block.4.weight_g", f"{snake}.b"):
        assert key in message
    assert "already filled" in message
    assert len(info.value.problems) == 4

    # The loader reports them the same way, for a file on disk.
    with pytest.raises(OriginalCheckpointError, match="act.bias|act.beta"):
        load_params(_saved(bad, original["paths"]["hub"]), _small_config())


def _saved(state, like: str) -> str:
    from safetensors.numpy import save_file

    path = like + "-modified"
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, "model.safetensors"))
    return path


def _fires(keys) -> set[int]:
    """Rows of PATTERNS matched by ``keys`` (weight-norm halves taken as the folded ``.weight``)."""
    rows = set()
    for key in keys:
        for suffix in WN_SUFFIXES:
            if key.endswith(suffix):
                key = key[: -len(suffix)] + ".weight"
        found = match_key(key)
        assert found is not None, key
        rows.add(found[0])
    return rows


def test_every_pattern_fires_on_small_and_full_state_dicts(original, monkeypatch):
    every = set(range(len(PATTERNS)))
    small = _fires(checkpoint_index(original["paths"]["hub"]))
    assert small == every, [PATTERNS[i][0] for i in every - small]
    full = _fires(_full_release_shapes(monkeypatch))
    assert full == every, [PATTERNS[i][0] for i in every - full]


def test_config_from_original(original):
    path = original["paths"]["0.1.5"]
    state = read_state_dict(path)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config_json = json.load(f)
    # Decoder heads are the one size the weights cannot tell (the original hardcodes 16).
    inferred = config_from_original(config_json, state, num_attention_heads=ORIGINAL_SMALL["heads"])
    assert Xcodec2Config.from_dict(inferred) == _small_config()
    # The header alone (no tensor read) gives the same.
    header = checkpoint_index(path)
    assert config_from_original(config_json, header, num_attention_heads=ORIGINAL_SMALL["heads"]) == inferred

    # The release's config.json alone gives the release's hardcoded shapes = transformers' defaults.
    assert Xcodec2Config.from_dict(config_from_original(RELEASE_CONFIG_JSON)) == Xcodec2Config()
    with pytest.warns(UserWarning, match="lacks"):
        assert Xcodec2Config.from_dict(config_from_original({})) == Xcodec2Config()
    with pytest.raises(ValueError, match="semantic_hidden_size"):
        config_from_original({**config_json, "semantic_hidden_size": 48}, state)


def test_one_config_for_every_format(original, tmp_path):
    """A non-default original checkpoint, the same weights in transformers' format, and as Orbax: the
    config API and the loader agree on each, and the three agree with each other."""
    path = original["paths"]["hub"]
    config, params = load_checkpoint(path)
    assert config != Xcodec2Config()
    assert config.hidden_size == ORIGINAL_SMALL["hidden"] and config.num_attention_heads == 16

    transformers_dir = tmp_path / "transformers"
    config.save_pretrained(transformers_dir)
    from safetensors.numpy import save_file

    save_file(original_to_transformers(read_state_dict(path)), str(transformers_dir / "model.safetensors"))
    orbax_dir = tmp_path / "orbax"
    save_orbax(orbax_dir, params, config)

    for fmt, where in (("original", path), ("transformers", transformers_dir), ("orbax", orbax_dir)):
        assert detect_format(where) == fmt
        assert Xcodec2Config.from_pretrained(where) == config, fmt
        loaded_config, loaded = load_checkpoint(where)
        assert loaded_config == config, fmt
        assert jax.tree.structure(loaded) == jax.tree.structure(params), fmt
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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

    state = original_to_transformers(read_state_dict(original["paths"]["hub"]))
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
    from xcodec2_jax.modeling.model import Xcodec2Model

    model = Xcodec2Model(config)
    encode = jax.jit(lambda p, f: model.apply({"params": p}, **f, method=Xcodec2Model.encode))
    decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=Xcodec2Model.decode))
    return encode, decode


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_jax_matches_original(original, layout):
    path = original["paths"][layout]
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config_json = json.load(f)
    config = Xcodec2Config.from_dict(
        config_from_original(config_json, checkpoint_index(path), num_attention_heads=ORIGINAL_SMALL["heads"])
    )
    # The public entry point, reading the file: it detects the original format by its key names.
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
    path = original["paths"]["hub"]
    state = original_to_transformers(read_state_dict(path))
    config = _small_config()
    permuted = dict(state)
    for key in state:
        if key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            permuted[key] = _permute_for_rope(state[key], config.num_attention_heads)
    assert any(not np.array_equal(permuted[k], state[k]) for k in state)
    _, decode = _jitted(config)
    codes = original["codes"].astype(np.int32)
    expected = checkpoint_shapes(config)
    plain = np.asarray(decode(stack_layers(convert_state_dict(state, expected), config), codes).audio_values)
    perm = np.asarray(
        decode(stack_layers(convert_state_dict(permuted, expected), config), codes).audio_values
    )
    _, rel = rel_err(perm, plain)
    print(f"decoded audio, converter-permuted q/k rows vs plain split: {rel:.3e} of peak")
    assert rel <= 1e-5


def _full_release_shapes(monkeypatch) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the release's full-size modules (w2v-BERT 2.0 with 24 layers,
    ``CodecEncoder_Transformer()``, ``CodecDecoderVocos()``), built on the meta device."""
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

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
    return {f"{name}.{k}": tuple(v.shape) for name, m in parts.items() for k, v in m.state_dict().items()}


@pytest.mark.slow
def test_full_size_release_layout(monkeypatch):
    """The release's full-size modules, shapes only: the rewrite gives exactly transformers' full-size
    key set and shapes, and the shapes plus the release's config.json give the default config."""
    from transformers import Xcodec2Config as TorchConfig
    from transformers import Xcodec2Model as TorchModel

    shapes = _full_release_shapes(monkeypatch)
    assert any(k.endswith("parametrizations.weight.original1") for k in shapes)
    with torch.device("meta"):
        reference = TorchModel(TorchConfig())

    assert Xcodec2Config.from_dict(config_from_original(RELEASE_CONFIG_JSON, shapes)) == Xcodec2Config()
    # Zero-stride stand-ins: the rewrite never copies a tensor except the weight-normed and qkv ones.
    converted = original_to_transformers({k: np.broadcast_to(np.float32(1), s) for k, s in shapes.items()})
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in converted.items()} == expected


def test_load_params_infers_the_config_from_original_weights(original):
    """Without a config, the shapes come from the weights (heads default to the release's 16)."""
    path = original["paths"]["0.1.5"]
    params = load_params(path)
    state = original_to_transformers(read_state_dict(path))
    assert params["acoustic_decoder"]["fc"]["kernel"].shape == state["acoustic_decoder.fc.weight"].T.shape
    assert Xcodec2Config.from_pretrained(path).semantic_model_config.num_hidden_layers == 16
