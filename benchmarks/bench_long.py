"""Long audio and streaming decode: how close windows and streams come to the one-piece codec, what
a stream costs, and that memory stays bounded however long the audio.

Three commands (random-weight models built like the tests' references, through ``save_pretrained``
and our loader; ``--config small`` is the tests' small config with the tests' seed, so the figures
it gives are the ones ``tests/test_windows.py`` asserts)::

    python -m benchmarks.bench_long quality --config small        # agreement / SNR vs context, lookahead
    python -m benchmarks.bench_long latency --config full         # first audio, per-push real-time factor
    python -m benchmarks.bench_long rss --config small --minutes 10 60   # peak RSS, one child per run

One JSON line per measurement goes to ``--out`` (default: stdout only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HOP = 320
RATE = 16000


_WORK = None


def checkpoint(config: str) -> str:
    """A random-weight reference checkpoint for ``config`` ("small": the tests' SMALL_CONFIG, seed 0;
    "full": transformers' default config), saved once per run in a temporary folder removed at exit."""
    global _WORK
    if _WORK is None:
        import atexit
        import shutil
        import tempfile

        _WORK = tempfile.mkdtemp(prefix="xcodec2_bench_long_")
        atexit.register(shutil.rmtree, _WORK, True)
    path = os.path.join(_WORK, config)
    if not os.path.isfile(os.path.join(path, "config.json")):
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from conftest import SMALL_CONFIG, build_reference

        model = build_reference(SMALL_CONFIG if config == "small" else None)
        model.save_pretrained(path)
    return path


def long_speech(reps: int) -> np.ndarray:
    """The test utterances ``reps`` times with 0.25 s pauses (as tests/test_windows.py builds it)."""
    import glob

    import soundfile as sf

    files = sorted(glob.glob(os.path.join(REPO, "tests", "data", "*.wav")))
    gap = np.zeros(4000, np.float32)
    parts = [p for _ in range(reps) for f in files for p in (sf.read(f, dtype="float32")[0], gap)]
    return np.concatenate(parts)[:-1234]


def snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    ref, x = ref.astype(np.float64), x.astype(np.float64)
    noise = np.sum((x - ref) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))


def emit(args, row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


def stream_decode(codec, codes, chunk, lookahead, context, push=1) -> tuple[np.ndarray, list[float]]:
    """Push ``codes`` ``push`` at a time (an LLM's pace); returns the audio and each push's seconds."""
    stream = codec.decode_stream(chunk=chunk, lookahead=lookahead, context=context)
    parts, times, cpu = [], [], []
    for i in range(0, len(codes), push):
        t, c = time.perf_counter(), time.process_time()
        parts.append(stream.push(codes[i : i + push]))
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    parts.append(stream.flush())
    stream_decode.cpu_seconds = cpu  # per push, for `latency` on a machine shared with other work
    return np.concatenate(parts), times


# --------------------------------------------------------------------------------------------- quality
def quality(args) -> None:
    from xcodec2_jax import Xcodec2Codec

    codec = Xcodec2Codec.from_pretrained(checkpoint(args.config), compilation_cache=False)
    audio = long_speech(args.reps)
    base = {"config": args.config, "seconds": round(len(audio) / RATE, 2)}
    whole_codes = codec.encode(audio, RATE, max_window_seconds=None)[0]
    core = args.core
    for context in args.encode_contexts if "encode" in args.parts else []:
        codes = codec.encode(audio, RATE, max_window_seconds=core + 2 * context, context_seconds=context)[0]
        agreement = float(np.mean(codes == whole_codes))
        emit(args, {**base, "what": "encode", "core_s": core, "context_s": context, "agreement": agreement})
    whole = codec.decode(whole_codes, max_window_seconds=None)[0]
    for context in args.decode_contexts if "decode" in args.parts else []:
        out = codec.decode(
            whole_codes,
            max_window_seconds=core + 2 * context,
            context_seconds=context,
            crossfade_seconds=args.crossfade,
        )[0]
        emit(
            args,
            {
                **base,
                "what": "decode",
                "core_s": core,
                "context_s": context,
                "crossfade_s": args.crossfade,
                "snr_db": snr_db(whole, out),
            },
        )
    n = min(len(whole_codes), round(args.stream_seconds * 50)) if args.stream_seconds else len(whole_codes)
    stream_whole = codec.decode(whole_codes[:n], max_window_seconds=None)[0]
    for context in args.stream_contexts if "stream" in args.parts else []:
        for lookahead in args.lookaheads:
            out, _ = stream_decode(codec, whole_codes[:n], args.chunk, lookahead, context, push=args.chunk)
            assert out.shape == stream_whole.shape
            emit(
                args,
                {
                    **base,
                    "what": "stream",
                    "stream_codes": n,
                    "chunk": args.chunk,
                    "context": context,
                    "lookahead": lookahead,
                    "snr_db": snr_db(stream_whole, out),
                },
            )


# --------------------------------------------------------------------------------------------- latency
def latency(args) -> None:
    from xcodec2_jax import Xcodec2Codec

    codec = Xcodec2Codec.from_pretrained(checkpoint(args.config), compilation_cache=False)
    # Decoding cost does not depend on the code values: random codes spare a full-config encode.
    n = round(args.stream_seconds * RATE / HOP)
    codes = np.random.default_rng(0).integers(0, codec.config.codebook_size, n).astype(np.int32)
    for chunk, lookahead, context in args.settings:
        stream = codec.decode_stream(chunk=chunk, lookahead=lookahead, context=context)
        t = time.perf_counter()
        stream.push(codes[: chunk + lookahead])  # compiles the stream's one program
        compile_s = time.perf_counter() - t
        stream.flush()
        out, times = stream_decode(codec, codes, chunk, lookahead, context, push=1)
        first = next(i for i, t in enumerate(times) if i + 1 >= chunk + lookahead)
        # The pushes that decoded a chunk: one every `chunk` codes once the lookahead is there.
        ready = chunk + lookahead
        decoding = [i for i in range(len(times)) if i + 1 >= ready and (i + 1 - ready) % chunk == 0]
        steps = [times[i] for i in decoding]
        cpu = [stream_decode.cpu_seconds[i] for i in decoding]
        emit(
            args,
            {
                "config": args.config,
                "what": "latency",
                "chunk": chunk,
                "lookahead": lookahead,
                "context": context,
                "first_audio_codes": stream.first_audio_codes,
                "first_push_s": times[first],
                "push_s_median": float(np.median(steps)),
                "rtf": float(np.median(steps)) / (chunk * HOP / RATE),
                "first_compile_s": compile_s,
                "audio_s": len(out) / RATE,
                "push_cpu_s_median": float(np.median(cpu)),
                "cpu_count": os.cpu_count(),
                "loadavg": os.getloadavg()[0],
            },
        )


# ------------------------------------------------------------------------------------------------- rss
CHILD = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[4])
from benchmarks.bench_long import long_speech
from xcodec2_jax import Xcodec2Codec

