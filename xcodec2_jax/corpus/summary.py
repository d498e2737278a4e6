"""The ``xcodec2-jax tokenize`` subcommand's options and its one-line summary."""

from __future__ import annotations


def add_tokenize_parser(sub, common, func) -> None:
    p = sub.add_parser(
        "tokenize",
        parents=[common],
        help="a corpus -> Parquet shards of codes, on every device and host, resumable",
        description="Tokenize audio files, manifests (.txt, .jsonl) or Parquet files (datasets layout) into "
        "OUT/data/train-*.parquet (id, codes, num_codes, duration), OUT/errors.jsonl and OUT/manifest.json. "
        "Run the same command again to finish an interrupted job. Exit code 2 when any item failed.",
    )
    p.add_argument(
        "inputs", nargs="+", metavar="SRC", help="directories, .txt/.jsonl manifests, .parquet files"
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT")
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
    import sys

    from .run import tokenize

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
    )
    if result["run"]["process_id"] == 0:
        print(summary_line(result, args.output), file=sys.stderr)
    return result["num_errors"]


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
