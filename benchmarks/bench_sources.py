"""Does the host pipeline keep the device fed from tar shards and buckets as from local files?

The same files (FLAC speech, 16 kHz) are tokenized as a local folder, as local WebDataset tar
shards (audio + JSON) and as those shards on an S3 server started on 127.0.0.1 (moto, through
s3fs), in alternating rounds in one process, after one untimed run that compiles. Reported per
source: items per second of tokenize's encode loop (reading, decoding and features on host threads,
encoding on the device; the model load is not in it), its device idle fraction and the time the loop
waited for host data; and, apart, the host's decode rate of the same clips as MP3 and as FLAC (items
and audio seconds per second on one core). Run from the repository root::

    python -m benchmarks.bench_sources --build-checkpoint /tmp/xcodec2-full
    python -m benchmarks.bench_sources --checkpoint /tmp/xcodec2-full --rounds 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time

import numpy as np

from xcodec2_jax import tokenize
from xcodec2_jax.inference.audio import read_audio
from xcodec2_jax.utils.storage import filesystem

from . import measure
from .bench_cli import build_checkpoint
from .bench_codec import SAMPLING_RATE
from .bench_tokenize import utterances

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results_sources.jsonl")
SOURCES = ("folder", "local tars", "S3 tars")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a transformers-format checkpoint (random weights are fine)")
    p.add_argument("--build-checkpoint", metavar="DIR", help="build a random model there and use it")
    p.add_argument("--config", choices=("tiny", "full"), default="full", help="for --build-checkpoint")
    p.add_argument("--files", type=int, default=12)
    p.add_argument("--per-shard", type=int, default=4, help="samples per tar shard")
    p.add_argument("--min-seconds", type=float, default=4.5)
    p.add_argument("--max-seconds", type=float, default=6.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON lines appended here")
    return p.parse_args(argv)


def encoded(audio: np.ndarray, fmt: str) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLING_RATE, format=fmt)
    return buffer.getvalue()


def write_sources(work: str, flacs: list[bytes], per_shard: int) -> tuple[str, str]:
    """The folder and the folder of tar shards holding ``flacs``."""
    folder, shards = os.path.join(work, "folder"), os.path.join(work, "shards")
    os.makedirs(folder)
    os.makedirs(shards)
    for i, data in enumerate(flacs):
        with open(os.path.join(folder, f"utt{i:04d}.flac"), "wb") as f:
            f.write(data)
    for s in range(0, len(flacs), per_shard):
        with tarfile.open(os.path.join(shards, f"shard-{s // per_shard:05d}.tar"), "w") as tar:
            for i in range(s, min(s + per_shard, len(flacs))):
                for name, data in ((f"utt{i:04d}.flac", flacs[i]), (f"utt{i:04d}.json", b'{"text": "x"}')):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder, shards


def decode_rates(audio: list[np.ndarray], reps: int = 3) -> dict:
    """Items and audio seconds decoded per second on one thread, MP3 and FLAC (``read_audio``)."""
    seconds = sum(len(a) for a in audio) / SAMPLING_RATE
    out = {}
    for fmt in ("MP3", "FLAC"):
        data = [encoded(a, fmt) for a in audio]
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            for d in data:
                read_audio(io.BytesIO(d))
            times.append(time.perf_counter() - start)
        best = min(times)
        out[fmt.lower()] = {
            "items_per_s_per_core": len(data) / best,
            "audio_s_per_s_per_core": seconds / best,
        }
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    work = tempfile.mkdtemp(prefix="xcodec2_bench_sources_")
    try:
        checkpoint = args.checkpoint or build_checkpoint(
            args.build_checkpoint or os.path.join(work, "model"), args.config
        )
        command = "python -m benchmarks.bench_sources " + " ".join(argv if argv is not None else sys.argv[1:])
        return _measure(args, checkpoint, work, command)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(args, checkpoint: str, work: str, command: str) -> int:
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from object_stores import serve  # the tests' S3 server on 127.0.0.1

    audio = utterances(args.files, args.min_seconds, args.max_seconds)
    folder, shards = write_sources(work, [encoded(a, "FLAC") for a in audio], args.per_shard)
    seconds = sum(len(a) for a in audio) / SAMPLING_RATE
    run_id, start_load = measure.run_id(), measure.loadavg()
    with serve("s3") as s3:
        bucket = s3.make_bucket("bench-sources")
        fs, _ = filesystem(f"s3://{bucket}", s3.storage_options)
        for name in sorted(os.listdir(shards)):
            fs.put_file(os.path.join(shards, name), f"{bucket}/shards/{name}")
        sources = {"folder": folder, "local tars": shards, "S3 tars": f"s3://{bucket}/shards"}
        count = [0]

        def once(source: str) -> dict:
            count[0] += 1
            out = os.path.join(work, f"out-{count[0]}")
            result = tokenize(
                sources[source],
                out,
                model=checkpoint,
                batch_size=args.batch_size,
                shard_size=args.per_shard,
                storage_options=s3.storage_options if source == "S3 tars" else None,
                progress=False,
            )
            shutil.rmtree(out)
            assert result["num_items"] == args.files and result["num_errors"] == 0, result
            return result["run"]

        first = once("folder")  # compiles every shape
        runs: dict[str, list[dict]] = {s: [] for s in SOURCES}
        for r in range(args.rounds):
            for source in SOURCES[r % 3 :] + SOURCES[: r % 3]:
                run = once(source)
                runs[source].append(run)
                rate = run["items"] / run["wall_s"]
                print(
                    f"round {r} {source}: {rate:.2f} items/s, idle {run['device_idle_fraction']:.2f}",
                    flush=True,
                )
    rates = {s: statistics.median(run["items"] / run["wall_s"] for run in runs[s]) for s in SOURCES}
    row = {
        "run_id": run_id,
        "git": measure.git_state(),
        "command": command,
        "device": measure.environment(os.cpu_count())["device"],
        "files": args.files,
        "audio_seconds": seconds,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "compile_s": first["compile_s"],
        "items_per_s": rates,
        "relative_to_folder": {s: rates[s] / rates["folder"] for s in SOURCES},
        "device_idle_fraction": {
            s: statistics.median(run["device_idle_fraction"] for run in runs[s]) for s in SOURCES
        },
        "wait_s": {s: statistics.median(run["wait_s"] for run in runs[s]) for s in SOURCES},
        "decode": decode_rates(audio),
        "loadavg_start": start_load,
        "loadavg_end": measure.loadavg(),
    }
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("items_per_s", "relative_to_folder", "decode")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
