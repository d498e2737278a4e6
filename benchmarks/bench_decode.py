"""Decode speed against the transformers reference, in alternating rounds of fresh processes.

Each round runs every implementation once, one process at a time (A, B, C, A, B, C, ...), so the
machine's drifting speed hits them alike; each JAX process also times a 2048x2048 float32 matmul,
the roof that the decode's achieved GFLOP/s is compared with. Implementations:

- ``model``: ``jax.jit(model.apply(..., method=Xcodec2Model.decode))`` on ``layout.per_layer`` params
  (``model-stacked``: on the stacked params ``load_params`` gives);
- ``codec``: ``Xcodec2Codec.decode`` (masks, length buckets, host transfers included);
- ``torch``: transformers' ``Xcodec2Model.decode``, eager, ``--threads`` threads, passive OMP wait.

``--repo NAME=PATH`` adds the JAX implementations of another checkout (an older commit, to show a
before/after in one run). Full config, random weights, 6 s of codes by default::

    python -m benchmarks.bench_decode CKPT_DIR --rounds 3 --repo before=/path/to/old/checkout
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results_decode.jsonl")
KINDS = ("model", "model-stacked", "codec")


def decode_flops(cfg, n: int, batch: int = 1) -> float:
    """FLOPs (2 per multiply-add) of the decoder's matmuls and convolutions for ``n`` codes."""
    h, ff = cfg.hidden_size, cfg.intermediate_size
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layer = 2 * n * h * (heads * hd + 2 * kv * hd) + 2 * n * heads * hd * h  # q, k, v, o
    layer += 2 * 2 * n * h * ff + 2 * 2 * n * n * heads * hd  # MLP; scores and weights @ v
    total = cfg.num_hidden_layers * layer + 4 * 2 * (2 * n * 3 * h * h) + 2 * n * 7 * h * h
    total += 2 * n * cfg.quantization_dim * h + 2 * n * h * (cfg.n_fft + 2)  # fc, ISTFT head
    return float(batch * total)


def _times(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _roof(size: int = 2048) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2 * size**3 / min(_times(lambda: f(a).block_until_ready(), 5)) / 1e9


def _worker_jax(args) -> dict:
    import jax
    import numpy as np

    import xcodec2_jax
    from xcodec2_jax import Xcodec2Codec, Xcodec2Config, Xcodec2Model, load_params

    where = os.path.dirname(os.path.dirname(os.path.abspath(xcodec2_jax.__file__)))
    assert where == os.path.abspath(args.expect), f"imported {xcodec2_jax.__file__}, not {args.expect}'s"

    config = Xcodec2Config.from_pretrained(args.ckpt)
    codes = np.random.default_rng(0).integers(0, config.codebook_size, (args.batch, args.codes), np.int32)
    if args.kind == "codec":
        codec = Xcodec2Codec.from_pretrained(args.ckpt, compilation_cache=False, batch_size=args.batch)
        start = time.perf_counter()
        codec.decode(codes)
        compile_s = time.perf_counter() - start
        times = _times(lambda: codec.decode(codes), args.reps)
    else:
        params = load_params(args.ckpt, config)
        if args.kind == "model":
            from xcodec2_jax.modeling.layout import per_layer

            params = per_layer(params)
        params = jax.device_put(params)
        model = Xcodec2Model(config)
        f = jax.jit(lambda p, c: model.apply({"params": p}, c, method=Xcodec2Model.decode).audio_values)
        device_codes = jax.device_put(codes[:, None])
        start = time.perf_counter()
        f(params, device_codes).block_until_ready()
        compile_s = time.perf_counter() - start
        times = _times(lambda: f(params, device_codes).block_until_ready(), args.reps)
    return dict(
        times=times,
        compile_s=compile_s,
        roof_gflops=_roof(),
        flops=decode_flops(config, args.codes, args.batch),
    )


def _worker_torch(args) -> dict:
    import numpy as np
    import torch
    from transformers import Xcodec2Model

    torch.set_num_threads(args.threads)
    model = Xcodec2Model.from_pretrained(args.ckpt).eval()
    size = int(np.prod(model.config.quantization_levels))
    codes = torch.as_tensor(np.random.default_rng(0).integers(0, size, (args.batch, 1, args.codes)))
    with torch.inference_mode():
        model.decode(codes)
        times = _times(lambda: model.decode(codes), args.reps)
    return dict(times=times, threads=torch.get_num_threads())


def _run(name: str, kind: str, repo: str | None, args) -> dict:
    # The worker runs as a script from the checkout it measures, whose library it then imports.
    repo = repo or REPO
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=repo)
    cmd = [sys.executable, os.path.abspath(__file__), args.ckpt, "--worker", kind, "--expect", repo]
    cmd += ["--reps", str(args.reps), "--codes", str(args.codes), "--batch", str(args.batch)]
    cmd += ["--threads", str(args.threads)]
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    line = [s for s in result.stdout.splitlines() if s.startswith("RESULT ")]
    if result.returncode or not line:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT ") :])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _summary(name: str, rows: list[dict], torch_median: float | None, roof: float) -> dict:
    median = statistics.median(statistics.median(r["times"]) for r in rows)
    out = dict(impl=name, median_s=median, best_s=min(min(r["times"]) for r in rows))
    if "flops" in rows[0]:
        out["gflop_per_s"] = rows[0]["flops"] / median / 1e9
        out["of_roof"] = out["gflop_per_s"] / roof
        out["compile_s"] = statistics.median(r["compile_s"] for r in rows)
    if torch_median:
        out["speed_vs_torch"] = torch_median / median
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_decode", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("ckpt", help="a transformers Xcodec2 checkpoint directory")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument(
        "--repo", nargs="*", default=[], metavar="NAME=PATH", help="other checkouts' model-stacked/codec"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5, help="timed calls per process after the first")
    p.add_argument("--codes", type=int, default=300, help="codes to decode (300: 6 s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSONL file the run's rows are appended to")
    p.add_argument("--worker", choices=KINDS + ("torch",), help=argparse.SUPPRESS)
    p.add_argument("--expect", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.kind = args.worker
        result = _worker_torch(args) if args.worker == "torch" else _worker_jax(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    entries = [(kind, kind, None) for kind in args.kinds]
    for spec in args.repo:
        name, path = spec.split("=", 1)
        entries += [(f"{name}:{kind}", kind, os.path.abspath(path)) for kind in ("model-stacked", "codec")]
    entries.append(("torch", "torch", None))
    rows = {name: [] for name, _, _ in entries}
    for r in range(args.rounds):
        for name, kind, repo in entries:
            rows[name].append(_run(name, kind, repo, args))
            print(
                f"round {r} {name:>22}: median {statistics.median(rows[name][-1]['times']):.3f} s", flush=True
            )
    roof = statistics.median(x["roof_gflops"] for v in rows.values() for x in v if "roof_gflops" in x)
    torch_median = statistics.median(statistics.median(x["times"]) for x in rows["torch"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    common = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        commit=commit.stdout.strip() or None,
        hardware=f"{_cpu_model()}, {os.cpu_count()} CPUs",
        command="python -m benchmarks.bench_decode " + " ".join(argv if argv is not None else sys.argv[1:]),
        codes=args.codes,
        batch=args.batch,
        rounds=args.rounds,
        roof_gflop_per_s=roof,
    )
    with open(args.out, "a", encoding="utf-8") as f:
        for name, *_ in entries:
            row = dict(common, **_summary(name, rows[name], torch_median, roof))
            f.write(json.dumps(row) + "\n")
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
