"""The whole corpus job: ``xcodec2_jax.tokenize`` against a PyTorch script written the way X-Codec-2.0's
``inference_save_code.py`` is (transformers ``Xcodec2Model``, batches of padded audio without masks,
one ``.npy`` per file), on the same folder of files, each in a fresh process, in alternating rounds.

Reported per run: audio-seconds per second of the whole process (start-up, model load, reading,
features, encode, writing), ours with a warm compilation cache (a corpus job compiles once; the
first run's compile time is reported apart, ``compile_s``), the ratio, and from ``tokenize``'s own
statistics the device idle fraction (a lower bound: the share of the encode loop in which no batch
was in flight) and the compiled shapes. Codes are compared per file (ours vs the baseline's; the
baseline pads batches without masks, so an item's last codes can differ from its codes alone: the
agreement is reported, not asserted). Run from the repository root::

    python -m benchmarks.bench_tokenize --checkpoint /tmp/xcodec2-full --files 16 --rounds 2
    python -m benchmarks.bench_tokenize --build-checkpoint /tmp/xcodec2-full   # random full model
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from .bench_cli import _child_env, build_checkpoint
from .bench_codec import SAMPLING_RATE, speech_loop

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results_tokenize.jsonl")

# X-Codec-2.0's inference_save_code.py, on transformers: padded batches, no masks, one .npy per file.
# (Our numpy feature extractor stands in for transformers', which needs torchaudio; they are equal.)
TORCH_SCRIPT = r"""
import glob, json, math, os, sys, time
import numpy as np
import soundfile as sf
import torch
from transformers import Xcodec2Model
from xcodec2_jax.modeling.features import Xcodec2FeatureExtractor

src, out, checkpoint, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(os.cpu_count())
model = Xcodec2Model.from_pretrained(checkpoint).eval()
fe = Xcodec2FeatureExtractor()
files = sorted(glob.glob(os.path.join(src, "*.wav")))
os.makedirs(out, exist_ok=True)
encode_s = 0.0
for s in range(0, len(files), batch_size):
    batch = files[s : s + batch_size]
    audio = [sf.read(f, dtype="float32")[0] for f in batch]
    inputs = {k: torch.from_numpy(v) for k, v in fe(audio, sampling_rate=16000).items()}
    inputs.pop("input_features_mask")  # the script pads and runs the batch as one, no masks
    t = time.perf_counter()
    with torch.inference_mode():
        codes = model.encode(**inputs).audio_codes[:, 0].numpy()
    encode_s += time.perf_counter() - t
    for f, a, c in zip(batch, audio, codes):
        n = math.ceil((len(a) + 1) / 320)
        np.save(os.path.join(out, os.path.basename(f)[:-4] + ".npy"), c[:n].astype(np.int32))
print("RESULT" + json.dumps({"encode_s": encode_s}))
"""

OURS_SCRIPT = r"""
import json, sys
from xcodec2_jax import tokenize
src, out, checkpoint, batch_size, cache = sys.argv[1:6]
result = tokenize(
    src, out, model=checkpoint, batch_size=int(batch_size), compilation_cache=cache, progress=False
)
print("RESULT" + json.dumps(result["run"]))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a transformers-format checkpoint (random weights are fine)")
    p.add_argument("--build-checkpoint", metavar="DIR", help="build a random full model there and use it")
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--min-seconds", type=float, default=4.5)
    p.add_argument("--max-seconds", type=float, default=6.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON lines appended here")
    return p.parse_args(argv)


def utterances(files: int, lo: float, hi: float) -> list[np.ndarray]:
    """``files`` cuts of the looped test speech, of lengths spread over [lo, hi] s (fixed seed)."""
    loop = np.tile(speech_loop()[0], 8)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(files):
        n = int(rng.uniform(lo, hi) * SAMPLING_RATE)
        start = int(rng.integers(0, loop.size - n))
        out.append(loop[start : start + n])
    return out


def make_corpus(folder: str, files: int, lo: float, hi: float) -> float:
    """``files`` speech utterances of lengths spread over [lo, hi] s as WAV files; their total seconds."""
    import soundfile as sf

    clips = utterances(files, lo, hi)
    for i, clip in enumerate(clips):
        sf.write(os.path.join(folder, f"utt{i:04d}.wav"), clip, SAMPLING_RATE)
    return sum(len(c) for c in clips) / SAMPLING_RATE


def run(script: str, args: list[str], timeout: float) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=_child_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}:\n{proc.stderr[-3000:]}")
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1]
    return wall, json.loads(line[len("RESULT") :])


