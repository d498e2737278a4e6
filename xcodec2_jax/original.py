"""Checkpoints of the original X-Codec2 release (HF ``HKUSTAudio/xcodec2``, PyPI ``xcodec2``), numpy only.

The original ``model.safetensors`` names its modules after the training code: ``semantic_model``
(all 24 layers of w2v-BERT 2.0), ``SemanticEncoder_module``, ``CodecEnc`` (weight-normed convs),
``generator`` (quantizer, Vocos backbone with a fused ``c_attn`` projection, ISTFT head),
``fc_prior`` and ``fc_post_a``. :func:`original_to_transformers` rewrites such a state dict into
transformers' naming, which :func:`xcodec2_jax.weights.convert_state_dict` then maps onto the Flax
tree, so both formats share one strict loader.

What the rewrite has to know about the original code (``modeling_xcodec2.py`` and ``vq/``):

- It reads ``semantic_model(...).hidden_states[16]``: the output of the first 16 conformer layers,
  with no norm after them (w2v-BERT has no final encoder norm), i.e. the ``last_hidden_state`` of
  a 16-layer model. Layers 16 and up never influence the codes and are dropped.
- ``CodecEnc`` convs use weight norm over dim 0: ``w = g * v / ||v||`` with the norm over every
  dim but the first. Checkpoints store either ``weight_g``/``weight_v`` (``torch.nn.utils.weight_norm``)
  or ``parametrizations.weight.original0``/``original1`` (``torch.nn.utils.parametrizations``).
- The decoder's fused ``c_attn`` rows are ``(r h d)``: q, k, v one after the other, each head-major.
  Its RoPE (torchtune's, given ``(b, h, t, d)`` where it expects ``(b, s, h, d)``) rotates by head
  index, the same angle for q and k of a head, so q·k does not change and the rotation is a no-op;
  transformers' port keeps a head-indexed RoPE with the same no-op effect. A plain row split is
  therefore exact for both. transformers' converter also permutes q and k rows within each head (for
  its half-split rotation layout); applied to q and k alike that permutation leaves q·k unchanged
  too, so it is not needed here.
- SnakeBeta stores its log-magnitude as ``bias`` (transformers: ``beta``). Anti-aliasing filters and
  the ISTFT window are stored buffers, recomputed by the model, and dropped.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# hidden_states index that modeling_xcodec2.py reads from the w2v-BERT.
SEMANTIC_LAYERS_USED = 16

_ORIGINAL_PREFIXES = (
    "semantic_model.",
    "SemanticEncoder_module.",
    "CodecEnc.",
    "generator.",
    "fc_prior.",
    "fc_post_a.",
)
_ORIGINAL_CONFIG_KEYS = (
    "semantic_hidden_size",
    "codec_encoder_hidden_size",
    "codec_decoder_hidden_size",
    "use_vocos",
)

_DROP = object()


class OriginalCheckpointError(ValueError):
    """An original-format checkpoint holds keys that cannot be mapped (all listed in one message)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = [f"original X-Codec2 checkpoint: {len(self.problems)} key(s) could not be mapped:"]
        lines += [f"    {p}" for p in self.problems]
        super().__init__("\n".join(lines))


def is_original_format(state_keys: Iterable[str]) -> bool:
    """True if the keys are those of the original release (``CodecEnc.``, ``generator.``, ...)."""
    return any(k.startswith(_ORIGINAL_PREFIXES) for k in state_keys)


def is_original_config(config: Mapping[str, Any]) -> bool:
    """True for the original repo's ``config.json`` (a ``BigCodecConfig``, model_type ``xcodec``)."""
    if any(k in config for k in ("semantic_model_config", "acoustic_model_config", "quantization_dim")):
        return False  # transformers' Xcodec2Config, or X-Codec (v1), whose model_type is also "xcodec"
    return config.get("model_type") == "xcodec" or any(k in config for k in _ORIGINAL_CONFIG_KEYS)


