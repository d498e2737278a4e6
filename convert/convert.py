"""Convert an X-Codec2 checkpoint (transformers or original-release format) into an Orbax checkpoint
of the Flax params plus ``config.json``, and optionally verify it against the PyTorch model.

    python -m convert SRC DST [--verify AUDIO] [--overwrite]

``--verify`` runs transformers' ``Xcodec2Model`` (loaded with the same weights, strictly) and ours on
the audio, and prints the codes agreement and the decoded audio's max error. This module may import
torch; the library does not.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from xcodec2_jax.checkpoint import (
    detect_format,
    load_checkpoint,
    original_to_transformers,
    read_state_dict,
    save_orbax,
)


def torch_reference(src: str, config):
    """transformers' Xcodec2Model holding the checkpoint's weights (original format remapped)."""
    import torch
    from transformers import Xcodec2Config as TorchConfig
    from transformers import Xcodec2Model as TorchModel

    state = read_state_dict(src)
    if detect_format(src) == "original":
        state = original_to_transformers(state)
    model = TorchModel(TorchConfig(**config.to_dict())).eval()
    result = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if k != "semantic_encoder.masked_spec_embed"]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"torch model does not take the checkpoint: missing {missing}, "
            f"unexpected {result.unexpected_keys}"
        )
    return model


def verify(src: str, config, params, audio_path: str) -> dict:
    """Encode and decode ``audio_path`` with PyTorch and with JAX; codes agreement and audio error."""
    import soundfile as sf
    import torch

    from xcodec2_jax import Xcodec2FeatureExtractor, Xcodec2Model
    from xcodec2_jax.inference.audio import prepare_audio

    audio, rate = sf.read(audio_path, dtype="float32", always_2d=False)
    inputs = Xcodec2FeatureExtractor(hop_length=config.hop_length)(
        prepare_audio(audio, rate), sampling_rate=16000
    )
    reference = torch_reference(src, config)
    with torch.inference_mode():
        t_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
        ref_codes = reference.encode(**t_inputs).audio_codes
        ref_audio = reference.decode(audio_codes=ref_codes).audio_values.numpy()
    model = Xcodec2Model(config)
    codes = jax.jit(lambda p, x: model.apply({"params": p}, **x, method=Xcodec2Model.encode).audio_codes)(
        params, inputs
    )
    ours = jax.jit(lambda p, c: model.apply({"params": p}, c, method=Xcodec2Model.decode).audio_values)(
        params, ref_codes.numpy().astype(np.int32)
    )
    codes = np.asarray(codes)
    err = float(np.abs(np.asarray(ours) - ref_audio).max())
    return {
        "codes": int(codes.size),
        "agreement": float((codes == ref_codes.numpy()).mean()),
        "max_abs_err": err,
        "relative_to_peak": err / float(np.abs(ref_audio).max()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "src", help="checkpoint directory or .safetensors file (transformers or original format)"
    )
    parser.add_argument("dst", help="output directory (config.json + Orbax params/)")
    parser.add_argument("--verify", metavar="AUDIO", help="audio file to compare PyTorch and JAX on")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing Orbax checkpoint")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        config, params = load_checkpoint(args.src)
        save_orbax(args.dst, params, config, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"convert: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(
        f"converted {args.src} -> {args.dst} ({n / 1e6:.1f}M parameters, {time.perf_counter() - start:.1f} s)"
    )
    if args.verify:
        r = verify(args.src, config, params, args.verify)
        print(
            f"verify {args.verify}: codes agreement {100 * r['agreement']:.2f}% over {r['codes']} codes; "
            f"decoded audio max abs err {r['max_abs_err']:.3e} ({r['relative_to_peak']:.3e} of peak)"
        )
        if r["agreement"] < 1.0 or r["relative_to_peak"] > 1e-3:
            return 1
    return 0
