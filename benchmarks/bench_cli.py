"""The user's path against PyTorch: ``xcodec2-jax encode`` vs a transformers script, in fresh processes,
and ``Xcodec2Codec.encode`` vs the reference's ``encode`` inside one warm process.

(a) ``cli_encode_cold`` / ``cli_encode_warm``: wall time and peak RSS (from the OS: ``os.wait4``'s
    ``ru_maxrss`` of each child, launched from a small trampoline process) of
    ``xcodec2-jax encode six.wav -o OUT --model CKPT`` with an empty
    compilation cache (first-ever run) and with the cache that run left (warm), against a script
    that does what a transformers user does: ``Xcodec2Model.from_pretrained`` + features + ``encode``
    + ``np.save``. transformers' ``Xcodec2FeatureExtractor`` needs torchaudio, which does not load
    beside the CPU torch used here, so the script uses our numpy ``Xcodec2FeatureExtractor`` (equal to
    it); importing it imports JAX, whose cost in the script is measured apart (``extractor_import``).
    Each round runs every child once, the first one rotating (cold then warm stay in that order, the
    warm run reusing that round's cache folder).
(b) ``codec_encode``: in this process, ``codec.encode(audio, 16000)`` (features, bucketing, the jitted
    model) vs the reference's features + ``encode`` on the same audio, warm, in alternating rounds
    with a JAX matmul probe; plus our load time (``Xcodec2Codec.from_pretrained``: ``load_checkpoint``
    and placing the weights on the device), first call and compile time (first encode minus the warm
    median), and the reference's ``from_pretrained`` time.

Codes are compared in every run (ours vs the reference, expected 100% equal). One JSON line per row goes
to ``--out``, with the environment fields of ``bench_codec`` and ratios against torch. Run from the
repository root::

    python -m benchmarks.bench_cli --build-checkpoint /tmp/xcodec2-full     # random full model, 2.5 GB
    python -m benchmarks.bench_cli --checkpoint /tmp/xcodec2-full --rounds 3
    python -m benchmarks.bench_cli --config tiny --rounds 1 --out /tmp/cli.jsonl   # seconds; the CI test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from .bench_codec import SAMPLING_RATE, TINY_CONFIG, make_batch, speech_loop, spread_weights_

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results_cli.jsonl")
MB = 1024.0  # ru_maxrss is in KiB on Linux

# What a transformers user runs to encode one file (torch threads as in bench_codec: all CPUs).
TORCH_SCRIPT = r"""
import os, sys
import numpy as np
import soundfile as sf
import torch
from transformers import Xcodec2Model
from xcodec2_jax.modeling.features import Xcodec2FeatureExtractor

wav, out, checkpoint = sys.argv[1:4]
torch.set_num_threads(os.cpu_count())
model = Xcodec2Model.from_pretrained(checkpoint).eval()
audio, rate = sf.read(wav, dtype="float32")
inputs = {k: torch.from_numpy(v) for k, v in Xcodec2FeatureExtractor()(audio, sampling_rate=rate).items()}
with torch.inference_mode():
    codes = model.encode(**inputs).audio_codes
np.save(out, codes[0, 0].numpy().astype(np.int32))
"""
EXTRACTOR_IMPORT = (
    "import numpy, soundfile; from xcodec2_jax.modeling.features import Xcodec2FeatureExtractor"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_cli", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="transformers checkpoint directory (default: build --config's)")
    p.add_argument(
        "--build-checkpoint",
        metavar="DIR",
        help="write a random-weight checkpoint of --config to DIR (transformers' save_pretrained, codes "
        "spread as in bench_codec; full: 2.5 GB) and benchmark it unless --build-only",
    )
    p.add_argument("--build-only", action="store_true", help="with --build-checkpoint: only build")
    p.add_argument("--config", choices=("full", "tiny"), default="full", help="model built when needed")
    p.add_argument("--duration", type=float, default=6.0, help="seconds of speech in the file (default 6)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of fresh processes (part a)")
    p.add_argument("--reps", type=int, default=5, help="in-process timed rounds (part b)")
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the untimed child of each kind that first brings libraries and weights into the OS "
        "page cache (without it the first timed child also pays cold disk reads)",
    )
    p.add_argument(
        "--codec-cache",
        choices=("off", "warm"),
        default="off",
        help="part (b)'s compilation cache: off (default: compile_s is a real compilation) or warm "
        "(part (a)'s last cache folder: compile_s is then the cache load; for quick checks)",
    )
    p.add_argument("--skip-cli", action="store_true", help="part (b) only")
    p.add_argument("--skip-codec", action="store_true", help="part (a) only")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a child is killed")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSONL file for the results")
    p.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def log(args, msg: str) -> None:
    if not args.quiet:
        print(msg, flush=True)


def build_checkpoint(path: str, config: str, seed: int = 0) -> str:
    """transformers' Xcodec2Model with random weights whose codes spread, saved with save_pretrained."""
    import torch
    from transformers import Xcodec2Config as TorchConfig
    from transformers import Xcodec2Model as TorchModel

    torch.manual_seed(seed)
    model = TorchModel(TorchConfig(**(TINY_CONFIG if config == "tiny" else {}))).eval()
    spread_weights_(model, speech_loop()[0][: 2 * SAMPLING_RATE], seed)
    model.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------- (a) processes


