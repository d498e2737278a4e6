"""``xcodec2-jax``: encode audio files to codes, decode codes to WAV, or round-trip a file.

Each bad input gets one line on stderr naming the file and the problem; the other files are still
processed, and the exit code is then 2. Existing outputs are never overwritten without
``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from .checkpoint import load_checkpoint, prepared
from .checkpoint.export import save_transformers
from .corpus.run import tokenize
from .inference.audio import read_audio
from .inference.codec import Xcodec2Codec
from .inference.compilation_cache import resolve_cache_dir
from .inference.llasa import text_to_codes
from .training.recipe import RECIPES, Recipe
from .training.run import train
from .utils import validation
from .utils.dtypes import compute_dtype
from .utils.files import AUDIO_SUFFIXES, walk_files
from .utils.hub import DEFAULT_MODEL_ID, resolve_checkpoint
from .utils.progress import progress_bar

EXIT_OK, EXIT_BAD_INPUT = 0, 2


class _Run:
    """Collects per-file failures; the exit code follows from them."""

    def __init__(self):
        self.failed = 0

    def fail(self, path: str | None, problem: str) -> None:
        """One line on stderr: ``path`` (None where ``problem`` names its own place), then the problem."""
        self.failed += 1
        message = " ".join(str(problem).split())
        where = "" if path is None else f"{path}: "
        print(f"xcodec2-jax: {where}{message}", file=sys.stderr)

    @property
    def exit_code(self) -> int:
        return EXIT_BAD_INPUT if self.failed else EXIT_OK


def _expand_inputs(inputs: Sequence[str], suffixes: tuple[str, ...], run: _Run) -> list[tuple[str, str]]:
    """(input file, output path relative to the output dir without suffix), directories mirrored."""
    pairs = []
    for item in inputs:
        if os.path.isdir(item):
            root = os.path.normpath(item)
            found = [(p, os.path.splitext(os.path.relpath(p, root))[0]) for p in walk_files(root, suffixes)]
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
    try:
        return Xcodec2Codec.from_pretrained(
            args.model,
            dtype=compute_dtype(args.dtype),
            precision=args.precision,
            batch_size=args.batch_size,
            compilation_cache=False if args.no_cache else args.cache_dir,
            encode_lengths=encode_lengths,
            encode_only=encode_only,
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(str(e)) from e


def cmd_encode(args, run: _Run) -> None:
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
    return validation.codes(codes, codebook_size)


def _write_wav(path: str, audio: np.ndarray, rate: int) -> None:
    import soundfile as sf

    sf.write(path, audio, rate, subtype="FLOAT")


def _read_llasa_text(path: str, codebook_size: int) -> np.ndarray:
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
    try:
        run.failed += run_tokenize(args)
    except OSError as e:  # the model could not be loaded
        raise ModelLoadError(str(e)) from e
    except ValueError as e:  # unusable sources, or an output folder of another job
        run.fail(None, str(e))  # the sources' and OUT's errors name their path or URL


# long: the options shared by every subcommand, each with its help text
def build_parser() -> argparse.ArgumentParser:
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
    common.add_argument(
        "--params-cache-max-gb",
        type=float,
        metavar="GB",
        help="size limit of the params cache (prepared checkpoints) beside the compilation cache; the least "
        f"recently used entries go first (default ${prepared.ENV_MAX_GB}, else "
        f"{prepared.DEFAULT_MAX_BYTES / 2**30:g})",
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
    _add_train_parsers(sub)
    add_tokenize_parser(sub, common, cmd_tokenize)
    _add_cache_parser(sub)
    return parser


# long: one argument per line, the options of train and finetune
def _add_train_arguments(
    p, recipe: str, steps: int, batch_size: int, seconds: float, save_every: int
) -> None:
    p.add_argument(
        "data",
        nargs="+",
        help="what tokenize reads: folders, manifests (.txt/.lst/.jsonl), Parquet, tars (paths or URLs)",
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="checkpoints, logs, samples and the model"
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument("--model", help=f"checkpoint or Hub id to start from (default {DEFAULT_MODEL_ID})")
    start.add_argument(
        "--config", help="train from scratch: small, full or a config.json (needs --semantic-model)"
    )
    p.add_argument(
        "--semantic-model", metavar="DIR", help="a transformers Wav2Vec2BertModel checkpoint (frozen)"
    )
    p.add_argument(
        "--recipe", choices=RECIPES, default=recipe, help=f"losses and discriminators (default {recipe})"
    )
    p.add_argument("--trainable", help="comma-separated parts to train (default: the recipe's)")
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help=f"crops per step, all devices (default {batch_size})",
    )
    p.add_argument(
        "--segment-seconds", type=float, default=seconds, help=f"crop length (default {seconds:g})"
    )
    p.add_argument(
        "--learning-rate", "--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)"
    )
    p.add_argument(
        "--warmup-steps", type=int, help="quadratic warm-up steps (default 3000; finetune 5%% of --steps)"
    )
    p.add_argument(
        "--decay-steps", type=int, help="linear decay steps after it (default 400000; finetune the rest)"
    )
    p.add_argument(
        "--initial-learning-rate", type=float, help="learning rate of the first step (default 1e-5)"
    )
    p.add_argument("--final-learning-rate", type=float, help="learning rate after the decay (default 2e-5)")
    p.add_argument("--loss-weights", metavar="JSON", help='e.g. \'{"mel_weight": 45, "semantic_weight": 5}\'')
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument(
        "--dropout", type=float, default=0.1, help="the decoder's ResNet-block dropout (default 0.1)"
    )
    p.add_argument(
        "--discriminator-channels",
        metavar="MPD,SPEC",
        help="first-layer widths of the two discriminators (default 16,32, X-Codec-2.0's)",
    )
    p.add_argument(
        "--save-every", type=int, default=save_every, help=f"checkpoint every K steps (default {save_every})"
    )
    p.add_argument("--sample-every", type=int, help="write a decoded sample every K steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and of fresh weights (default 0)")
    _add_storage_options(p)
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    multi = p.add_argument_group("several hosts (jax.distributed)")
    multi.add_argument(
        "--distributed", action="store_true", help="jax.distributed.initialize() with no arguments"
    )
    multi.add_argument("--coordinator-address", metavar="HOST:PORT", help="process 0's address")
    multi.add_argument("--num-processes", type=int)
    multi.add_argument("--process-id", type=int)
    p.set_defaults(func=cmd_train, recipe_default=recipe)


def _add_train_parsers(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the codec (X-Codec2's GAN recipe, or reconstruction losses); resumes if rerun",
        description="Train the whole codec with X-Codec2's recipe on every device and host. OUT ends up "
        "a checkpoint (Xcodec2Codec.from_pretrained(OUT)); `xcodec2-jax export OUT -o DIR` writes it in "
        "transformers' layout.",
    )
    _add_train_arguments(p, "xcodec2", 10000, 8, 6.0, 1000)
    p = sub.add_parser(
        "finetune",
        help="train --recipe reconstruction on the decoder: adapt it to new audio (resumes if rerun)",
    )
    _add_train_arguments(p, "reconstruction", 1000, 4, 2.0, 500)
    p = sub.add_parser(
        "export",
        help="a checkpoint in transformers' layout: config.json, model.safetensors, preprocessor_config.json",
    )
    p.add_argument("model", help="any checkpoint the library loads (a train OUT, original, Orbax, Hub id)")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.set_defaults(func=cmd_export)


def _recipe(args) -> Recipe:
    finetune = args.recipe_default == "reconstruction" and args.recipe == "reconstruction"
    options = dict(
        name=args.recipe, learning_rate=args.learning_rate, compute_dtype=args.dtype, dropout=args.dropout
    )
    if finetune:  # the decoder's fine-tune: a short warm-up, then down to a tenth over the run
        warmup = max(1, args.steps // 20)
        options.update(warmup_steps=warmup, decay_steps=max(1, args.steps - warmup))
        options.update(
            final_learning_rate=args.learning_rate / 10, initial_learning_rate=args.learning_rate / 100
        )
    for name in ("initial_learning_rate", "warmup_steps", "decay_steps", "final_learning_rate"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.discriminator_channels:
        try:
            mpd, spec = (int(v) for v in args.discriminator_channels.split(","))
        except ValueError:
            given = args.discriminator_channels
            raise ValueError(f"--discriminator-channels takes MPD,SPEC, got {given!r}") from None
        options.update(mpd_channels=mpd, spec_channels=spec)
    if args.trainable:
        options["trainable"] = tuple(part.strip() for part in args.trainable.split(",") if part.strip())
    if args.loss_weights:
        try:
            weights = json.loads(args.loss_weights)
        except json.JSONDecodeError as e:
            raise ValueError(f"--loss-weights: not JSON ({e})") from None
        known = {f.name for f in dataclasses.fields(Recipe) if f.name.endswith("_weight")}
        if not isinstance(weights, dict) or set(weights) - known:
            raise ValueError(f"--loss-weights takes a JSON object with keys among {sorted(known)}")
        options.update(weights)
    return Recipe(**options)


def cmd_train(args, run: _Run) -> None:
    try:
        model = args.model if args.model or args.config else DEFAULT_MODEL_ID
        train(
            args.data,
            args.output,
            recipe=_recipe(args),
            model=model if not args.config else None,
            config=args.config,
            semantic_model=args.semantic_model,
            steps=args.steps,
            batch_size=args.batch_size,
            segment_seconds=args.segment_seconds,
            save_every=args.save_every,
            sample_every=args.sample_every,
            seed=args.seed,
            tensorboard=False if args.no_tensorboard else None,
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
            distributed=args.distributed,
            storage_options=args.storage_options,
        )
    except OSError as e:
        raise ModelLoadError(str(e)) from e
    except ValueError as e:
        run.fail(None, str(e))  # the data's errors name their path or URL, the options' their option


def cmd_export(args, run: _Run) -> None:
    try:
        config, params = load_checkpoint(resolve_checkpoint(args.model))
    except OSError as e:
        raise ModelLoadError(str(e)) from e
    save_transformers(args.output, params, config)
    print(f"wrote {args.output} (config.json, model.safetensors, preprocessor_config.json)")


def add_tokenize_parser(sub, common, func) -> None:
    p = sub.add_parser(
        "tokenize",
        parents=[common],
        help="a corpus -> Parquet shards of codes, on every device and host, resumable",
        description="Tokenize audio files, manifests (.txt, .jsonl), Parquet files (datasets layout) or "
        "WebDataset tar shards, local or at URLs (s3://, gs://, hf://, https://; globs allowed), into "
        "OUT/data/train-*.parquet (id, codes, num_codes, duration, num_samples and the sources' metadata), "
        "OUT/errors.jsonl and OUT/manifest.json; OUT may be a URL too. Run the same command again to finish "
        "an interrupted job. Exit code 2 when any item failed.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="SRC",
        help="directories, .txt/.jsonl manifests, .parquet files, .tar/.tar.gz shards (paths or URLs)",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (a path or URL)")
    p.add_argument(
        "--columns",
        type=_column_list,
        default=None,
        metavar="A,B",
        help="metadata fields to carry into the output (default: all; '' for none)",
    )
    _add_storage_options(p)
    p.add_argument("--shard-size", type=int, default=1000, help="items per output shard (default 1000)")
    p.add_argument(
        "--num-workers", type=int, default=None, help="host threads reading audio (default: cores)"
    )
    p.add_argument(
        "--max-window-seconds",
        type=float,
        default=None,
        help="longer items are encoded in overlapping windows of this length (default 30)",
    )
    p.add_argument(
        "--context-seconds", type=float, default=None, help="context on each side of a window (default 2)"
    )
    multi = p.add_argument_group("several hosts (jax.distributed)")
    multi.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() without arguments: it detects TPU pods, Slurm and Open MPI",
    )
    multi.add_argument("--coordinator-address", metavar="HOST:PORT", help="process 0's address")
    multi.add_argument("--num-processes", type=int, metavar="N")
    multi.add_argument("--process-id", type=int, metavar="I")
    p.set_defaults(func=func)


def run_tokenize(args) -> int:
    """Run the subcommand; prints the summary (process 0) and returns the number of failed items."""
    result = tokenize(
        args.inputs,
        args.output,
        model=args.model,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        precision=args.precision,
        num_workers=args.num_workers,
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        distributed=args.distributed,
        compilation_cache=False if args.no_cache else args.cache_dir,
        max_window_seconds=args.max_window_seconds,
        context_seconds=args.context_seconds,
        storage_options=args.storage_options,
        columns=args.columns,
    )
    if result["run"]["process_id"] == 0:
        print(summary_line(result, args.output), file=sys.stderr)
    return result["num_errors"]


def _add_storage_options(p) -> None:
    p.add_argument(
        "--storage-options",
        type=_json_object,
        default=None,
        metavar="JSON",
        help='options of the URLs\' filesystems, e.g. \'{"endpoint_url": "http://host:9000"}\' '
        "(default: each filesystem's standard configuration: AWS_* variables, Google credentials)",
    )


def _column_list(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def summary_line(result: dict, out: str) -> str:
    run = result["run"]
    hours = result["audio_seconds"] / 3600
    line = (
        f"xcodec2-jax: {out}: {result['num_items']} items ({hours:.2f} h of audio) in "
        f"{result['complete_shards']} of {result['num_shards']} shards; this run: {run['items']} items in "
        f"{run['wall_s']:.1f} s, {run['audio_seconds'] / max(run['wall_s'], 1e-9):.1f} audio-s/s on "
        f"{result['num_devices']} device(s) x {result['num_processes']} process(es)"
    )
    if result["num_errors"]:
        line += f"; {result['num_errors']} failed items in {out}/errors.jsonl"
    return line


def _add_cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="list or clear the params cache (prepared checkpoints)")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--cache-dir", metavar="DIR", help="the compilation cache folder (default as for encode)"
    )
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[where], help="entries with size, last use and source")
    clear = actions.add_parser("clear", parents=[where], help="remove every entry, or the one named KEY")
    clear.add_argument(
        "key", nargs="?", metavar="KEY", help="an entry's key (or its prefix), as `cache list` shows"
    )
    p.set_defaults(func=cmd_cache)


def cmd_cache(args, run: _Run) -> None:
    directory = prepared.params_dir(resolve_cache_dir(args.cache_dir))
    if directory is None:
        run.fail("cache", "the cache is off (XCODEC2_JAX_CACHE_DIR=off)")
        return
    if not os.path.isdir(directory):
        print(f"{directory}: empty")
        return
    if args.action == "list":
        print(prepared.format_entries(prepared.entries(directory)))
        return
    try:
        removed = prepared.clear(directory, args.key)
    except ValueError as e:
        run.fail(directory, str(e))
        return
    print(f"{directory}: removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("xcodec2-jax: --batch-size must be at least 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    run = _Run()
    limit = getattr(args, "params_cache_max_gb", None)
    if limit is not None:
        try:
            prepared.max_bytes_setting(limit)
        except ValueError as e:
            print(f"xcodec2-jax: --params-cache-max-gb: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        # The loaders read the limit from the environment (as a user's setting would be).
        os.environ[prepared.ENV_MAX_GB] = str(limit)
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
    (a first-ever ``encode`` ran several), and freezing again at the end spares the exit its walk
    over everything the run made."""
    import gc

    gc.freeze()
    try:
        return main()
    finally:
        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console_main())