# --------------------------------------------------------------------------------------------------
# Weight norm


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``g * v / ||v||`` with the norm over all dims but 0 (PyTorch's ``weight_norm(dim=0)``).

    Computed in float64 and rounded once to float32 (or to float64 for float64 inputs).
    """
    g, v = np.asarray(g), np.asarray(v)
    if g.shape != (v.shape[0],) + (1,) * (v.ndim - 1):
        raise ValueError(
            f"weight norm over dim 0 expects g of shape {(v.shape[0],) + (1,) * (v.ndim - 1)}, "
            f"got g {g.shape} for v {v.shape}"
        )
    out_dtype = np.float64 if np.float64 in (g.dtype, v.dtype) else np.float32
    v64 = v.astype(np.float64)
    norm = np.sqrt(np.sum(v64 * v64, axis=tuple(range(1, v.ndim)), keepdims=True))
    return (g.astype(np.float64) * (v64 / norm)).astype(out_dtype)


_WN_SUFFIXES = {
    ".weight_g": "g",
    ".weight_v": "v",
    ".parametrizations.weight.original0": "g",
    ".parametrizations.weight.original1": "v",
}


def _fold_all_weight_norms(state: Mapping[str, np.ndarray], problems: list[str]) -> dict[str, np.ndarray]:
    plain: dict[str, np.ndarray] = {}
    halves: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for key, value in state.items():
        for suffix, part in _WN_SUFFIXES.items():
            if key.endswith(suffix):
                halves.setdefault(key[: -len(suffix)], {})[part] = (key, value)
                break
        else:
            plain[key] = value
    for module, parts in halves.items():
        target = f"{module}.weight"
        if set(parts) != {"g", "v"}:
            ((key, value),) = parts.values()
            problems.append(f"{key} {tuple(np.shape(value))}: weight norm half without its partner")
            continue
        if target in plain:
            problems.append(f"{target}: stored both plain and weight-normed")
            continue
        try:
            plain[target] = fold_weight_norm(parts["g"][1], parts["v"][1])
        except ValueError as e:
            problems.append(f"{parts['g'][0]}: {e}")
    return plain


# --------------------------------------------------------------------------------------------------
# Key mapping


def _snake(prefix: str, rest: str):
    if rest == "act.alpha":
        return f"{prefix}.act.alpha"
    if rest == "act.bias":  # the original SnakeBeta calls its beta "bias"
        return f"{prefix}.act.beta"
    if rest in ("upsample.filter", "downsample.lowpass.filter"):
        return _DROP
    return None


def _conv(prefix: str, rest: str):
    return f"{prefix}.{rest}" if rest in ("weight", "bias") else None


_RES_UNIT = ("snake1", "conv1", "snake2", "conv2")


def _codec_enc(rest: str):
    if m := re.fullmatch(r"conv_blocks\.0\.(.+)", rest):
        return _conv("acoustic_encoder.conv1", m[1])
    if m := re.fullmatch(r"conv_blocks\.(\d+)\.block\.([012])\.block\.([0-3])\.(.+)", rest):
        name = f"acoustic_encoder.block.{int(m[1]) - 1}.res_unit{int(m[2]) + 1}.{_RES_UNIT[int(m[3])]}"
        return (_snake if int(m[3]) % 2 == 0 else _conv)(name, m[4])
    if m := re.fullmatch(r"conv_blocks\.(\d+)\.block\.3\.(.+)", rest):
        return _snake(f"acoustic_encoder.block.{int(m[1]) - 1}.snake1", m[2])
    if m := re.fullmatch(r"conv_blocks\.(\d+)\.block\.4\.(.+)", rest):
        return _conv(f"acoustic_encoder.block.{int(m[1]) - 1}.conv1", m[2])
    if m := re.fullmatch(r"conv_final_block\.0\.(.+)", rest):
        return _snake("acoustic_encoder.snake1", m[1])
    if m := re.fullmatch(r"conv_final_block\.1\.(.+)", rest):
        return _conv("acoustic_encoder.conv2", m[1])
    return None


def _semantic_model(rest: str):
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", rest):
        if int(m[1]) >= SEMANTIC_LAYERS_USED:
            return _DROP
        return f"semantic_encoder.encoder.layers.{m[1]}.{m[2]}"
    if rest.startswith(("adapter.", "intermediate_ffn.")):
        # Applied after the encoder, so never part of hidden_states[16].
        return _DROP
    if rest == "masked_spec_embed" or re.fullmatch(
        r"feature_projection\.(layer_norm|projection)\.(weight|bias)", rest
    ):
        return f"semantic_encoder.{rest}"
    return None


_ADAPTER = {
    "initial_conv.weight": "conv1.weight",
    "residual_blocks.1.weight": "conv2.weight",
    "residual_blocks.1.bias": "conv2.bias",
    "residual_blocks.3.weight": "conv3.weight",
    "residual_blocks.3.bias": "conv3.bias",
    "final_conv.weight": "conv4.weight",
}

_LAYER = {
    "att_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "att.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc2.weight": "mlp.fc2.weight",
}


def _generator(rest: str):
    if m := re.fullmatch(r"quantizer\.(project_in|project_out)\.(weight|bias)", rest):
        return f"quantizer.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"backbone\.embed\.(weight|bias)", rest):
        return f"acoustic_decoder.embed.{m[1]}"
    if m := re.fullmatch(r"backbone\.(prior_net|post_net)\.([01])\.((?:norm|conv)[12])\.(weight|bias)", rest):
        return f"acoustic_decoder.{m[1]}.{m[2]}.{m[3]}.{m[4]}"
    if m := re.fullmatch(r"backbone\.transformers\.(\d+)\.(.+)", rest):
        if m[2] in _LAYER:
            return f"acoustic_decoder.layers.{m[1]}.{_LAYER[m[2]]}"
        return None
    if m := re.fullmatch(r"backbone\.final_layer_norm\.(weight|bias)", rest):
        return f"acoustic_decoder.norm.{m[1]}"
    if m := re.fullmatch(r"head\.out\.(weight|bias)", rest):
        return f"acoustic_decoder.head.linear.{m[1]}"
    if rest == "head.istft.window" or re.fullmatch(
        r"quantizer\.(scales|layers\.0\.(_levels|_basis|implicit_codebook))", rest
    ):
        # Buffers (the FSQ ones are non-persistent in vector-quantize-pytorch 1.17.8, but older
        # versions may have stored them); the levels are read by config_from_original.
        return _DROP
    return None


def _map_key(key: str):
    """Transformers name for an original key, ``_DROP`` for keys the model does not use, else None."""
    head, _, rest = key.partition(".")
    if head == "semantic_model":
        return _semantic_model(rest)
    if head == "SemanticEncoder_module":
        return f"semantic_adapter.{_ADAPTER[rest]}" if rest in _ADAPTER else None
    if head == "CodecEnc":
        return _codec_enc(rest)
    if head == "generator":
        return _generator(rest)
    if head == "fc_prior" and rest in ("weight", "bias"):
        return f"fc_encoder.{rest}"
    if head == "fc_post_a" and rest in ("weight", "bias"):
        return f"acoustic_decoder.fc.{rest}"
    return None


_C_ATTN = re.compile(r"generator\.backbone\.transformers\.(\d+)\.att\.c_attn\.weight")


def original_to_transformers(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rewrite an original-release state dict (numpy arrays) into transformers' key names and layouts.

    Folds weight norm, splits the fused ``c_attn`` into ``q_proj``/``k_proj``/``v_proj``, renames
    everything else, and drops what the model never reads (w2v-BERT layers 16 and up, stored
    filter/window buffers). Strict: raises :class:`OriginalCheckpointError` listing every key it
    cannot place. Shapes are checked later, against the model, by ``convert_state_dict``.
    """
    problems: list[str] = []
    folded = _fold_all_weight_norms(state, problems)
    out: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}

    def put(new_key: str, value, old_key: str):
        if new_key in out:
            problems.append(f"{old_key}: maps to {new_key}, already filled by {source[new_key]}")
            return
        out[new_key] = value
        source[new_key] = old_key

    for key, value in folded.items():
        if m := _C_ATTN.fullmatch(key):
            value = np.asarray(value)
            if value.ndim != 2 or value.shape[0] % 3:
                problems.append(f"{key} {value.shape}: fused qkv needs 3*dim rows")
                continue
            base = f"acoustic_decoder.layers.{m[1]}.self_attn"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0), strict=True):
                put(f"{base}.{name}.weight", np.ascontiguousarray(part), key)
            continue
        new_key = _map_key(key)
        if new_key is _DROP:
            continue
        if new_key is None:
            problems.append(f"{key} {tuple(np.shape(value))}")
            continue
        put(new_key, value, key)

    if problems:
        raise OriginalCheckpointError(problems)
    return out


