"""``xcodec2-jax``: encode audio files to codes, decode codes to WAV, or round-trip a file.

Each bad input gets one line on stderr naming the file and the problem; the other files are still
processed, and the exit code is then 2. Existing outputs are never overwritten without
``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au")
EXIT_OK, EXIT_BAD_INPUT = 0, 2


class _Run:
    """Collects per-file failures; the exit code follows from them."""

    def __init__(self):
        self.failed = 0

    def fail(self, path: str, problem: str) -> None:
        self.failed += 1
        message = " ".join(str(problem).split())
        print(f"xcodec2-jax: {path}: {message}", file=sys.stderr)

    @property
    def exit_code(self) -> int:
        return EXIT_BAD_INPUT if self.failed else EXIT_OK


def _expand_inputs(inputs: Sequence[str], suffixes: tuple[str, ...], run: _Run) -> list[tuple[str, str]]:
    """(input file, output path relative to the output dir without suffix), directories mirrored."""
    pairs = []
    for item in inputs:
        if os.path.isdir(item):
            root = os.path.normpath(item)
            found = []
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    if name.lower().endswith(suffixes):
                        path = os.path.join(dirpath, name)
                        found.append((path, os.path.splitext(os.path.relpath(path, root))[0]))
            if not found:
                run.fail(item, f"no files ending in {', '.join(suffixes)} in this directory")
            pairs += found
        elif os.path.isfile(item):
            pairs.append((item, os.path.splitext(os.path.basename(item))[0]))
        else:
            run.fail(item, "no such file or directory")
    return pairs


def _jobs(args, run: _Run, suffixes: tuple[str, ...], out_suffix: str) -> list[tuple[str, str]]:
    """(input, output) pairs, skipping (and reporting) inputs whose output exists without --overwrite."""
    jobs = []
    for path, rel in _expand_inputs(args.inputs, suffixes, run):
        out = os.path.join(args.output, rel + out_suffix)
        if os.path.exists(out) and not args.overwrite:
            run.fail(path, f"output {out} exists (use --overwrite to replace it)")
        else:
            jobs.append((path, out))
    return jobs


def _in_groups(jobs, desc: str, read, flush, batch_size: int, run: _Run) -> None:
    """Read each input (a bad one is reported, not fatal) and pass the good ones to ``flush`` as
    lists of (output path, data), batch_size at a time, so the codec can batch them."""
    group = []
    from .codec import progress_bar

    for i, (path, out) in enumerate(progress_bar(jobs, desc, "file")):
        try:
            group.append((out, read(path)))
        except ValueError as e:
            run.fail(path, str(e))
        if group and (len(group) == batch_size or i == len(jobs) - 1):
            for target, _ in group:
                os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            flush(group)
            group = []


class ModelLoadError(Exception):
    """The model could not be loaded: nothing else can run."""


def _load_codec(args, encode_lengths=None, encode_only=False):
    import jax.numpy as jnp

    from .codec import Xcodec2Codec

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    try:
        return Xcodec2Codec.from_pretrained(
            args.model,
            dtype=dtype,
            precision=args.precision,
            batch_size=args.batch_size,
            compilation_cache=False if args.no_cache else args.cache_dir,
            encode_lengths=encode_lengths,
            encode_only=encode_only,
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(str(e)) from e


def cmd_encode(args, run: _Run) -> None:
    from .codec import read_audio

    jobs = _jobs(args, run, AUDIO_SUFFIXES, ".npy")
    if not jobs:
        return
    # The first batch is read before the model loads, so that its programs compile meanwhile (a bad
    # file is skipped here and reported when read again below).
    first = {}
    for path, _ in jobs[: args.batch_size]:
        try:
            first[path] = read_audio(path)
        except ValueError:
            pass
    # Only the encoder's weights: 70% of the checkpoint to prepare, keep and map.
    codec = _load_codec(args, encode_lengths=[len(a) for a in first.values()], encode_only=True)

    def read(path):
        return first.pop(path) if path in first else read_audio(path)

    def flush(group):
        encoded = codec.encode([audio for _, audio in group], codec.sampling_rate)
        for (target, _), codes in zip(group, encoded, strict=True):
            np.save(target, codes.astype(np.int32))

    _in_groups(jobs, "encode", read, flush, args.batch_size, run)


def _read_codes(path: str, codebook_size: int) -> np.ndarray:
    try:
        codes = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"cannot read codes ({type(e).__name__}: {e})") from None
    if codes.ndim == 2 and codes.shape[0] == 1:
        codes = codes[0]
    if codes.ndim != 1 or codes.size == 0:
        raise ValueError(f"expected a non-empty 1-D array of codes, got shape {codes.shape}")
    if codes.dtype.kind not in "iu":
        raise ValueError(f"expected integer codes, got dtype {codes.dtype}")
    if codes.min() < 0 or codes.max() >= codebook_size:
        raise ValueError(f"codes must lie in [0, {codebook_size}), found [{codes.min()}, {codes.max()}]")
    return codes.astype(np.int32)


def _write_wav(path: str, audio: np.ndarray, rate: int) -> None:
    import soundfile as sf

    sf.write(path, audio, rate, subtype="FLOAT")


def _read_llasa_text(path: str, codebook_size: int) -> np.ndarray:
    from .llasa import text_to_codes

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read text ({type(e).__name__}: {e})") from None
    codes = text_to_codes(text, codebook_size=codebook_size)
    if codes.size == 0:
        raise ValueError("no speech tokens (<|s_N|>) in this text")
    return codes


def cmd_decode(args, run: _Run) -> None:
    jobs = _jobs(args, run, (".txt",) if args.llasa_text else (".npy",), ".wav")
    if not jobs:
        return
    codec = _load_codec(args)
    read = _read_llasa_text if args.llasa_text else _read_codes

    def flush(group):
        for (target, _), audio in zip(group, codec.decode([codes for _, codes in group]), strict=True):
            _write_wav(target, audio, codec.sampling_rate)

    _in_groups(
        jobs,
        "decode",
        lambda path: read(path, codec.config.codebook_size),
        flush,
        args.batch_size,
        run,
    )


def cmd_roundtrip(args, run: _Run) -> None:
    from .codec import read_audio

    if os.path.exists(args.output) and not args.overwrite:
        run.fail(args.input, f"output {args.output} exists (use --overwrite to replace it)")
        return
    try:
        audio = read_audio(args.input)
    except ValueError as e:
        run.fail(args.input, str(e))
        return
    codec = _load_codec(args)
    decoded = codec.decode(codec.encode(audio, codec.sampling_rate))[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    _write_wav(args.output, decoded[: len(audio)], codec.sampling_rate)


def cmd_tokenize(args, run: _Run) -> None:
    from .corpus.summary import run_tokenize

    try:
        run.failed += run_tokenize(args)
    except OSError as e:  # the model could not be loaded
        raise ModelLoadError(str(e)) from e
    except ValueError as e:  # unusable sources, or an output folder of another job
        run.fail(args.output, str(e))


def build_parser() -> argparse.ArgumentParser:
    from .codec import DEFAULT_MODEL_ID

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        default=DEFAULT_MODEL_ID,
        help=f"checkpoint directory or Hugging Face Hub repo id (default {DEFAULT_MODEL_ID})",
    )
    common.add_argument("--batch-size", type=int, default=8, help="items per batch (default 8)")
    common.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    common.add_argument(
        "--precision",
        choices=("highest", "default", "tensorfloat32"),
        default=None,
        help="float32 dots and convolutions: highest (the default for float32 compute; codes as the "
        "reference's), or default / tensorfloat32 for the device's faster passes (TF32 on recent GPUs, "
        "bfloat16 on TPUs), which can change codes; FSQ, features and the ISTFT stay highest",
    )
    common.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    cache = common.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="JAX compilation cache folder, so later runs of the same shapes compile nothing (default "
        "$XCODEC2_JAX_CACHE_DIR, else $XDG_CACHE_HOME/xcodec2_jax/jax; a folder JAX is already "
        "configured with, e.g. by JAX_COMPILATION_CACHE_DIR, is kept)",
    )
    cache.add_argument(
        "--no-cache",
        action="store_true",
        help="no compilation cache (as XCODEC2_JAX_CACHE_DIR=off): compile in every run, write nothing",
    )

    parser = argparse.ArgumentParser(prog="xcodec2-jax", description="X-Codec2 speech codec in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("encode", parents=[common], help="audio files -> .npy int32 codes (50 per second)")
    p.add_argument("inputs", nargs="+", help="audio files or directories (mirrored under OUTDIR)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    p.set_defaults(func=cmd_encode)
    p = sub.add_parser("decode", parents=[common], help=".npy codes (or Llasa text) -> 16 kHz WAV files")
    p.add_argument("inputs", nargs="+", help=".npy files or directories (mirrored under OUTDIR)")
    p.add_argument(
        "--llasa-text",
        action="store_true",
        help="inputs are text files (.txt in directories) of Llasa output: the <|s_N|> speech tokens "
        "are decoded, every other token is ignored",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    p.set_defaults(func=cmd_decode)
    p = sub.add_parser("roundtrip", parents=[common], help="encode then decode one file")
    p.add_argument("input")
    p.add_argument("output", help="output WAV path")
    p.set_defaults(func=cmd_roundtrip)
    _add_finetune_parser(sub, DEFAULT_MODEL_ID)
    from .corpus.summary import add_tokenize_parser

    add_tokenize_parser(sub, common, cmd_tokenize)
    return parser


def _add_finetune_parser(sub, default_model: str) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune the decoder on a folder or manifest of audio (resumes if rerun)"
    )
    p.add_argument("data", help="folder of audio files, or a manifest (.txt/.lst paths, .jsonl with 'path')")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="checkpoints, log and the model")
    p.add_argument("--model", default=default_model, help=f"model to start from (default {default_model})")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=4, help="segments per step (default 4)")
    p.add_argument("--segment-seconds", type=float, default=2.0, help="segment length (default 2)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every K steps (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the segment draws (default 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args, run: _Run) -> None:
    from .finetune import finetune

    try:
        finetune(
            args.data,
            args.output,
            model=args.model,
            steps=args.steps,
            batch_size=args.batch_size,
            segment_seconds=args.segment_seconds,
            learning_rate=args.lr,
            save_every=args.save_every,
            seed=args.seed,
            compute_dtype=args.dtype,
        )
    except OSError as e:
        raise ModelLoadError(str(e)) from e
    except ValueError as e:
        run.fail(args.data, str(e))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("xcodec2-jax: --batch-size must be at least 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    run = _Run()
    try:
        args.func(args, run)
    except ModelLoadError as e:
        print(f"xcodec2-jax: {args.model}: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run.exit_code


def console_main() -> int:
    """The ``xcodec2-jax`` command: :func:`main` in a process of its own, which lets it tune the
    garbage collector for a short-lived process (``main`` called from a program leaves it alone).

    Every command imports JAX, Flax and the model, and their objects live until the process ends.
    Frozen out of the collector (``gc.freeze``), they are no longer walked by each full collection
    (a first-ever ``encode`` ran six, 0.08 s each), and freezing again at the end spares the exit
    its walk over everything the run made (0.3 s after a full-model encode)."""
    import gc

    from . import codec  # noqa: F401  (what build_parser would import anyway)

    gc.freeze()
    try:
        return main()
    finally:
        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console_main())
