"""The ORIGINAL X-Codec2 release's modules, small and random.

The original code is not in the repository: :func:`original_source` downloads the PyPI sdist
``xcodec2==0.1.5`` and, for the RoPE it imports, the wheel ``torchtune==0.6.1`` (both pinned by
sha256) at first use, and extracts the files it needs, unchanged, into a per-user cache
(``$XCODEC2_JAX_TEST_CACHE``, else ``~/.cache/xcodec2_jax_tests``); later runs download nothing. The
original code also needs ``vector-quantize-pytorch`` (its ``ResidualFSQ`` is the quantizer, called for
real) and ``einops``, both in the ``test`` extra.

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
import hashlib
import importlib.machinery
import importlib.util
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import warnings
import zipfile

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


# ---------------------------------------------------------------------------------------------------
# The original release's source, fetched from PyPI at first use (pinned by sha256) and cached.
# ---------------------------------------------------------------------------------------------------

CACHE_ENV = "XCODEC2_JAX_TEST_CACHE"

# The PyPI sdist of the X-Codec2 release that ``HKUSTAudio/xcodec2`` on the Hugging Face Hub documents
# (author Zhen Ye; MIT License per its metadata). Only its ``xcodec2/`` modelling files are extracted.
XCODEC2_SDIST = dict(
    requirement="xcodec2==0.1.5",
    filename="xcodec2-0.1.5.tar.gz",
    sha256="dc1a73b32090706e65fb73b2469411bc27bb72048677a23b430ab21ad325e45b",
    pip_args=("--no-binary", ":all:"),
)
# The torchtune wheel whose ``RotaryPositionalEmbeddings`` the original imports (BSD 3-Clause). Only
# ``torchtune/modules/position_embeddings.py`` (which imports nothing but torch) is taken from it;
# torchtune itself is never installed or imported, since importing it needs torchao.
TORCHTUNE_WHEEL = dict(
    requirement="torchtune==0.6.1",
    filename="torchtune-0.6.1-py3-none-any.whl",
    sha256="bcbc4ee9774b5c5829a5ff13df851e0b0e32416c018af8db53faa3472ac256e7",
    pip_args=(),
)

_XCODEC2_PREFIX = "xcodec2-0.1.5/xcodec2/"
# What ``modeling_xcodec2.py`` needs: the package, its config and the whole ``vq/`` folder (some of
# whose modules, such as ``residual_vq.py`` and ``blocks.py``, are imported but never called).
_XCODEC2_FILES = ("__init__.py", "configuration_bigcodec.py", "modeling_xcodec2.py")
_XCODEC2_FOLDERS = ("vq/",)
_ROPE_MEMBER = "torchtune/modules/position_embeddings.py"
_ROPE_LICENSE = "torchtune-0.6.1.dist-info/licenses/LICENSE"

# Names under which the fetched code is imported: nothing else can be called this, so an installed
# ``xcodec2`` (or ``torchtune``) can neither shadow it nor be shadowed.
_XCODEC2_MODULE = "_xcodec2_jax_tests_original_xcodec2"
_ROPE_MODULE = "_xcodec2_jax_tests_torchtune_position_embeddings"
_XCODEC2_IMPORTS = (
    "configuration_bigcodec",
    "modeling_xcodec2",
    "vq.activations",
    "vq.bs_roformer5",
    "vq.codec_decoder_vocos",
    "vq.codec_encoder",
    "vq.module",
)


def cache_dir() -> str:
    """Where the fetched sources live: ``$XCODEC2_JAX_TEST_CACHE``, else ``~/.cache/xcodec2_jax_tests``."""
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "xcodec2_jax_tests")
    return os.path.abspath(os.path.expanduser(root))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_command(dist: dict, dest: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        *dist["pip_args"],
        dist["requirement"],
        "-d",
        dest,
    ]


def _fetch_archive(dist: dict, work: str) -> str:
    """The verified archive of ``dist``: from ``<cache>/downloads`` if placed there by hand, else from pip.

    pip runs with its temporary files inside ``work`` (a folder of the cache), so that nothing of it is
    left in the system's temp dir.
    """
    manual_dir = os.path.join(cache_dir(), "downloads")
    manual = os.path.join(manual_dir, dist["filename"])
    if os.path.isfile(manual):
        path = manual
    else:
        dest, pip_tmp = os.path.join(work, "download"), os.path.join(work, "pip-tmp")
        os.makedirs(pip_tmp)
        env = dict(os.environ, TMPDIR=pip_tmp, TEMP=pip_tmp, TMP=pip_tmp)
        command = _download_command(dist, dest)
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            failure = None if result.returncode == 0 else (result.stdout + result.stderr)[-3000:]
        except (OSError, subprocess.SubprocessError) as e:
            failure = repr(e)
        path = os.path.join(dest, dist["filename"])
        if failure is None and not os.path.isfile(path):
            failure = f"pip reported success but {dist['filename']} is not in {dest}"
        if failure is not None:
            by_hand = shlex.join(["python", *_download_command(dist, manual_dir)[1:]])
            raise RuntimeError(
                f"Could not download {dist['requirement']} from the package index, which the tests need "
                f"as the original X-Codec2 reference code:\n{failure}\n"
                f"Run by hand, where the index is reachable (with python from this environment):\n"
                f"    {by_hand}\n"
                f"(or copy {dist['filename']}, sha256 {dist['sha256']}, into {manual_dir}), then rerun the "
                f"tests. The cache folder is set by ${CACHE_ENV}."
            )
    found = _sha256(path)
    if found != dist["sha256"]:
        raise RuntimeError(
            f"{path} has sha256 {found}, not the pinned {dist['sha256']} of {dist['requirement']}; "
            f"delete it and rerun the tests."
        )
    return path


def _extract_xcodec2(archive: str, dest: str) -> None:
    """The modelling files of the sdist, unchanged, into ``dest`` (a package folder)."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith(_XCODEC2_PREFIX):
                continue
            rel = member.name[len(_XCODEC2_PREFIX) :]
            wanted = rel in _XCODEC2_FILES or (rel.startswith(_XCODEC2_FOLDERS) and rel.endswith(".py"))
            if not wanted or ".." in rel.split("/"):
                continue
            target = os.path.join(dest, *rel.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


def _extract_rope(archive: str, dest: str) -> None:
    """torchtune's ``position_embeddings.py`` and its licence, unchanged, into ``dest``."""
    with zipfile.ZipFile(archive) as wheel:
        for member, name in ((_ROPE_MEMBER, "position_embeddings.py"), (_ROPE_LICENSE, "LICENSE")):
            with open(os.path.join(dest, name), "wb") as out:
                out.write(wheel.read(member))


def _cached_source(dist: dict, extract, required: tuple[str, ...]) -> str:
    """``<cache>/<name>-<sha256[:12]>``, filled by ``extract`` from the verified archive on first use.

    It is built in a temporary sibling folder and renamed into place, so that it appears complete or
    not at all; when two processes race, the second rename fails, and that one's copy is dropped.
    """
    root = cache_dir()
    final = os.path.join(root, f"{dist['requirement'].replace('==', '-')}-{dist['sha256'][:12]}")
    if not os.path.isdir(final):
        os.makedirs(root, exist_ok=True)
        work = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final)}-", dir=root)
        try:
            archive = _fetch_archive(dist, work)
            staged = os.path.join(work, "source")
            os.makedirs(staged)
            extract(archive, staged)
            with open(os.path.join(staged, "SOURCE.txt"), "w") as f:
                f.write(f"{dist['requirement']} {dist['filename']} sha256 {dist['sha256']}\n")
            try:
                os.replace(staged, final)
            except OSError:
                if not os.path.isdir(final):  # not a lost race
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    missing = [name for name in required if not os.path.isfile(os.path.join(final, name))]
    if missing:
        raise RuntimeError(f"{final} lacks {missing}: delete that folder and rerun the tests.")
    return final


