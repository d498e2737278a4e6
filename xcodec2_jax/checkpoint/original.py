"""Checkpoints of the original X-Codec2 release (HF ``HKUSTAudio/xcodec2``, PyPI ``xcodec2``), numpy only.

The original ``model.safetensors`` names its modules after the training code: ``semantic_model``
(all 24 layers of w2v-BERT 2.0), ``SemanticEncoder_module``, ``CodecEnc`` (weight-normed convs),
``generator`` (quantizer, Vocos backbone with a fused ``c_attn`` projection, ISTFT head),
``fc_prior`` and ``fc_post_a``. :func:`to_transformers` rewrites such a state dict into transformers'
naming (one table, :data:`PATTERNS`), which the transformers mapping then places on the Flax tree,
so both formats share one strict loader.

What the rewrite has to know about the original code (``modeling_xcodec2.py`` and ``vq/``):

- It reads ``semantic_model(...).hidden_states[16]``: the output of the first 16 conformer layers,
  with no norm after them (w2v-BERT has no final encoder norm), i.e. the ``last_hidden_state`` of
  a 16-layer model. Layers 16 and up never influence the codes and are dropped unread.
- ``CodecEnc`` convs use weight norm over dim 0: ``w = g * v / ||v||`` with the norm over every
  dim but the first. Checkpoints store either ``weight_g``/``weight_v`` (``torch.nn.utils.weight_norm``:
  the Hub's ``model.safetensors``, which transformers' converter loads through that legacy API) or
  ``parametrizations.weight.original0``/``original1`` (``torch.nn.utils.parametrizations``, the 0.1.5
  code's modules and fine-tunes saved from them).
- SnakeBeta's log-magnitude is ``act.beta`` in the Hub's file (transformers' converter passes it
  through unchanged into a strict ``load_state_dict``) and ``act.bias`` in the 0.1.5 code's
  ``SnakeBeta``. Either is accepted; a module holding both is an error.
- The decoder's fused ``c_attn`` rows are ``(r h d)``: q, k, v one after the other, each head-major.
  Its RoPE (torchtune's, given ``(b, h, t, d)`` where it expects ``(b, s, h, d)``) rotates by head
  index, the same angle for q and k of a head, so q·k does not change and the rotation is a no-op;
  transformers' port keeps a head-indexed RoPE with the same no-op effect. A plain row split is
  therefore exact for both. transformers' converter also permutes q and k rows within each head (for
  its half-split rotation layout); applied to q and k alike that permutation leaves q·k unchanged
  too, so it is not needed here.
- Anti-aliasing filters and the ISTFT window are stored buffers, recomputed by the model, and dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .io import Tensor

DROP = "<drop>"


class SplitQKV(str):
    """A replacement naming ``q_proj``/``k_proj``/``v_proj`` (``{}``): the fused rows are split in three."""


class OriginalCheckpointError(ValueError):
    """An original-format checkpoint holds keys that cannot be mapped (all listed in one message)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = [f"original X-Codec2 checkpoint: {len(self.problems)} key(s) could not be mapped:"]
        lines += [f"    {p}" for p in self.problems]
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------------
# The mapping: one table, tried in order, the first full match wins. A replacement is a template
# (``\1`` groups), a function of the match (index arithmetic), DROP (not used by the model), or a
# SplitQKV template. Keys are matched after weight norm is folded, so a conv's weight is ``.weight``.


def _snake_param(name: str) -> str:
    return "alpha" if name == "alpha" else "beta"  # "bias" in the 0.1.5 code's SnakeBeta


def _enc_block(m: re.Match) -> str:
    return f"acoustic_encoder.block.{int(m[1]) - 1}"


_RES = r"CodecEnc\.conv_blocks\.(\d+)\.block\.([012])\.block"
_ACT = r"act\.(alpha|beta|bias)"
_WB = r"(weight|bias)"

