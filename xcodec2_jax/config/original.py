"""The config of an original-release checkpoint. Its ``config.json`` (``BigCodecConfig``) carries almost
no shapes and the code hardcodes the rest, so every size the weights determine is read off the
tensors' shapes (from the safetensors header: no tensor is read)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

# hidden_states index that modeling_xcodec2.py reads from the w2v-BERT.
SEMANTIC_LAYERS_USED = 16

ORIGINAL_PREFIXES = (
    "semantic_model.",
    "SemanticEncoder_module.",
    "CodecEnc.",
    "generator.",
    "fc_prior.",
    "fc_post_a.",
)


def is_original_format(keys) -> bool:
    """True if checkpoint keys are those of the original release (``CodecEnc.``, ``generator.``, ...)."""
    return any(k.startswith(ORIGINAL_PREFIXES) for k in keys)


def _shape(shapes: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    if key not in shapes:
        return None
    value = shapes[key]
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _need(shapes: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if (shape := _shape(shapes, key)) is not None:
        return shape
    raise ValueError(f"original checkpoint lacks {key}; cannot infer the model's shape")


def _conv_shape(shapes: Mapping[str, Any], module: str) -> tuple[int, ...] | None:
    """A conv's weight shape, whichever way it is stored (plain or either weight-norm layout)."""
    suffixes = (".weight", ".weight_v", ".parametrizations.weight.original1")
    return next((s for suffix in suffixes if (s := _shape(shapes, module + suffix)) is not None), None)


def _indices(shapes: Mapping[str, Any], pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in shapes if (m := re.match(pattern, k))})


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


def _infer(shapes: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(top-level fields, semantic fields) that the weights' shapes determine."""
    top: dict[str, Any] = {}
    top["hidden_size"] = _need(shapes, "generator.backbone.embed.weight")[0]
    layers = _indices(shapes, r"generator\.backbone\.transformers\.(\d+)\.")
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"original checkpoint has decoder layers {layers}; expected 0..N-1")
    top["num_hidden_layers"] = len(layers)
    top["intermediate_size"] = _need(shapes, "generator.backbone.transformers.0.mlp.fc1.weight")[0]

    first = _conv_shape(shapes, "CodecEnc.conv_blocks.0")
    if first is None:
        raise ValueError("original checkpoint lacks CodecEnc.conv_blocks.0; cannot infer the model's shape")
    top["encoder_hidden_size"] = first[0]
    ratios = []
    while (shape := _conv_shape(shapes, f"CodecEnc.conv_blocks.{len(ratios) + 1}.block.4")) is not None:
        ratios.append(shape[2] // 2)  # EncoderBlock's conv: kernel_size = 2 * stride
    if not ratios:
        raise ValueError("original checkpoint has no CodecEnc encoder blocks")
    top["downsampling_ratios"] = ratios
    last = _conv_shape(shapes, "CodecEnc.conv_final_block.1")
    if last is not None and last[0] != top["hidden_size"]:
        raise ValueError(
            f"acoustic encoder width {last[0]} differs from decoder width {top['hidden_size']}; "
            "this model ties them (hidden_size)"
        )

    levels, top["quantization_dim"] = _need(shapes, "generator.quantizer.project_in.weight")
    # ResidualFSQ(levels=[4] * 8); vector-quantize-pytorch keeps the levels in a non-persistent buffer.
    top["quantization_levels"] = [4] * levels
    if levels != 8:
        warnings.warn(f"quantizer has {levels} dims, not the original 8; assuming levels of 4", stacklevel=3)

    sem: dict[str, Any] = {}
    sem["hidden_size"], sem["feature_projection_input_dim"] = _need(
        shapes, "semantic_model.feature_projection.projection.weight"
    )
    layer0 = "semantic_model.encoder.layers.0."
    sem["intermediate_size"] = _need(shapes, layer0 + "ffn1.intermediate_dense.weight")[0]
    sem["conv_depthwise_kernel_size"] = _need(shapes, layer0 + "conv_module.depthwise_conv.weight")[-1]
    # relative_key attention: one (left + right + 1, head_dim) table per layer.
    positions, head_dim = _need(shapes, layer0 + "self_attn.distance_embedding.weight")
    sem["num_attention_heads"] = sem["hidden_size"] // head_dim
    sem["position_table_rows"] = positions
    n_layers = len(_indices(shapes, r"semantic_model\.encoder\.layers\.(\d+)\."))
    if n_layers < SEMANTIC_LAYERS_USED:
        raise ValueError(
            f"w2v-BERT has {n_layers} layers; X-Codec2 reads hidden_states[{SEMANTIC_LAYERS_USED}]"
        )
    return top, sem


# long: a 20-line docstring of what the weights can and cannot tell
def config_from_original(
    config: Mapping[str, Any] | None = None,
    shapes: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``Xcodec2Config.from_dict`` describing an original-release model.

    The original code hardcodes its shapes (``CodecEncoder_Transformer()``, ``CodecDecoderVocos()``:
    width 1024, 12 layers, 16 heads, ``ngf`` 48, ratios (2, 2, 4, 4, 5), FSQ levels [4]*8; w2v-BERT
    2.0), and its ``config.json`` (``BigCodecConfig``) carries only ``semantic_hidden_size``,
    ``codec_encoder_hidden_size``, ``codec_decoder_hidden_size`` and ``use_vocos``, of which the code
    reads only the first. So:

    - with ``shapes`` (key -> shape, or key -> anything with ``.shape``: a state dict, the header's
      tensors) every size the weights determine is read from them (decoder width, depth and MLP size;
      encoder width and ratios; quantizer width and number of levels; w2v-BERT width, heads, MLP
      size, kernel size), and the ``config.json`` sizes are cross-checked against them;
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

    if shapes is None:
        missing = [k for k in ("codec_decoder_hidden_size", "semantic_hidden_size") if k not in config]
        if missing:
            warnings.warn(
                f"original config.json lacks {missing}; using the original code's 1024", stacklevel=2
            )
        top = {"hidden_size": config.get("codec_decoder_hidden_size", 1024)}
        semantic["hidden_size"] = config.get("semantic_hidden_size", semantic["hidden_size"])
        top["quantization_dim"] = top["hidden_size"] + semantic["hidden_size"]
    else:
        top, inferred = _infer(shapes)
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