@functools.cache
def original_source() -> types.SimpleNamespace:
    """The folders of the fetched sources: ``xcodec2`` (the package) and ``rope`` (torchtune's file)."""
    return types.SimpleNamespace(
        xcodec2=_cached_source(XCODEC2_SDIST, _extract_xcodec2, ("modeling_xcodec2.py", "vq/module.py")),
        rope=_cached_source(TORCHTUNE_WHEEL, _extract_rope, ("position_embeddings.py",)),
    )


def _import_file(name: str, path: str, package_dir: str | None = None) -> types.ModuleType:
    """The module (or, with ``package_dir``, package) at ``path``, imported and registered as ``name``."""
    locations = None if package_dir is None else [package_dir]
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


@contextlib.contextmanager
def _import_stubs():
    """``torchtune.modules`` (torchtune's own RoPE class) and an empty ``torchaudio``, only while importing.

    The real torchtune needs torchao to import, so only its ``position_embeddings.py`` is loaded, by file
    location; torchaudio is imported by ``vq/bs_roformer5.py`` but never used. Everything else the
    original code imports is imported first, outside the stubs (so that transformers' availability
    probes never see the fake torchaudio), and the previous ``sys.modules`` entries are restored
    afterwards.
    """
    import einops  # noqa: F401
    import transformers
    import vector_quantize_pytorch  # noqa: F401

    for name in ("PretrainedConfig", "PreTrainedModel", "AutoFeatureExtractor", "Wav2Vec2BertModel"):
        getattr(transformers, name)
    rope_file = os.path.join(original_source().rope, "position_embeddings.py")
    rope = sys.modules.get(_ROPE_MODULE) or _import_file(_ROPE_MODULE, rope_file)

    def stub(name):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        return module

    torchtune, modules = stub("torchtune"), stub("torchtune.modules")
    modules.RotaryPositionalEmbeddings = rope.RotaryPositionalEmbeddings
    torchtune.modules = modules
    stubs = {"torchtune": torchtune, "torchtune.modules": modules, "torchaudio": stub("torchaudio")}
    with temporary_modules(stubs):
        yield