PATTERNS: tuple[tuple[str, str | Callable[[re.Match], str]], ...] = (
    # w2v-BERT: the 16 layers X-Codec2 reads, its input projection; the rest is never used.
    (r"semantic_model\.encoder\.layers\.(?:1[6-9]|[2-9]\d|\d{3,})\..+", DROP),
    (r"semantic_model\.encoder\.layers\.(\d+)\.(.+)", r"semantic_encoder.encoder.layers.\1.\2"),
    (
        r"semantic_model\.(feature_projection\.(?:layer_norm|projection)\.(?:weight|bias))",
        r"semantic_encoder.\1",
    ),
    (r"semantic_model\.(masked_spec_embed)", r"semantic_encoder.\1"),  # training only; ignored later
    # Semantic adapter: residual_blocks = (ReLU, conv, ReLU, conv).
    (r"SemanticEncoder_module\.initial_conv\.weight", "semantic_adapter.conv1.weight"),
    (rf"SemanticEncoder_module\.residual_blocks\.1\.{_WB}", r"semantic_adapter.conv2.\1"),
    (rf"SemanticEncoder_module\.residual_blocks\.3\.{_WB}", r"semantic_adapter.conv3.\1"),
    (r"SemanticEncoder_module\.final_conv\.weight", "semantic_adapter.conv4.weight"),
    # Acoustic encoder: conv_blocks = (conv, EncoderBlock...), EncoderBlock.block = (3 ResidualUnits,
    # snake, strided conv), ResidualUnit.block = (snake, conv, snake, conv).
    (r"CodecEnc\..+\.(?:upsample\.filter|downsample\.lowpass\.filter)", DROP),
    (rf"CodecEnc\.conv_blocks\.0\.{_WB}", r"acoustic_encoder.conv1.\1"),
    (
        rf"{_RES}\.([02])\.{_ACT}",
        lambda m: (
            f"{_enc_block(m)}.res_unit{int(m[2]) + 1}.snake{int(m[3]) // 2 + 1}.act.{_snake_param(m[4])}"
        ),
    ),
    (
        rf"{_RES}\.([13])\.{_WB}",
        lambda m: f"{_enc_block(m)}.res_unit{int(m[2]) + 1}.conv{int(m[3]) // 2 + 1}.{m[4]}",
    ),
    (
        rf"CodecEnc\.conv_blocks\.(\d+)\.block\.3\.{_ACT}",
        lambda m: f"{_enc_block(m)}.snake1.act.{_snake_param(m[2])}",
    ),
    (rf"CodecEnc\.conv_blocks\.(\d+)\.block\.4\.{_WB}", lambda m: f"{_enc_block(m)}.conv1.{m[2]}"),
    (
        rf"CodecEnc\.conv_final_block\.0\.{_ACT}",
        lambda m: f"acoustic_encoder.snake1.act.{_snake_param(m[1])}",
    ),
    (rf"CodecEnc\.conv_final_block\.1\.{_WB}", r"acoustic_encoder.conv2.\1"),
    # Quantizer and decoder (generator = quantizer + Vocos backbone + ISTFT head).
    (rf"generator\.quantizer\.(project_in|project_out)\.{_WB}", r"quantizer.\1.\2"),
    (rf"generator\.backbone\.embed\.{_WB}", r"acoustic_decoder.embed.\1"),
    (
        r"generator\.backbone\.(prior_net|post_net)\.([01])\.((?:norm|conv)[12]\.(?:weight|bias))",
        r"acoustic_decoder.\1.\2.\3",
    ),
    (
        r"generator\.backbone\.transformers\.(\d+)\.att\.c_attn\.weight",
        SplitQKV(r"acoustic_decoder.layers.\1.self_attn.{}_proj.weight"),
    ),
    (
        r"generator\.backbone\.transformers\.(\d+)\.att\.c_proj\.weight",
        r"acoustic_decoder.layers.\1.self_attn.o_proj.weight",
    ),
    (
        r"generator\.backbone\.transformers\.(\d+)\.att_norm\.weight",
        r"acoustic_decoder.layers.\1.input_layernorm.weight",
    ),
    (
        r"generator\.backbone\.transformers\.(\d+)\.ffn_norm\.weight",
        r"acoustic_decoder.layers.\1.post_attention_layernorm.weight",
    ),
    (
        r"generator\.backbone\.transformers\.(\d+)\.mlp\.(fc[12])\.weight",
        r"acoustic_decoder.layers.\1.mlp.\2.weight",
    ),
    (rf"generator\.backbone\.final_layer_norm\.{_WB}", r"acoustic_decoder.norm.\1"),
    (rf"generator\.head\.out\.{_WB}", r"acoustic_decoder.head.linear.\1"),
    (r"generator\.head\.istft\.window", DROP),
    (rf"fc_prior\.{_WB}", r"fc_encoder.\1"),
    (rf"fc_post_a\.{_WB}", r"acoustic_decoder.fc.\1"),
)
_COMPILED = tuple((re.compile(p), r) for p, r in PATTERNS)