# --------------------------------------------------------------------------------------------------
# Config


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    if key not in state:
        return None
    value = state[key]
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _need(state: Mapping[str, Any], *keys: str) -> tuple[int, ...]:
    """Shape of the first of ``keys`` present (a conv's weight may be stored weight-normed)."""
    for key in keys:
        if (shape := _shape(state, key)) is not None:
            return shape
    raise ValueError(f"original checkpoint lacks {keys[0]}; cannot infer the model's shape")


def _conv_shape(state: Mapping[str, Any], module: str) -> tuple[int, ...] | None:
    suffixes = (".weight", ".weight_v", ".parametrizations.weight.original1")
    return next((s for suffix in suffixes if (s := _shape(state, module + suffix)) is not None), None)


def _indices(state: Mapping[str, Any], pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in state if (m := re.match(pattern, k))})


# The w2v-BERT 2.0 that modeling_xcodec2.py loads (facebook/w2v-bert-2.0), cut to the 16 layers it reads.
_W2V_BERT_2 = dict(
    hidden_size=1024,
    num_hidden_layers=SEMANTIC_LAYERS_USED,
    num_attention_heads=16,
    intermediate_size=4096,
    feature_projection_input_dim=160,
    left_max_position_embeddings=64,
    right_max_position_embeddings=8,
    conv_depthwise_kernel_size=31,
    position_embeddings_type="relative_key",
)