@contextlib.contextmanager
def temporary_modules(modules: dict):
    """``modules`` (name -> module) in ``sys.modules`` while the block runs, what was there before
    put back after: stand-ins that only an import of reference code may see."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
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
    """The original release's modules, fetched (see :func:`original_source`) and imported once.

    The sdist's ``xcodec2`` package is imported from the cache by file location as
    ``_xcodec2_jax_tests_original_xcodec2`` (its own imports are relative); ``sys.path`` is not touched.
    """
    package_dir = original_source().xcodec2
    with _import_stubs():
        if _XCODEC2_MODULE not in sys.modules:
            _import_file(_XCODEC2_MODULE, os.path.join(package_dir, "__init__.py"), package_dir)
        try:
            loaded = {name: importlib.import_module(f"{_XCODEC2_MODULE}.{name}") for name in _XCODEC2_IMPORTS}
        except BaseException:
            for name in list(sys.modules):
                if name == _XCODEC2_MODULE or name.startswith(_XCODEC2_MODULE + "."):
                    del sys.modules[name]
            raise
    return types.SimpleNamespace(
        BigCodecConfig=loaded["configuration_bigcodec"].BigCodecConfig,
        XCodec2Model=loaded["modeling_xcodec2"].XCodec2Model,
        CodecEncoder_Transformer=loaded["vq.codec_encoder"].CodecEncoder_Transformer,
        CodecDecoderVocos=loaded["vq.codec_decoder_vocos"].CodecDecoderVocos,
        codec_decoder_vocos=loaded["vq.codec_decoder_vocos"],
        SemanticEncoder=loaded["vq.module"].SemanticEncoder,
        SnakeBeta=loaded["vq.activations"].SnakeBeta,
        RMSNorm=loaded["vq.bs_roformer5"].RMSNorm,
        Attention=loaded["vq.bs_roformer5"].Attention,
        RotaryPositionalEmbeddings=loaded["vq.bs_roformer5"].RotaryPositionalEmbeddings,
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