def match_key(key: str) -> tuple[int, re.Match] | None:
    """(row of :data:`PATTERNS`, match) of the first pattern matching ``key``, or None."""
    for i, (pattern, _) in enumerate(_COMPILED):
        if m := pattern.fullmatch(key):
            return i, m
    return None


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


WN_SUFFIXES = {
    ".weight_g": "g",
    ".weight_v": "v",
    ".parametrizations.weight.original0": "g",
    ".parametrizations.weight.original1": "v",
}


def _folded(g: Tensor, v: Tensor) -> Tensor:
    def release():
        g.release()
        v.release()

    dtype = np.float64 if np.float64 in (g.dtype, v.dtype) else np.float32
    return Tensor(v.shape, dtype, lambda: fold_weight_norm(g.load(), v.load()), release)


def _fold_all_weight_norms(state: Mapping[str, Tensor], problems: list[str]) -> dict[str, Tensor]:
    plain: dict[str, Tensor] = {}
    halves: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key, value in state.items():
        for suffix, part in WN_SUFFIXES.items():
            if key.endswith(suffix):
                parts = halves.setdefault(key[: -len(suffix)], {})
                if part in parts:
                    problems.append(f"{key}: weight norm {part} stored twice (also as {parts[part][0]})")
                parts[part] = (key, value)
                break
        else:
            plain[key] = value
    for module, parts in halves.items():
        target = f"{module}.weight"
        if set(parts) != {"g", "v"}:
            ((key, value),) = parts.values()
            problems.append(f"{key} {value.shape}: weight norm half without its partner")
            continue
        if target in plain:
            problems.append(f"{target}: stored both plain and weight-normed")
            continue
        (gk, g), (_, v) = parts["g"], parts["v"]
        if g.shape != (v.shape[0],) + (1,) * (len(v.shape) - 1):
            problems.append(
                f"{gk} {g.shape}: weight norm over dim 0 needs g of shape (out, 1, ...) for v {v.shape}"
            )
            continue
        plain[target] = _folded(g, v)
    return plain


def _rows(fused: Tensor, i: int, rows: int) -> Tensor:
    return Tensor(
        (rows,) + fused.shape[1:], fused.dtype, lambda: fused.load()[i * rows : (i + 1) * rows], fused.release
    )


def to_transformers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rewrite original-release :class:`Tensor` s into transformers' key names and layouts, lazily.

    Folds weight norm, splits the fused ``c_attn`` into ``q_proj``/``k_proj``/``v_proj``, renames by
    :data:`PATTERNS`, and drops what the model never reads. Strict: raises
    :class:`OriginalCheckpointError` listing every key it cannot place. Shapes are checked later,
    against the model, by the transformers mapping.
    """
    problems: list[str] = []
    folded = _fold_all_weight_norms(state, problems)
    out: dict[str, Tensor] = {}
    source: dict[str, str] = {}

    def put(new_key: str, value: Tensor, old_key: str):
        if new_key in out:
            problems.append(f"{old_key}: maps to {new_key}, already filled by {source[new_key]}")
            return
        out[new_key] = value
        source[new_key] = old_key

    for key, value in folded.items():
        found = match_key(key)
        if found is None:
            problems.append(f"{key} {value.shape}")
            continue
        row, m = found
        replacement = PATTERNS[row][1]
        if replacement is DROP:
            continue
        if isinstance(replacement, SplitQKV):
            if len(value.shape) != 2 or value.shape[0] % 3:
                problems.append(f"{key} {value.shape}: fused qkv needs 3*dim rows")
                continue
            rows = value.shape[0] // 3
            for i, name in enumerate(("q", "k", "v")):
                put(m.expand(replacement).format(name), _rows(value, i, rows), key)
            continue
        put(replacement(m) if callable(replacement) else m.expand(replacement), value, key)

    if problems:
        raise OriginalCheckpointError(problems)
    return out


def original_to_transformers(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """:func:`to_transformers` on an in-memory state dict (numpy arrays in, numpy arrays out)."""
    out = to_transformers({k: Tensor.of(v) for k, v in state.items()})
    return {k: np.ascontiguousarray(t.load()) for k, t in out.items()}
