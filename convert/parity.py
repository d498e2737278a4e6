"""Parity report: how far our JAX model is from transformers' PyTorch ``Xcodec2Model``, stage by stage.

    python -m convert.parity CHECKPOINT AUDIO... [--dtype float32 bfloat16]
        [--precision highest default] [--json report.json]

Runs the PyTorch reference (float32 always: it is the reference) and ours on the same audio, the
same features and the same weights, for each compute dtype and matmul precision asked for, and
prints the codes agreement and, per stage, the max abs error relative to the reference's peak over
that stage's tensor: semantic encoder output, semantic adapter, acoustic encoder, fc_encoder,
latents (after project_out) and decoded audio. Both sides decode the *reference's* codes, so the
decoder's error is measured on the same input whatever the encoder did. ``--json`` writes the same
figures plus the package versions and the JAX device. Needs the test extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

STAGES = ("semantic_encoder", "semantic_adapter", "acoustic_encoder", "fc_encoder", "latents", "audio")
# Top-level submodules whose outputs are the encoder stages; the quantizer's first output is the
# latents after project_out.
_MODULES = ("semantic_encoder", "semantic_adapter", "acoustic_encoder", "fc_encoder", "quantizer")
DTYPES = ("float32", "bfloat16")
PRECISIONS = ("highest", "default")
# lax.Precision names; on CPU all three compute float32 dots exactly, on GPUs "default" and
# "tensorfloat32" mean TF32 where the hardware has it, on TPUs "default" is one bfloat16 pass.
PRECISION_CHOICES = ("highest", "tensorfloat32", "default")
CAPTION = (
    "max |ours - reference| / max |reference| per stage (worst over the files); "
    "latents: after project_out; audio: both decode the reference's codes"
)


def versions() -> dict:
    out = {}
    for name in ("jax", "jaxlib", "flax", "torch", "transformers", "xcodec2_jax"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
    }


def relative_error(ours, ref) -> dict:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: ours {ours.shape}, reference {ref.shape}")
    err, peak = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    # The RMS ratio (JSON only) tells a few outliers from an error spread over the whole tensor.
    rms_err, rms = float(np.sqrt(np.mean((ours - ref) ** 2))), float(np.sqrt(np.mean(ref**2)))
    return {
        "max_abs_err": err,
        "peak": peak,
        "relative": err / peak if peak > 0 else float(err > 0),
        "rms_relative": rms_err / rms if rms > 0 else float(rms_err > 0),
    }


def read_audio(path: str) -> np.ndarray:
    import soundfile as sf

    from xcodec2_jax.inference.audio import prepare_audio

    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        audio, rate = sf.read(path, dtype="float32", always_2d=False)
    except Exception as e:  # soundfile raises its own RuntimeError subclasses for unreadable files
        raise ValueError(f"cannot read audio file {path}: {e}") from e
    return prepare_audio(audio, rate)


def reference_stages(reference, inputs: dict) -> tuple[dict, np.ndarray]:
    """The reference's stage outputs (channels-last, as ours) from its own ``encode``, and its codes.

    Forward hooks on the top-level submodules record exactly what ``encode`` computes; the adapter
    and acoustic encoder are channels-first there (B, C, T) and are transposed to (B, T, C).
    """
    import torch

    seen = {}
    hooks = [
        getattr(reference, name).register_forward_hook(
            lambda _m, _a, out, name=name: seen.__setitem__(name, out)
        )
        for name in _MODULES
    ]
    try:
        with torch.inference_mode():
            t_inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
            codes = reference.encode(**t_inputs).audio_codes
            audio = reference.decode(audio_codes=codes).audio_values
    finally:
        for h in hooks:
            h.remove()
    stages = {
        "semantic_encoder": seen["semantic_encoder"].last_hidden_state,
        "semantic_adapter": seen["semantic_adapter"].transpose(1, 2),
        "acoustic_encoder": seen["acoustic_encoder"].transpose(1, 2),
        "fc_encoder": seen["fc_encoder"],
        "latents": seen["quantizer"][0],
        "audio": audio,
    }
    return {k: v.float().numpy() for k, v in stages.items()}, codes.numpy()


def build_model(config, dtype: str, precision: str):
    import jax.numpy as jnp

    from xcodec2_jax import Xcodec2Model

    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    return Xcodec2Model(config, dtype=jdtype, precision=precision)


def jax_functions(model):
    """jitted (params, inputs) -> (codes, {stage: output}) and (params, codes) -> audio."""
    import jax

    from xcodec2_jax import Xcodec2Model

    def top_level(mdl, method):
        return method == "__call__" and mdl.name in _MODULES and isinstance(mdl.parent, Xcodec2Model)

    def encode(params, inputs):
        out, state = model.apply(
            {"params": params},
            **inputs,
            method=Xcodec2Model.encode,
            capture_intermediates=top_level,
            mutable=["intermediates"],
        )
        inter = state["intermediates"]
        stages = {name: inter[name]["__call__"][0] for name in _MODULES}
        stages["latents"] = stages.pop("quantizer")[0]
        return out.audio_codes, stages

    def decode(params, codes):
        return model.apply({"params": params}, codes, method=Xcodec2Model.decode).audio_values

    return jax.jit(encode), jax.jit(decode)


def run(checkpoint: str, audio_paths: Sequence[str], dtypes=DTYPES, precisions=PRECISIONS, log=None) -> dict:
    """The parity report as a dict (see the module docstring); ``log`` gets progress lines."""
    import jax

    from convert.convert import torch_reference
    from xcodec2_jax import Xcodec2FeatureExtractor, load_checkpoint

    log = log or (lambda _msg: None)
    audios = [read_audio(p) for p in audio_paths]  # fail on a bad file before loading anything
    config, params = load_checkpoint(checkpoint)
    params = jax.device_put(params)
    reference = torch_reference(checkpoint, config)
    extractor = Xcodec2FeatureExtractor(hop_length=config.hop_length)

    files, refs = [], []
    for path, audio in zip(audio_paths, audios, strict=True):
        inputs = dict(extractor(audio, sampling_rate=16000))
        start = time.perf_counter()
        stages, codes = reference_stages(reference, inputs)
        log(f"reference {os.path.basename(path)}: {time.perf_counter() - start:.1f} s")
        refs.append((inputs, stages, codes))
        files.append({"path": path, "seconds": len(audio) / 16000, "codes": int(codes.size)})

    runs = []
    for dtype in dtypes:
        for precision in precisions:
            encode, decode = jax_functions(build_model(config, dtype, precision))
            per_file, equal, total = [], 0, 0
            start = time.perf_counter()
            for inputs, ref_stages, ref_codes in refs:
                codes, stages = encode(params, inputs)
                stages = dict(stages)
                stages["audio"] = decode(params, ref_codes.astype(np.int32))
                codes = np.asarray(codes)
                n_equal = int((codes == ref_codes).sum())
                equal, total = equal + n_equal, total + int(codes.size)
                per_file.append(
                    {
                        "codes_agreement": n_equal / codes.size,
                        "stages": {k: relative_error(stages[k], ref_stages[k]) for k in STAGES},
                    }
                )
            log(f"ours {dtype}/{precision}: {time.perf_counter() - start:.1f} s")
            runs.append(
                {
                    "dtype": dtype,
                    "precision": precision,
                    "codes_agreement": equal / total,
                    "codes_equal": equal,
                    "codes_total": total,
                    "stages": {k: max(f["stages"][k]["relative"] for f in per_file) for k in STAGES},
                    "files": per_file,
                }
            )
    return {
        "checkpoint": checkpoint,
        "config": config.to_dict(),
        "files": files,
        "reference": "transformers Xcodec2Model, float32",
        "caption": CAPTION,
        "runs": runs,
        "versions": versions(),
        "device": device_info(),
    }


def format_table(report: dict) -> str:
    runs = report["runs"]
    heads = [f"{r['dtype']}/{r['precision']}" for r in runs]
    width = max([16, *map(len, heads)])
    rows = [f"{'stage':<18}" + "".join(f"{h:>{width + 2}}" for h in heads)]
    rows.append(
        f"{'codes agreement':<18}" + "".join(f"{100 * r['codes_agreement']:>{width + 1}.2f}%" for r in runs)
    )
    for stage in STAGES:
        rows.append(f"{stage:<18}" + "".join(f"{r['stages'][stage]:>{width + 2}.2e}" for r in runs))
    dev, ver = report["device"], report["versions"]
    seconds = sum(f["seconds"] for f in report["files"])
    codes = sum(f["codes"] for f in report["files"])
    return "\n".join(
        [
            f"parity of {report['checkpoint']} on {len(report['files'])} file(s), {seconds:.1f} s, "
            f"{codes} codes; JAX on {dev['backend']} ({dev['device_kind']}) vs {report['reference']}",
            ", ".join(f"{name} {version}" for name, version in ver.items()),
            f"{CAPTION}:",
            *rows,
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint directory (transformers or original format)")
    parser.add_argument("audio", nargs="+", help="audio files (any rate; resampled to 16 kHz mono)")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES), help="compute dtypes")
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=PRECISION_CHOICES,
        default=list(PRECISIONS),
        help="precision of our model's dots and convolutions (FSQ, features and ISTFT stay highest)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    args = parser.parse_args(argv)

    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"parity: needs torch and transformers (pip install 'xcodec2_jax[test]'): {e}", file=sys.stderr)
        return 2
    try:
        report = run(
            args.checkpoint, args.audio, args.dtype, args.precision, log=lambda m: print(m, file=sys.stderr)
        )
    except (OSError, ValueError) as e:
        print(f"parity: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
