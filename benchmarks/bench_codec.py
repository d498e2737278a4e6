"""JAX (xcodec2_jax) vs PyTorch (transformers' Xcodec2Model) on the same machine, same weights, same inputs.

For each audio duration and batch size, times three stages:

- ``encode``: padded audio + fbank features -> codes (JAX ``jit`` vs torch eager; codes agreement printed);
- ``decode``: codes -> audio;
- ``features``: raw audio -> fbank features: our JAX path (``fbank_features_jax``) vs our numpy extractor
  vs transformers' numpy ``SeamlessM4TFeatureExtractor`` run per item the way the reference's extractor
  loops (the reference's own extractor needs torchaudio, which does not load here).

One JSON line per measurement goes to ``--out``; ``benchmarks/report.py`` turns them into the tables and
the plot of ``benchmarks/README.md``. Run from the repository root::

    python -m benchmarks.bench_codec                      # full config, 2/6/20 s, batch 1 and 4, 3 reps
    python -m benchmarks.bench_codec --config tiny --durations 1 --batch 1 --reps 1 --out /tmp/r.jsonl
    python -m benchmarks.report                           # regenerate README tables + results.png
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

from . import measure
from .stages import RUNNERS, Context

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results.jsonl")
SPEECH_DIR = os.path.join(REPO, "tests", "data")
SAMPLING_RATE = 16000
STAGES = ("encode", "decode", "features")

# A few-second-to-compile model with the real structure: hop 320 (4·8·10) as the semantic frame rate
# needs, FSQ dimension = decoder hidden + semantic hidden, as in the full model.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    encoder_hidden_size=8,
    downsampling_ratios=[4, 8, 10],
    quantization_dim=64 + 32,
    semantic_model_config=dict(
        model_type="wav2vec2-bert",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        left_max_position_embeddings=8,
        right_max_position_embeddings=2,
        conv_depthwise_kernel_size=7,
    ),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_codec", description=__doc__.split("\n\n")[0])
    p.add_argument("--durations", type=float, nargs="+", default=[2.0, 6.0, 20.0], help="audio seconds")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument(
        "--reps",
        type=int,
        default=3,
        help="timed repetitions after the warm-up call, in rounds that alternate the implementations",
    )
    p.add_argument(
        "--max-rep-seconds",
        type=float,
        default=150.0,
        help="stop the rounds once the slowest implementation's timed runs exceed this many seconds (at "
        "least one round is kept; the rows record the reps done); 0 = always --reps",
    )
    p.add_argument(
        "--max-audio-seconds",
        type=float,
        default=60.0,
        help="skip cases whose duration x batch exceeds this (the default leaves out 20 s x 4, which "
        "takes minutes per call on a 2-core CPU); 0 = no limit",
    )
    p.add_argument("--config", choices=("full", "tiny"), default="full", help="random-weight model size")
    p.add_argument(
        "--checkpoint", help="a transformers Xcodec2 checkpoint directory to use instead of random weights"
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="JSONL file for the results")
    p.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    p.add_argument("--skip-torch", action="store_true", help="time JAX (and numpy features) only")
    p.add_argument("--skip-jax", action="store_true", help="time torch (and numpy features) only")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile-d encode/decode")
    p.add_argument(
        "--bf16", action="store_true", help="also time bfloat16 compute (JAX dtype, torch .to(bf16))"
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all CPUs)")
    p.add_argument(
        "--omp-wait-policy",
        choices=("passive", "active", "inherit"),
        default="passive",
        help="OMP_WAIT_POLICY for torch's OpenMP threads, set before torch is imported. Passive (the default "
        "here) keeps idle threads from spinning; with libgomp's default spinning, torch eager ran 5x slower "
        "on the full model (50x on the tiny one) whenever another process was busy on the 2 cores. "
        "'inherit' leaves the environment alone",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--report", action="store_true", help="regenerate benchmarks/README.md from --out afterwards"
    )
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def log(args, msg: str) -> None:
    if not args.quiet:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------------- models


def spread_weights_(model, audio: np.ndarray, seed: int) -> None:
    """Make random weights give spread codes, so that codes agreement means something: the default init
    leaves SnakeBeta at alpha = beta = 0, the acoustic branch ~1e-4 and nearly constant codes. As the tests
    do: alpha, beta ~ U(-0.5, 0.5), both branches scaled to unit spread and ``project_in`` standardised per
    FSQ dimension on ``audio``. Speed does not depend on any of it."""
    import torch

    from xcodec2_jax import Xcodec2FeatureExtractor

    gen = torch.Generator().manual_seed(seed)
    feats = {
        k: torch.from_numpy(v)
        for k, v in Xcodec2FeatureExtractor()(audio, sampling_rate=SAMPLING_RATE).items()
    }
    with torch.inference_mode():
        for name, p in model.named_parameters():
            if name.endswith((".alpha", ".beta")):
                p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
        acoustic_std = model.acoustic_encoder(feats["input_values"]).std()
        model.acoustic_encoder.conv2.weight.div_(acoustic_std)
        model.acoustic_encoder.conv2.bias.div_(acoustic_std)
        semantic = model.semantic_encoder(feats["input_features"]).last_hidden_state.transpose(1, 2)
        model.semantic_adapter.conv4.weight.div_(model.semantic_adapter(semantic).std())
        fused = torch.cat(
            [model.semantic_adapter(semantic), model.acoustic_encoder(feats["input_values"])], 1
        )
        z = model.quantizer.project_in(model.fc_encoder(fused.transpose(1, 2)))
        mean, std = z.mean(dim=(0, 1)), z.std(dim=(0, 1))
        model.quantizer.project_in.weight.div_(std[:, None])
        model.quantizer.project_in.bias.sub_(mean).div_(std)


def build_models(args, tmpdir: str):
    """The torch reference and our (config, params) from the same weights, through ``save_pretrained`` and
    our real loader. Returns (torch_model or None, config, params, label)."""
    import jax
    import torch
    from transformers import Xcodec2Config as TorchConfig
    from transformers import Xcodec2Model as TorchModel

    from xcodec2_jax import Xcodec2Config, load_params

    if args.checkpoint:
        path, label = args.checkpoint, os.path.basename(os.path.normpath(args.checkpoint))
        torch_model = None if args.skip_torch else TorchModel.from_pretrained(path).eval()
    else:
        torch.manual_seed(args.seed)
        torch_model = TorchModel(TorchConfig(**(TINY_CONFIG if args.config == "tiny" else {}))).eval()
        spread_weights_(torch_model, speech_loop()[0][: 2 * SAMPLING_RATE], args.seed)
        path, label = tmpdir, args.config
        torch_model.save_pretrained(path)
        if args.skip_torch:
            torch_model = None
    # load_params returns host (numpy) arrays; a jitted call would copy them to the device on every
    # call (about 0.4 s per full-config encode on CPU), so place them once, as Xcodec2Codec does.
    params = jax.device_put(load_params(path))
    return torch_model, Xcodec2Config.from_pretrained(path), params, label


# ----------------------------------------------------------------------------------------------- audio


def speech_loop() -> tuple[np.ndarray, str]:
    """The committed test utterances joined with 0.2 s pauses (real speech), or a synthetic signal."""
    files = sorted(glob.glob(os.path.join(SPEECH_DIR, "*.wav")))
    if files:
        import soundfile as sf

        pause = np.zeros(SAMPLING_RATE // 5, np.float32)
        parts = []
        for f in files:
            audio, sr = sf.read(f, dtype="float32")
            if sr == SAMPLING_RATE and audio.ndim == 1:
                parts += [audio, pause]
        if parts:
            return np.concatenate(parts), "tests/data speech, looped"
    t = np.arange(10 * SAMPLING_RATE) / SAMPLING_RATE
    rng = np.random.default_rng(0)
    pitch = 120 + 80 * np.sin(2 * np.pi * 0.5 * t)
    synth = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.02 * rng.standard_normal(t.size)
    return synth.astype(np.float32), "synthetic"


def make_batch(loop: np.ndarray, seconds: float, batch: int) -> list[np.ndarray]:
    """``batch`` items of exactly ``seconds``, cut from the loop at different offsets (no batch padding)."""
    n = int(round(seconds * SAMPLING_RATE))
    reps = math.ceil((n + batch * 1.3 * SAMPLING_RATE) / loop.size) + 1
    tiled = np.tile(loop, reps)
    return [tiled[int(i * 1.3 * SAMPLING_RATE) :][:n].copy() for i in range(batch)]


def make_row(base: dict, dtype_name: str, stage: str, impl: str, m: dict) -> dict:
    m = {k: v for k, v in m.items() if k != "output"}
    flops = m.get("flops")
    return {
        **base,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": dtype_name,
        "stage": stage,
        "impl": impl,
        **m,
        "rtf": base["audio_s"] / m["median_s"],
        "gflops": None if flops is None else flops / 1e9,
        "gflop_per_s": None if flops is None else flops / m["median_s"] / 1e9,
    }


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def progress_line(row: dict) -> str:
    extra = ""
    if "codes_agreement" in row:
        extra = f"  codes agree {100 * row['codes_agreement']:.2f}% ({row['distinct_codes']} distinct)"
    elif "audio_rel_err" in row:
        extra = f"  audio err/peak {row['audio_rel_err']:.1e}"
    elif "features_max_abs_diff" in row:
        extra = f"  max diff vs numpy {row['features_max_abs_diff']:.1e}"
    return (
        f"{row['stage']:8s} {row['duration_s']:5g} s x{row['batch']} {row['dtype']:8s} {row['impl']:13s} "
        f"median {row['median_s']:8.3f} s (n={row['reps']})  RTF {row['rtf']:7.2f}  "
        f"compile {_fmt(row['compile_s'], '6.1f')} s  {_fmt(row['gflop_per_s'], '6.1f')} GFLOP/s  "
        f"peak {_fmt(row['peak_mem_mb'], '7.0f')} MB  load {row['loadavg_end']}{extra}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.skip_torch and args.skip_jax:
        raise SystemExit("--skip-torch and --skip-jax leave nothing to compare")
    if args.omp_wait_policy != "inherit" and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    # libgomp reads the policy once, when torch loads: record what it saw.
    omp_policy = os.environ.get("OMP_WAIT_POLICY", "default")
    if "torch" in sys.modules and args.omp_wait_policy != "inherit":
        omp_policy += " (torch loaded earlier: unknown)"
    import torch

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    env = measure.environment(threads)
    env["device"]["omp_wait_policy"] = omp_policy
    env["device"].update(measure.matmul_peak())
    run_id = measure.run_id()
    log(
        args,
        f"{env['device']['cpu_model']} ({env['device']['usable_cpus']} CPUs), jax "
        f"{env['versions']['jax']}, torch {env['versions']['torch']}; matmul peak "
        f"{env['device']['jax_matmul_gflop_per_s']} GFLOP/s (JAX), "
        f"{env['device']['torch_matmul_gflop_per_s']} (torch)",
    )

    cases = sorted(
        {(float(d), int(b)) for d in args.durations for b in args.batch},
        key=lambda c: (c[0] * c[1], c[1]),
    )
    skipped = [c for c in cases if args.max_audio_seconds and c[0] * c[1] > args.max_audio_seconds]
    cases = [c for c in cases if c not in skipped]
    for d, b in skipped:
        log(args, f"skipping {d:g} s x {b}: over --max-audio-seconds {args.max_audio_seconds:g}")

    from xcodec2_jax import Xcodec2FeatureExtractor

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xcodec2_bench_") as tmp:
        torch_model, config, params, label = build_models(args, tmp)
    log(args, f"models ready ({label}) in {time.perf_counter() - start:.1f} s")
    ctx = Context(args, torch_model, config, params)
    loop, audio_source = speech_loop()
    rng = np.random.default_rng(args.seed)
    dtypes = ["float32"] + (["bfloat16"] if args.bf16 else [])

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rows_written = 0
    with open(args.out, "a" if args.append else "w") as out:
        for duration, batch in cases:
            audio = make_batch(loop, duration, batch)
            feats = Xcodec2FeatureExtractor()(audio, sampling_rate=SAMPLING_RATE)
            num_codes = feats["input_values"].shape[-1] // config.hop_length
            # Decoding cost does not depend on the code values; seeded random codes keep decode independent
            # of which stages run.
            codes = rng.integers(0, config.codebook_size, (batch, 1, num_codes)).astype(np.int32)
            case = {"audio": audio, "feats": feats, "codes": codes}
            base = {
                "run_id": run_id,
                **env,
                "config": label,
                "duration_s": duration,
                "batch": batch,
                "audio_s": duration * batch,
                "num_samples": int(feats["input_values"].shape[-1]),
                "num_codes": int(num_codes),
                "audio_source": audio_source,
            }
            for dtype_name in dtypes:
                for stage in args.stages:
                    for impl, m in RUNNERS[stage](ctx, case, dtype_name):
                        row = make_row(base, dtype_name, stage, impl, m)
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                        rows_written += 1
                        log(args, progress_line(row))
    log(args, f"{rows_written} rows -> {args.out} in {time.perf_counter() - start:.0f} s")
    if args.report:
        from . import report

        report.main(["--results", args.out])
    return 0


if __name__ == "__main__":
    sys.exit(main())