def _child_env() -> dict:
    """The benchmark's environment for children: no compilation cache configured from outside (each
    run names its own), passive OpenMP waiting as in bench_codec, offline."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XCODEC2_JAX_CACHE_DIR")
    }
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    return env


# Launches one child and reports its wall time and rusage. ``ru_maxrss`` counts the pages a child shares
# with its parent between fork and exec, so a child forked straight from this (large) process would
# report at least this process's RSS; forked from this small trampoline, it reports its own.
TRAMPOLINE = r"""
import json, os, subprocess, sys, time
report, cmd = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
proc = subprocess.Popen(cmd)
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
with open(report, "w") as f:
    json.dump({"wall_s": wall, "max_rss_kib": usage.ru_maxrss, "user_s": usage.ru_utime,
               "sys_s": usage.ru_stime, "exit_code": os.waitstatus_to_exitcode(status)}, f)
"""


def run_child(cmd: list[str], env: dict, timeout: float, log_path: str) -> dict:
    """Run ``cmd`` to completion: wall seconds, peak RSS (MB) and CPU seconds of that process alone.

    Dirty pages are flushed first (``os.sync``, untimed): a first-ever run writes its 1.77 GB params
    cache, which the kernel writes back about 30 s later, inside whichever child runs then (measured:
    a first-ever run beside the write-back of the warm-up's params cache took 16.7 s, the next
    two 9.6 and 9.9 s). After a run ends, a user's machine does that write-back on its own time."""
    os.sync()
    report = log_path + ".json"
    with open(log_path, "w") as out:
        subprocess.run(
            [sys.executable, "-c", TRAMPOLINE, report, *cmd],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=True,
        )
    with open(report) as f:
        got = json.load(f)
    if got["exit_code"] != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{cmd[:3]}... exited with {got['exit_code']}:\n{tail}")
    return {
        "wall_s": got["wall_s"],
        "max_rss_mb": got["max_rss_kib"] / MB,
        "user_s": got["user_s"],
        "sys_s": got["sys_s"],
    }


def _cli_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "xcodec2-jax")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "xcodec2_jax"]


def run_processes(args, checkpoint: str, wav: str, work: str) -> dict[str, list[dict]]:
    """Part (a): per kind, one dict per round (wall, RSS, CPU, codes)."""
    env = _child_env()
    cli = _cli_command()

    def ours(name: str, cache_dir: str) -> dict:
        out = os.path.join(work, name)
        cmd = cli + ["encode", wav, "-o", out, "--model", checkpoint, "--cache-dir", cache_dir, "--overwrite"]
        m = run_child(cmd, env, args.timeout, out + ".log")
        m["codes"] = np.load(os.path.join(out, "six.npy"))
        m["cache_files"] = len(os.listdir(cache_dir))
        return m

    def torch_script(name: str) -> dict:
        out = os.path.join(work, name + ".npy")
        m = run_child(
            [sys.executable, "-c", TORCH_SCRIPT, wav, out, checkpoint], env, args.timeout, out + ".log"
        )
        m["codes"] = np.load(out)
        return m

    def extractor_import(name: str) -> dict:
        return run_child(
            [sys.executable, "-c", EXTRACTOR_IMPORT], env, args.timeout, os.path.join(work, name)
        )

    if not args.no_warmup:
        log(args, "untimed warm-up children (OS page cache) ...")
        ours("warmup", tempfile.mkdtemp(dir=work, prefix="cache_warmup_"))
        torch_script("warmup_torch")

    results: dict[str, list[dict]] = {"jax-cold": [], "jax-warm": [], "torch": [], "extractor-import": []}
    for r in range(max(1, args.rounds)):
        cache_dir = os.path.join(work, "cache_warm")  # the last round's stays, for --codec-cache warm
        shutil.rmtree(cache_dir, ignore_errors=True)
        os.makedirs(cache_dir)
        steps = [
            ("jax", lambda r=r, d=cache_dir: [ours(f"cold_{r}", d), ours(f"warm_{r}", d)]),
            ("torch", lambda r=r: [torch_script(f"torch_{r}")]),
            ("extractor-import", lambda r=r: [extractor_import(f"import_{r}.log")]),
        ]
        shift = r % len(steps)
        for kind, step in steps[shift:] + steps[:shift]:
            got = step()
            if kind == "jax":
                results["jax-cold"].append(got[0])
                results["jax-warm"].append(got[1])
            else:
                results[kind].append(got[0])
        last = {kind: runs[-1] for kind, runs in results.items()}
        log(
            args,
            f"round {r}: cold {last['jax-cold']['wall_s']:.1f} s, warm {last['jax-warm']['wall_s']:.1f} s, "
            f"torch {last['torch']['wall_s']:.1f} s; RSS {last['jax-cold']['max_rss_mb']:.0f} / "
            f"{last['jax-warm']['max_rss_mb']:.0f} / {last['torch']['max_rss_mb']:.0f} MB",
        )
        shutil.rmtree(os.path.join(work, f"cold_{r}"), ignore_errors=True)
    return results


