"""Checkpoint loading: seconds and peak RSS, each measurement in a fresh process.

    python -m benchmarks.bench_load CHECKPOINT [CHECKPOINT ...] [--mode device|host] [--repeat N]

Each run warms the page cache (reads the files once), then starts a fresh Python that imports
``xcodec2_jax``, records its RSS, loads the checkpoint (``load_checkpoint(path, device=...)``, or to
host numpy with ``--mode host``), waits for every array, and reports the load time, the time of
the model trace for the parameters' shapes, which the strict check needs, within it
(``model._abstract_params``, or ``model.checkpoint_shapes`` in older checkouts), the CPU seconds
(user + system: on a machine shared with other work, the wall time says little), the peak RSS
(``ru_maxrss``) and the checkpoint's size. ``--pythonpath`` runs another checkout of the library
(e.g. an older commit, for a before/after). ``--params-cache DIR`` loads as ``Xcodec2Codec`` does,
through the params cache (the first run prepares the checkpoint there, the next ones map it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, os, resource, sys, time
path, mode, cache = sys.argv[1], sys.argv[2], (sys.argv[3] or None)
import jax
import xcodec2_jax
from xcodec2_jax import load_checkpoint
import xcodec2_jax.modeling.model as model
rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
trace = [0.0]
name = "_abstract_params" if hasattr(model, "_abstract_params") else "checkpoint_shapes"
if hasattr(model, name):
    original = getattr(model, name)
    def timed(config):
        t = time.perf_counter()
        try:
            return original(config)
        finally:
            trace[0] += time.perf_counter() - t
    setattr(model, name, timed)
def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime
start, cpu_start = time.perf_counter(), cpu()
if cache:
    config, params = load_checkpoint(path, device=jax.devices()[0], params_cache=cache)
elif mode == "device":
    try:
        config, params = load_checkpoint(path, device=jax.devices()[0])
    except TypeError:  # before the device= option: what the codec did
        config, params = load_checkpoint(path)
        params = jax.device_put(params)
else:
    config, params = load_checkpoint(path)
jax.block_until_ready(params)
seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
leaves = jax.tree.leaves(params)
print(json.dumps(dict(
    seconds=seconds, cpu_seconds=cpu_seconds, trace_s=trace[0],
    load_average=os.getloadavg()[0], cores=os.cpu_count(),
    peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    rss_after_imports=rss_imports, param_bytes=sum(x.size * x.dtype.itemsize for x in leaves),
    leaf_type=type(leaves[0]).__name__, library=os.path.dirname(xcodec2_jax.__file__),
)))
"""


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    out = []
    for root, _, names in os.walk(path):
        out += [os.path.join(root, n) for n in names]
    return out


def _warm(path: str) -> int:
    size = 0
    for file in _files(path):
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                size += len(chunk)
    return size


def measure(
    path: str, mode: str = "device", pythonpath: str | None = None, params_cache: str | None = None
) -> dict:
    size = _warm(path)
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, path, mode, params_cache or ""],
        env=env,
        cwd=pythonpath or None,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"load of {path} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(path=path, mode=mode, checkpoint_bytes=size, params_cache=params_cache)
    result["rss_over_checkpoint"] = result["peak_rss"] / size
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--mode", choices=("device", "host"), default="device")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--pythonpath", help="load with the library found here instead")
    parser.add_argument(
        "--params-cache",
        help="load through this params cache folder (to a device); the first load of a checkpoint "
        "prepares it there, later ones map it (the codec's and the CLI's path)",
    )
    args = parser.parse_args(argv)
    for path in args.paths:
        for _ in range(args.repeat):
            r = measure(path, args.mode, args.pythonpath, args.params_cache)
            print(json.dumps(r))
            print(
                f"{path} ({'params cache' if args.params_cache else args.mode}): {r['seconds']:.2f} s, "
                f"{r['cpu_seconds']:.2f} CPU s "
                f"(model trace {r['trace_s']:.2f} s), "
                f"peak RSS {r['peak_rss'] / 1e9:.2f} GB = {r['rss_over_checkpoint']:.2f} x checkpoint "
                f"{r['checkpoint_bytes'] / 1e9:.2f} GB "
                f"(after imports {r['rss_after_imports'] / 1e9:.2f} GB); "
                f"load average {r['load_average']:.1f} on {r['cores']} cores",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