codec = Xcodec2Codec.from_pretrained(sys.argv[1], compilation_cache=False)
minutes, what = float(sys.argv[2]), sys.argv[3]
loop = long_speech(1)
n = round(minutes * 60 * 16000)
audio = np.resize(loop, n)
if what == "decode":
    codes = np.random.default_rng(0).integers(0, codec.config.codebook_size, n // 320 - 1).astype(np.int32)
    del audio
t = time.perf_counter()
out = codec.encode(audio, 16000) if what == "encode" else codec.decode(codes)
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps({"wall_s": wall, "max_rss_mb": peak}))
"""


def rss(args) -> None:
    path = checkpoint(args.config)
    for what in args.stages:
        for minutes in args.minutes:
            result = subprocess.run(
                [sys.executable, "-c", CHILD, path, str(minutes), what, REPO],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": REPO},
            )
            if result.returncode:
                sys.exit(result.stderr[-3000:])
            got = json.loads([s for s in result.stdout.splitlines() if s.startswith("RESULT ")][-1][7:])
            emit(
                args,
                {
                    "config": args.config,
                    "what": f"rss_{what}",
                    "minutes": minutes,
                    **got,
                    "rtf": got["wall_s"] / (minutes * 60),
                },
            )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("quality", "latency", "rss"):
        p = sub.add_parser(name)
        p.add_argument("--config", choices=("small", "full"), default="small")
        p.add_argument("--out", default=None, help="append JSON lines here")
    q = sub.choices["quality"]
    q.add_argument("--parts", nargs="+", default=["encode", "decode", "stream"])
    q.add_argument("--reps", type=int, default=2, help="times the 10 s of test speech are repeated")
    q.add_argument("--core", type=float, default=3.0, help="seconds kept per window")
    q.add_argument("--encode-contexts", type=float, nargs="+", default=[0, 0.5, 1, 1.5, 2, 3, 5])
    q.add_argument("--decode-contexts", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1, 1.5, 2, 3])
    q.add_argument("--crossfade", type=float, default=0.2)
    q.add_argument("--chunk", type=int, default=25)
    q.add_argument("--stream-contexts", type=int, nargs="+", default=[0, 10, 25, 50, 100, 200])
    q.add_argument("--lookaheads", type=int, nargs="+", default=[0, 2, 5, 10, 25, 50])
    q.add_argument("--stream-seconds", type=float, default=0, help="stream only the first seconds (0: all)")
    lat = sub.choices["latency"]
    lat.add_argument("--stream-seconds", type=float, default=8.0)
    lat.add_argument(
        "--settings",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        nargs="+",
        default=[(50, 10, 100), (25, 5, 50)],
        help="chunk,lookahead,context",
    )
    r = sub.choices["rss"]
    r.add_argument("--minutes", type=float, nargs="+", default=[10, 60])
    r.add_argument("--stages", nargs="+", default=["encode", "decode"], choices=("encode", "decode"))
    args = parser.parse_args(argv)
    {"quality": quality, "latency": latency, "rss": rss}[args.command](args)


if __name__ == "__main__":
    main()