def _infer_from_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(top-level fields, semantic fields) that the weights' shapes determine."""
    top: dict[str, Any] = {}
    top["hidden_size"] = _need(state, "generator.backbone.embed.weight")[0]
    layers = _indices(state, r"generator\.backbone\.transformers\.(\d+)\.")
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"original checkpoint has decoder layers {layers}; expected 0..N-1")
    top["num_hidden_layers"] = len(layers)
    top["intermediate_size"] = _need(state, "generator.backbone.transformers.0.mlp.fc1.weight")[0]

    first = _conv_shape(state, "CodecEnc.conv_blocks.0")
    if first is None:
        raise ValueError("original checkpoint lacks CodecEnc.conv_blocks.0; cannot infer the model's shape")
    top["encoder_hidden_size"] = first[0]
    ratios = []
    while (shape := _conv_shape(state, f"CodecEnc.conv_blocks.{len(ratios) + 1}.block.4")) is not None:
        ratios.append(shape[2] // 2)  # EncoderBlock's conv: kernel_size = 2 * stride
    if not ratios:
        raise ValueError("original checkpoint has no CodecEnc encoder blocks")
    top["downsampling_ratios"] = ratios
    last = _conv_shape(state, "CodecEnc.conv_final_block.1")
    if last is not None and last[0] != top["hidden_size"]:
        raise ValueError(
            f"acoustic encoder width {last[0]} differs from decoder width {top['hidden_size']}; "
            "this model ties them (hidden_size)"
        )

    levels, top["quantization_dim"] = _need(state, "generator.quantizer.project_in.weight")
    stored = state.get("generator.quantizer.layers.0._levels")
    if stored is not None and hasattr(stored, "dtype"):
        top["quantization_levels"] = [int(n) for n in np.asarray(stored).reshape(-1)]
    else:
        top["quantization_levels"] = [4] * levels  # ResidualFSQ(levels=[4, 4, 4, 4, 4, 4, 4, 4])
        if levels != 8:
            warnings.warn(
                f"quantizer has {levels} dims, not the original 8; assuming levels of 4", stacklevel=3
            )

    sem: dict[str, Any] = {}
    sem["hidden_size"], sem["feature_projection_input_dim"] = _need(
        state, "semantic_model.feature_projection.projection.weight"
    )
    layer0 = "semantic_model.encoder.layers.0."
    sem["intermediate_size"] = _need(state, layer0 + "ffn1.intermediate_dense.weight")[0]
    sem["conv_depthwise_kernel_size"] = _need(state, layer0 + "conv_module.depthwise_conv.weight")[-1]
    # relative_key attention: one (left + right + 1, head_dim) table per layer.
    positions, head_dim = _need(state, layer0 + "self_attn.distance_embedding.weight")
    sem["num_attention_heads"] = sem["hidden_size"] // head_dim
    sem["position_table_rows"] = positions
    n_layers = len(_indices(state, r"semantic_model\.encoder\.layers\.(\d+)\."))
    if n_layers < SEMANTIC_LAYERS_USED:
        raise ValueError(
            f"w2v-BERT has {n_layers} layers; X-Codec2 reads hidden_states[{SEMANTIC_LAYERS_USED}]"
        )
    return top, sem


def config_from_original(
    config: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``Xcodec2Config.from_dict`` describing an original-release model.

    The original code hardcodes its shapes (``CodecEncoder_Transformer()``, ``CodecDecoderVocos()``:
    width 1024, 12 layers, 16 heads, ``ngf`` 48, ratios (2, 2, 4, 4, 5), FSQ levels [4]*8; w2v-BERT
    2.0), and its ``config.json`` (``BigCodecConfig``) carries only ``semantic_hidden_size``,
    ``codec_encoder_hidden_size``, ``codec_decoder_hidden_size`` and ``use_vocos``, of which the code
    reads only the first. So:

    - with ``state`` (a state dict, or a mapping of key -> shape) every size the weights determine is
      read from them (decoder width, depth and MLP size; encoder width and ratios; quantizer width and
      number of levels; w2v-BERT width, heads, MLP size, kernel size), and the ``config.json`` sizes
      are cross-checked against them;
    - without it, ``codec_decoder_hidden_size`` and ``semantic_hidden_size`` set the widths (as
      transformers' converter does) and the rest are the hardcoded defaults; missing keys warn.

    What neither determines keeps the original's hardcoded value: 16 decoder heads, levels of 4, the
    64/8 relative-position window. ``overrides`` (top-level fields, or a ``semantic_model_config``
    dict merged into the inferred one) win over everything.
    """
    config = dict(config or {})
    semantic = dict(_W2V_BERT_2)
    semantic.update(overrides.pop("semantic_model_config", None) or {})
    if config.get("codec_encoder_hidden_size", 1024) != config.get("codec_decoder_hidden_size", 1024):
        raise ValueError(
            "codec_encoder_hidden_size and codec_decoder_hidden_size differ; the acoustic encoder output "
            "and the decoder share one width (hidden_size) in this model"
        )

    if state is None:
        missing = [k for k in ("codec_decoder_hidden_size", "semantic_hidden_size") if k not in config]
        if missing:
            warnings.warn(
                f"original config.json lacks {missing}; using the original code's 1024", stacklevel=2
            )
        top = {"hidden_size": config.get("codec_decoder_hidden_size", 1024)}
        semantic["hidden_size"] = config.get("semantic_hidden_size", semantic["hidden_size"])
        top["quantization_dim"] = top["hidden_size"] + semantic["hidden_size"]
    else:
        top, inferred = _infer_from_state(state)
        rows = inferred.pop("position_table_rows")
        semantic.update(inferred)
        window = semantic["left_max_position_embeddings"] + semantic["right_max_position_embeddings"] + 1
        if rows != window:
            raise ValueError(
                f"w2v-BERT relative position table has {rows} rows, not left + right + 1 = {window}; "
                "pass semantic_model_config=dict(left_max_position_embeddings=L, "
                "right_max_position_embeddings=R)"
            )
        if config.get("semantic_hidden_size", semantic["hidden_size"]) != semantic["hidden_size"]:
            raise ValueError(
                f"config.json semantic_hidden_size={config['semantic_hidden_size']} but the w2v-BERT "
                f"weights have width {semantic['hidden_size']}"
            )
        for name in ("codec_decoder_hidden_size", "codec_encoder_hidden_size"):
            if config.get(name, top["hidden_size"]) != top["hidden_size"]:
                warnings.warn(
                    f"config.json {name}={config[name]} but the weights have width {top['hidden_size']} "
                    "(the original code ignores this field); using the weights",
                    stacklevel=2,
                )

    out: dict[str, Any] = {"num_hidden_layers": 12, "intermediate_size": 4 * top["hidden_size"]}
    out.update(top)
    out["num_attention_heads"] = 16  # CodecDecoderVocos(heads=16); the weights cannot tell
    out.update(overrides)
    heads = out["num_attention_heads"]
    out.setdefault("num_key_value_heads", heads)
    if "head_dim" not in overrides:
        if out["hidden_size"] % heads:
            raise ValueError(f"hidden_size {out['hidden_size']} is not divisible by {heads} heads")
        out["head_dim"] = out["hidden_size"] // heads
    semantic["model_type"] = "wav2vec2-bert"
    out["semantic_model_config"] = semantic
    return out