def agreement(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = np.asarray(ours).reshape(-1), np.asarray(ref).reshape(-1)
    if ours.shape != ref.shape:
        return 0.0
    return float((ours == ref).mean())


def process_rows(results: dict[str, list[dict]]) -> list[dict]:
    """One row per (stage, impl): medians over rounds, every round's values, codes agreement, ratios."""
    ref_codes = results["torch"][0]["codes"]

    def summary(stage: str, impl: str, runs: list[dict]) -> dict:
        walls, rss = [m["wall_s"] for m in runs], [m["max_rss_mb"] for m in runs]
        row = {
            "stage": stage,
            "impl": impl,
            "median_s": statistics.median(walls),
            "min_s": min(walls),
            "times_s": [round(x, 3) for x in walls],
            "reps": len(runs),
            "max_rss_mb": max(rss),
            "rss_mb": [round(x, 1) for x in rss],
            "user_s": statistics.median(m["user_s"] for m in runs),
            "sys_s": statistics.median(m["sys_s"] for m in runs),
            # CPU seconds (user + system) move less than wall time when other jobs share the cores.
            "cpu_s": statistics.median(m["user_s"] + m["sys_s"] for m in runs),
        }
        if "codes" in runs[0]:
            row["codes_agreement"] = min(agreement(m["codes"], ref_codes) for m in runs)
            row["num_codes"] = int(np.asarray(runs[0]["codes"]).size)
            row["distinct_codes"] = int(np.unique(runs[0]["codes"]).size)
        if "cache_files" in runs[0]:
            row["cache_files"] = runs[-1]["cache_files"]
        return row

    torch_row = None
    rows = []
    for stage, kind in (("cli_encode_cold", "jax-cold"), ("cli_encode_warm", "jax-warm")):
        jax_row = summary(stage, "jax", results[kind])
        torch_row = summary(stage, "torch", results["torch"])
        jax_row["time_ratio_vs_torch"] = jax_row["median_s"] / torch_row["median_s"]
        jax_row["rss_ratio_vs_torch"] = jax_row["max_rss_mb"] / torch_row["max_rss_mb"]
        jax_row["cpu_ratio_vs_torch"] = jax_row["cpu_s"] / torch_row["cpu_s"]
        rows += [jax_row, torch_row]
    rows.append(summary("cli_encode", "extractor-import", results["extractor-import"]))
    return rows


# --------------------------------------------------------------------------------------- (b) in-process


def run_in_process(args, checkpoint: str, audio: np.ndarray, cache_dir: str | None) -> list[dict]:
    import jax
    import torch
    from transformers import Xcodec2Model as TorchModel

    from xcodec2_jax import Xcodec2Codec, Xcodec2FeatureExtractor

    from . import measure

    start = time.perf_counter()
    codec = Xcodec2Codec.from_pretrained(checkpoint, compilation_cache=cache_dir or False)
    jax.block_until_ready(codec.params)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    ours_first = codec.encode(audio, SAMPLING_RATE)[0]
    ours_first_s = time.perf_counter() - start

    torch.set_num_threads(os.cpu_count())
    start = time.perf_counter()
    model = TorchModel.from_pretrained(checkpoint).eval()
    torch_load_s = time.perf_counter() - start
    extractor = Xcodec2FeatureExtractor()

    def torch_encode():
        inputs = {k: torch.from_numpy(v) for k, v in extractor(audio, sampling_rate=SAMPLING_RATE).items()}
        with torch.inference_mode():
            return model.encode(**inputs).audio_codes[0, 0].numpy()

    start = time.perf_counter()
    ref = torch_encode()
    torch_first_s = time.perf_counter() - start

    probe_call, probe_flops = measure.matmul_probe()
    ours_m = {"call": lambda: codec.encode(audio, SAMPLING_RATE)}
    torch_m = {"call": torch_encode}
    probe = {"call": probe_call}
    measure.time_interleaved([ours_m, torch_m, probe], args.reps)
    rate = round(probe_flops / probe["median_s"] / 1e9, 1)
    ours_codes = codec.encode(audio, SAMPLING_RATE)[0]

    rows = []
    for impl, m, first, load in (
        ("jax", ours_m, ours_first_s, load_s),
        ("torch", torch_m, torch_first_s, torch_load_s),
    ):
        rows.append(
            {
                "stage": "codec_encode",
                "impl": impl,
                **m,
                "first_run_s": first,
                "load_s": load,
                "probe_matmul_gflop_per_s": rate,
            }
        )
    ours_row, torch_row = rows
    ours_row["compile_s"] = ours_first_s - ours_row["median_s"]
    ours_row["compilation_cache_dir"] = codec.compilation_cache_dir
    ours_row["codes_agreement"] = min(agreement(ours_first, ref), agreement(ours_codes, ref))
    ours_row["num_codes"] = int(ref.size)
    ours_row["distinct_codes"] = int(np.unique(ref).size)
    ours_row["speedup_vs_torch"] = torch_row["median_s"] / ours_row["median_s"]
    ours_row["time_ratio_vs_torch"] = ours_row["median_s"] / torch_row["median_s"]
    torch_row["compile_s"] = None
    return rows


# ------------------------------------------------------------------------------------------------ main


def progress_line(row: dict) -> str:
    extra = ""
    if row.get("time_ratio_vs_torch") is not None:
        extra += f"  {row['time_ratio_vs_torch']:.2f}x torch's time"
    if row.get("rss_ratio_vs_torch") is not None:
        extra += f", {row['rss_ratio_vs_torch']:.2f}x its RSS, {row['cpu_ratio_vs_torch']:.2f}x its CPU s"
    if "codes_agreement" in row:
        extra += f"  codes {100 * row['codes_agreement']:.2f}% ({row['distinct_codes']} distinct)"
    if row.get("compile_s") is not None:
        extra += f"  load {row['load_s']:.1f} s, compile {row['compile_s']:.1f} s"
    rss = f"  RSS {row['max_rss_mb']:.0f} MB" if "max_rss_mb" in row else ""
    return (
        f"{row['stage']:16s} {row['impl']:16s} median {row['median_s']:7.2f} s (n={row['reps']}){rss}{extra}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.build_checkpoint:
        start = time.perf_counter()
        build_checkpoint(args.build_checkpoint, args.config, args.seed)
        log(
            args,
            f"built {args.config} checkpoint -> {args.build_checkpoint} "
            f"in {time.perf_counter() - start:.0f} s",
        )
        if args.build_only:
            return 0
        args.checkpoint = args.checkpoint or args.build_checkpoint
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from . import measure

    env = measure.environment(os.cpu_count())
    env["device"]["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
    run_id = measure.run_id()
    start = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="xcodec2_bench_cli_") as work:
        checkpoint = args.checkpoint or build_checkpoint(
            os.path.join(work, "checkpoint"), args.config, args.seed
        )
        label = (
            args.config
            if not args.checkpoint or args.build_checkpoint
            else os.path.basename(os.path.normpath(checkpoint))
        )
        loop, audio_source = speech_loop()
        audio = make_batch(loop, args.duration, 1)[0]
        wav = os.path.join(work, "six.wav")
        import soundfile as sf

        sf.write(wav, audio, SAMPLING_RATE, subtype="FLOAT")
        base = {
            "run_id": run_id,
            **env,
            "config": label,
            "dtype": "float32",
            "duration_s": args.duration,
            "batch": 1,
            "audio_s": args.duration,
            "audio_source": audio_source,
            "git": measure.git_state(),
        }
        if not args.skip_cli:
            load_start = measure.loadavg()
            part = process_rows(run_processes(args, checkpoint, wav, work))
            for row in part:
                row.update(loadavg_start=load_start, loadavg_end=measure.loadavg())
            rows += part
        if not args.skip_codec:
            warm = os.path.join(work, "cache_warm")
            cache_dir = warm if args.codec_cache == "warm" and os.path.isdir(warm) else None
            rows += run_in_process(args, checkpoint, audio, cache_dir)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(args.out, "a" if args.append else "w") as out:
        for row in rows:
            row = {**base, "timestamp": now, **row, "rtf": args.duration / row["median_s"]}
            out.write(json.dumps(row) + "\n")
            log(args, progress_line(row))
    log(args, f"{len(rows)} rows -> {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
