"""The ORIGINAL X-Codec2 release's modules (vendored in ``tests/_original_xcodec2``), small and random.

The hub is out of reach and the real model is large, so this builds the original ``XCodec2Model``
with its own classes (``CodecEncoder_Transformer``, ``CodecDecoderVocos``, ``SemanticEncoder``,
transformers' ``Wav2Vec2BertModel``) at a small size (``ORIGINAL_SMALL``), keeping the original's
``forward``/``encode_code``/``decode_code`` untouched. Only ``__init__`` is replaced: the original one
downloads ``facebook/w2v-bert-2.0`` and hardcodes full-size modules.

Weights are randomised so that a wrong mapping cannot hide: codes spread (quantizer ``project_in``
x50), SnakeBeta alpha/beta from U(-0.5, 0.5), every conv bias random (the original init zeroes them),
every norm's affine parameters perturbed, and weight-norm magnitudes g set away from ||v||.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import types
import warnings

import numpy as np

# Small shapes for the original modules. hop = 4 * 8 * 10 = 320, as the 50 Hz w2v-BERT frames need.
# The w2v-BERT keeps all 24 layers, as in the release, although X-Codec2 reads only the first 16; its
# relative-position window stays at w2v-BERT 2.0's 64/8.
ORIGINAL_SMALL = dict(
    hidden=64,  # CodecDecoderVocos hidden_dim = CodecEncoder_Transformer hidden_dim
    depth=2,  # decoder transformer blocks
    heads=4,  # decoder heads (head dim 16 = the RoPE's pos_meb_dim)
    ngf=8,
    up_ratios=(4, 8, 10),
    semantic_hidden=32,
    semantic_layers=24,
    semantic_heads=4,
    semantic_intermediate=48,
    semantic_conv_kernel=15,
)


def xcodec2_config_kwargs(shape: dict = ORIGINAL_SMALL) -> dict:
    """Our ``Xcodec2Config`` fields for the original modules built with ``shape``."""
    return dict(
        hidden_size=shape["hidden"],
        intermediate_size=4 * shape["hidden"],  # bs_roformer5.MLP: 4 * dim
        num_hidden_layers=shape["depth"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        head_dim=shape["hidden"] // shape["heads"],
        encoder_hidden_size=shape["ngf"],
        downsampling_ratios=list(shape["up_ratios"]),
        quantization_dim=shape["hidden"] + shape["semantic_hidden"],
        quantization_levels=[4] * 8,  # ResidualFSQ(levels=[4, 4, 4, 4, 4, 4, 4, 4])
        semantic_model_config=dict(
            model_type="wav2vec2-bert",
            hidden_size=shape["semantic_hidden"],
            num_hidden_layers=16,  # hidden_states[16]
            num_attention_heads=shape["semantic_heads"],
            intermediate_size=shape["semantic_intermediate"],
            conv_depthwise_kernel_size=shape["semantic_conv_kernel"],
        ),
    )


@contextlib.contextmanager
def _import_stubs():
    """``torchtune.modules`` (the real RoPE class, copied) and an empty ``torchaudio``, only while importing.

    The real torchtune needs torchao to import; torchaudio is imported by ``vq/bs_roformer5.py`` but
    never used. Everything else the vendored code imports is imported first, outside the stubs (so
    that transformers' availability probes never see the fake torchaudio), and the previous
    ``sys.modules`` entries are restored afterwards.
    """
    import importlib.machinery

    import einops  # noqa: F401
    import transformers
    import vector_quantize_pytorch  # noqa: F401

    for name in ("PretrainedConfig", "PreTrainedModel", "AutoFeatureExtractor", "Wav2Vec2BertModel"):
        getattr(transformers, name)
    from _original_xcodec2 import _torchtune_rope

    def stub(name):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        return module

    torchtune, modules = stub("torchtune"), stub("torchtune.modules")
    modules.RotaryPositionalEmbeddings = _torchtune_rope.RotaryPositionalEmbeddings
    torchtune.modules = modules
    stubs = {"torchtune": torchtune, "torchtune.modules": modules, "torchaudio": stub("torchaudio")}
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@functools.cache
def original_modules() -> types.SimpleNamespace:
    """The vendored original modules, imported once."""
    with _import_stubs():
        from _original_xcodec2 import configuration_bigcodec, modeling_xcodec2
        from _original_xcodec2.vq import activations, bs_roformer5, codec_decoder_vocos, codec_encoder, module
    return types.SimpleNamespace(
        BigCodecConfig=configuration_bigcodec.BigCodecConfig,
        XCodec2Model=modeling_xcodec2.XCodec2Model,
        CodecEncoder_Transformer=codec_encoder.CodecEncoder_Transformer,
        CodecDecoderVocos=codec_decoder_vocos.CodecDecoderVocos,
        codec_decoder_vocos=codec_decoder_vocos,
        SemanticEncoder=module.SemanticEncoder,
        SnakeBeta=activations.SnakeBeta,
        RMSNorm=bs_roformer5.RMSNorm,
        Attention=bs_roformer5.Attention,
        RotaryPositionalEmbeddings=bs_roformer5.RotaryPositionalEmbeddings,
    )


@functools.cache
def _small_model_class():
    from transformers import (
        PreTrainedModel,
        SeamlessM4TFeatureExtractor,
        Wav2Vec2BertConfig,
        Wav2Vec2BertModel,
    )

    orig = original_modules()

    class SmallXCodec2Model(orig.XCodec2Model):
        """The original XCodec2Model; only ``__init__`` differs (small modules, nothing downloaded)."""

        def __init__(self, config, shape: dict):
            import torch.nn as nn

            PreTrainedModel.__init__(self, config)
            semantic = Wav2Vec2BertConfig(
                hidden_size=shape["semantic_hidden"],
                num_hidden_layers=shape["semantic_layers"],
                num_attention_heads=shape["semantic_heads"],
                intermediate_size=shape["semantic_intermediate"],
                conv_depthwise_kernel_size=shape["semantic_conv_kernel"],
                position_embeddings_type="relative_key",
                left_max_position_embeddings=64,
                right_max_position_embeddings=8,
                feature_projection_input_dim=160,
                output_hidden_states=True,  # as from_pretrained(..., output_hidden_states=True)
            )
            self.semantic_model = Wav2Vec2BertModel(semantic)
            self.semantic_model.eval()
            h = config.semantic_hidden_size
            self.SemanticEncoder_module = orig.SemanticEncoder(h, h, h)
            self.CodecEnc = orig.CodecEncoder_Transformer(
                ngf=shape["ngf"], up_ratios=list(shape["up_ratios"]), hidden_dim=shape["hidden"]
            )
            self.generator = orig.CodecDecoderVocos(
                hidden_dim=shape["hidden"],
                depth=shape["depth"],
                heads=shape["heads"],
                pos_meb_dim=shape["hidden"] // shape["heads"],
                hop_length=math.prod(shape["up_ratios"]),
                vq_dim=shape["hidden"] + h,
            )
            self.fc_prior = nn.Linear(shape["hidden"] + h, shape["hidden"] + h)
            self.fc_post_a = nn.Linear(shape["hidden"] + h, shape["hidden"])
            # facebook/w2v-bert-2.0's preprocessor_config.json.
            self.feature_extractor = SeamlessM4TFeatureExtractor(
                feature_size=80, num_mel_bins=80, padding_value=1.0, sampling_rate=16000, stride=2
            )

    return SmallXCodec2Model


def _spread_weights_(model, seed: int) -> None:
    import torch
    import torch.nn as nn
    from torch.nn.utils import parametrize

    orig = original_modules()
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, scale=1.0, offset=0.0):
        return offset + scale * torch.rand(shape, generator=gen)

    def randn(shape, scale=1.0):
        return scale * torch.randn(shape, generator=gen)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, orig.SnakeBeta):
                m.alpha.copy_(rand(m.alpha.shape, offset=-0.5))
                m.bias.copy_(rand(m.bias.shape, offset=-0.5))
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, orig.RMSNorm)):
                m.weight.add_(randn(m.weight.shape, 0.1))
                if getattr(m, "bias", None) is not None:
                    m.bias.add_(randn(m.bias.shape, 0.05))
            elif isinstance(m, nn.Conv1d):
                if m.bias is not None:
                    m.bias.copy_(randn(m.bias.shape, 0.02))
                if parametrize.is_parametrized(m, "weight"):
                    g = m.parametrizations.weight.original0
                    v = m.parametrizations.weight.original1
                    norm = v.flatten(1).norm(dim=1).view_as(g)
                    g.copy_(norm * rand(g.shape, offset=0.5))
        model.generator.quantizer.project_in.weight.mul_(50.0)


def build_original(seed: int = 0, shape: dict = ORIGINAL_SMALL):
    """The original XCodec2Model at ``shape``, random (see module doc), in eval mode.

    Its ``CodecEnc`` convs carry weight norm as the release's ``vq/module.py`` builds them
    (``torch.nn.utils.parametrizations.weight_norm``: ``parametrizations.weight.original0/1``).
    """
    import torch

    orig = original_modules()
    torch.manual_seed(seed)
    config = orig.BigCodecConfig(
        semantic_hidden_size=shape["semantic_hidden"],
        codec_encoder_hidden_size=shape["hidden"],
        codec_decoder_hidden_size=shape["hidden"],
    )
    model = _small_model_class()(config, shape).eval()
    _spread_weights_(model, seed)
    return model


def legacy_weight_norm_copy(model, shape: dict = ORIGINAL_SMALL):
    """A copy of ``model`` whose weight-normed convs use ``torch.nn.utils.weight_norm`` (``weight_g`` /
    ``weight_v``) with the same g and v: the layout of the Hub's ``HKUSTAudio/xcodec2`` checkpoint.

    Built afresh and loaded rather than deep-copied: a deep copy shares the dynamically created
    ``ParametrizedConv1d`` classes, and removing a parametrization from the copy breaks the original.
    """
    import torch
    from torch.nn.utils import parametrize

    legacy = _small_model_class()(model.config, shape).eval()
    legacy.load_state_dict(model.state_dict(), strict=True)
    for m in legacy.modules():
        if parametrize.is_parametrized(m, "weight"):
            g = m.parametrizations.weight.original0.detach().clone()
            v = m.parametrizations.weight.original1.detach().clone()
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecated, but what the Hub file used
                torch.nn.utils.weight_norm(m, name="weight", dim=0)
            with torch.no_grad():
                m.weight_g.copy_(g)
                m.weight_v.copy_(v)
    return legacy


def save_original(model, path: str, snake: str = "bias") -> None:
    """The model's full state dict (all 24 w2v-BERT layers, buffers included) as safetensors.

    ``snake="bias"`` keeps SnakeBeta's log-magnitude under the 0.1.5 code's own name
    (``act.bias``); ``snake="beta"`` renames it ``act.beta``, as in the Hub's ``model.safetensors``
    (transformers' converter passes ``act.beta`` through to its ``SnakeBeta.beta`` unchanged). With
    :func:`legacy_weight_norm_copy` (``weight_g``/``weight_v``) and ``snake="beta"`` this is the Hub
    file's layout.
    """
    from safetensors.torch import save_file

    if snake not in ("bias", "beta"):
        raise ValueError(f"snake must be 'bias' or 'beta', got {snake!r}")
    state = {}
    for k, v in model.state_dict().items():
        if snake == "beta" and k.endswith(".act.bias"):
            k = k[: -len("bias")] + "beta"
        state[k] = v.detach().contiguous()
    save_file(state, path)


def original_encode(model, audio: np.ndarray):
    """The original ``encode_code`` on one utterance, with the inputs it built for its sub-modules.

    Returns ``(codes (1, 1, N) int, input_values (1, 1, T) padded audio, input_features (1, N, 160))``,
    the last two captured where the original hands them to ``CodecEnc`` and ``semantic_model``.
    """
    import torch

    captured = {}

    def grab(name):
        def hook(_module, args):
            captured[name] = args[0].detach().numpy().copy()

        return hook

    handles = [
        model.semantic_model.register_forward_pre_hook(grab("input_features")),
        model.CodecEnc.register_forward_pre_hook(grab("input_values")),
    ]
    try:
        with torch.no_grad():
            codes = model.encode_code(torch.from_numpy(np.asarray(audio, np.float32))[None])
    finally:
        for h in handles:
            h.remove()
    return codes.numpy(), captured["input_values"], captured["input_features"]


def original_decode(model, codes: np.ndarray) -> np.ndarray:
    """The original ``decode_code``: codes (B, 1, N) -> audio (B, 1, N * hop)."""
    import torch

    with torch.no_grad():
        return model.decode_code(torch.from_numpy(np.asarray(codes)).long()).numpy()