def our_codes(out: str) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    rows = {}
    for path in glob.glob(os.path.join(out, "data", "*.parquet")):
        for row in pq.read_table(path, columns=["id", "codes"]).to_pylist():
            rows[row["id"][:-4]] = np.asarray(row["codes"], np.int32)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    checkpoint = args.checkpoint or build_checkpoint(args.build_checkpoint, "full")
    work = tempfile.mkdtemp(prefix="xcodec2_bench_tokenize_")
    try:
        return _measure(args, checkpoint, work)
    finally:  # the corpus, the outputs and their params cache: gigabytes, never left behind
        shutil.rmtree(work, ignore_errors=True)


def _measure(args, checkpoint: str, work: str) -> int:
    src = os.path.join(work, "src")
    os.makedirs(src)
    seconds = make_corpus(src, args.files, args.min_seconds, args.max_seconds)
    cache = os.path.join(work, "cache")
    common = [src, None, checkpoint, str(args.batch_size)]

    # First run of ours: compiles every shape into a fresh cache (reported as the job's compile cost).
    wall, first = run(
        OURS_SCRIPT,
        [src, os.path.join(work, "ours-first"), checkpoint, str(args.batch_size), cache],
        args.timeout,
    )
    print(f"ours, first run (cold cache): {wall:.1f} s, compile {first['compile_s']:.1f} s", flush=True)
    rows = []
    for r in range(args.rounds):
        order = ["torch", "ours"] if r % 2 == 0 else ["ours", "torch"]
        for impl in order:
            out = os.path.join(work, f"{impl}-{r}")
            if impl == "ours":
                wall, stats = run(
                    OURS_SCRIPT, [src, out, checkpoint, str(args.batch_size), cache], args.timeout
                )
            else:
                wall, stats = run(TORCH_SCRIPT, common[:1] + [out] + common[2:], args.timeout)
            # tokenize's own wall_s is its encode loop's; the row's wall_s is the whole process's.
            stats = {("loop_wall_s" if k == "wall_s" else k): v for k, v in stats.items()}
            rows.append({"impl": impl, "round": r, "wall_s": wall, "audio_s_per_s": seconds / wall, **stats})
            print(f"round {r} {impl}: {wall:.1f} s, {seconds / wall:.2f} audio-s/s", flush=True)

    ours = our_codes(os.path.join(work, "ours-0"))
    theirs = {os.path.basename(p)[:-4]: np.load(p) for p in glob.glob(os.path.join(work, "torch-0", "*.npy"))}
    assert sorted(ours) == sorted(theirs)
    equal = sum(int(np.array_equal(ours[k], theirs[k])) for k in ours)
    agree = float(np.mean(np.concatenate([ours[k] == theirs[k] for k in ours])))
    med = {
        i: float(np.median([r["audio_s_per_s"] for r in rows if r["impl"] == i])) for i in ("ours", "torch")
    }
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": checkpoint,
        "files": args.files,
        "audio_seconds": seconds,
        "seconds_range": [args.min_seconds, args.max_seconds],
        "batch_size": args.batch_size,
        "loadavg": os.getloadavg()[0],
        "ours_audio_s_per_s": med["ours"],
        "torch_audio_s_per_s": med["torch"],
        "ratio": med["ours"] / med["torch"],
        "ours_first_run_compile_s": first["compile_s"],
        "ours_first_run_wall_s": first["wall_s"],
        "device_idle_fraction": float(
            np.median([r["device_idle_fraction"] for r in rows if r["impl"] == "ours"])
        ),
        "shapes": first["shapes"],
        "files_with_equal_codes": equal,
        "codes_agreement": agree,
        "runs": rows,
    }
    with open(args.out, "a") as f:
        f.write(json.dumps(summary) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
