"""Timing, FLOP and memory measurement for one benchmark stage, for JAX, PyTorch and numpy callables.

Measuring a stage has two steps. Each ``measure_*`` function prepares one implementation: it compiles
(JAX), runs the warm-up call and counts FLOPs and memory, and returns a dict of row fields: ``compile_s``
(JAX: lower + compile; torch.compile: the first call, which compiles; eager and numpy: None),
``first_run_s``, ``flops``, ``flops_counter``, ``peak_mem_mb``, ``work_mem_mb``, ``mem_method``,
``output`` (the stage's result, for the agreement checks; dropped before the row is written) and ``call``
(one timed execution). Then ``time_interleaved`` times all of a stage's implementations in alternating
rounds and adds ``times_s``, ``median_s``, ``min_s``, ``reps`` and ``loadavg_start``/``loadavg_end``.

Interleaving matters on a shared or virtual machine whose speed drifts by tens of percent within minutes:
timed one after the other, two implementations can see different machines; timed in alternation, a
drift slows both alike and their ratio holds.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
import tracemalloc
import weakref
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

MB = float(1 << 20)


def loadavg() -> float | None:
    """The 1-minute load average (None where the OS has none): rows record it to show a busy machine."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _time_call(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def time_interleaved(measurements: list[dict], reps: int, max_rep_seconds: float = 0.0) -> None:
    """Times the prepared ``measurements`` (each with its ``call``) in rounds: every round runs each
    call once, the starting one rotating from round to round, until ``reps`` rounds are done, or
    earlier (after at least one) once the slowest call's timed runs exceed ``max_rep_seconds`` in total,
    so the longest cases of a sweep stay affordable (0 = no limit). Fills in each dict's timing fields
    and removes ``call``."""
    calls = [m.pop("call") for m in measurements]
    times: list[list[float]] = [[] for _ in calls]
    load_start = loadavg()
    for r in range(max(1, reps)):
        for i in range(len(calls)):
            j = (r + i) % len(calls)
            times[j].append(_time_call(calls[j]))
        if max_rep_seconds and max(sum(t) for t in times) >= max_rep_seconds:
            break
    load_end = loadavg()
    for m, t in zip(measurements, times, strict=True):
        m.update(
            times_s=[round(x, 6) for x in t],
            median_s=statistics.median(t),
            min_s=min(t),
            reps=len(t),
            loadavg_start=load_start,
            loadavg_end=load_end,
        )


def jax_flops(compiled) -> float | None:
    """FLOPs of a compiled XLA executable from ``cost_analysis()`` (a dict, or a list of one per module
    in some jax versions; None where the backend gives none)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or analysis.get("flops") is None:
        return None
    flops = float(analysis["flops"])
    return flops if flops > 0 else None


def jax_memory(compiled) -> tuple[float | None, float | None]:
    """(peak, working) MB from XLA's buffer assignment: peak = arguments (inputs and the weights the stage
    uses: ``jit`` drops unused arguments) + outputs + temporaries - aliased; working = temporaries +
    outputs. A static plan, not a measurement, but exact for what XLA allocates on CPU."""
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return None, None
    if stats is None:
        return None, None
    work = stats.temp_size_in_bytes + stats.output_size_in_bytes
    peak = stats.argument_size_in_bytes + work - stats.alias_size_in_bytes
    return peak / MB, work / MB


def block(tree):
    return jax.block_until_ready(tree)


def measure_jax(fn: Callable, args: tuple) -> dict:
    """``fn`` is jitted and compiled ahead of time on ``args`` (compile time measured alone); the first
    execution is timed apart as the warm-up. A timed call runs until ``block_until_ready``."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    output = block(compiled(*args))
    first_run_s = time.perf_counter() - start
    peak, work = jax_memory(compiled)
    return {
        "compile_s": compile_s,
        "first_run_s": first_run_s,
        "flops": jax_flops(compiled),
        "flops_counter": "xla_cost_analysis",
        "peak_mem_mb": peak,
        "work_mem_mb": work,
        "mem_method": "xla_memory_analysis",
        "output": output,
        "call": lambda: block(compiled(*args)),
    }


def tensor_memory_tracker_cls():
    """The class of ``TensorMemoryTracker`` (below), built on first use so that importing this module needs
    no torch. It is the one place that uses torch's private ``_python_dispatch`` and ``_pytree``; a test
    checks it still counts a known allocation."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class TensorMemoryTracker(TorchDispatchMode):
        """Peak bytes of tensor storage alive at once, among the storages that ATen ops create while the
        mode is active. Storages that exist beforehand (weights, inputs: ``external``) are excluded, views
        share their base's storage, and a storage counts as freed when the last Python tensor on it dies.
        Scratch memory inside a kernel (e.g. oneDNN workspaces) is not seen. ``used_external_bytes``: the
        external storages some op read (the weights the stage uses, not the whole model's)."""

        def __init__(self, external: list):
            super().__init__()
            self.external = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in external}
            self.used_external: set[int] = set()
            self.live: dict[int, list[int]] = {}
            self.current = 0
            self.peak = 0

        @property
        def used_external_bytes(self) -> int:
            return sum(self.external[k] for k in self.used_external)

        def _release(self, key: int) -> None:
            entry = self.live.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del self.live[key]
                self.current -= entry[0]

        def _track(self, t) -> None:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self.external:
                return
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    key = t.untyped_storage().data_ptr()
                    if key in self.external:
                        self.used_external.add(key)
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    self._track(t)
            return out

    return TensorMemoryTracker


def measure_torch(
    fn: Callable[[], Any],
    external_tensors: list | None = None,
    compiled: bool = False,
) -> dict:
    """``fn`` runs the stage on prepared inputs under ``torch.inference_mode()``, timed calls too. Eager:
    the first call is the warm-up and also counts FLOPs (``FlopCounterMode``: matmul, convolution and
    attention ops only) and peak tensor memory (``TensorMemoryTracker``; peak = the weights and inputs
    the call reads, among ``external_tensors``, + the live-tensor high-water mark). With ``compiled`` (a
    ``torch.compile``-d ``fn``) the first call compiles and is reported as compile_s, and FLOPs and
    memory are counted on a second, untimed call."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    tracker_cls = tensor_memory_tracker_cls()
    external = list(external_tensors or [])
    compile_s = None
    with torch.inference_mode():
        if compiled:
            start = time.perf_counter()
            fn()
            compile_s = time.perf_counter() - start
        counter, tracker = FlopCounterMode(display=False), tracker_cls(external)
        start = time.perf_counter()
        with counter, tracker:
            output = fn()
        first_run_s = time.perf_counter() - start
    flops = float(counter.get_total_flops())

    def call():
        with torch.inference_mode():
            fn()

    return {
        "compile_s": compile_s,
        # The warm-up call runs under the FLOP counter and memory tracker (Python dispatch per op); an
        # upper bound on the plain first call.
        "first_run_s": first_run_s,
        "flops": flops if flops > 0 else None,
        "flops_counter": "torch_flop_counter",
        "peak_mem_mb": (tracker.used_external_bytes + tracker.peak) / MB,
        "work_mem_mb": tracker.peak / MB,
        "mem_method": "torch_dispatch_live_tensors",
        "output": output,
        "call": call,
    }


def measure_numpy(fn: Callable[[], Any], input_bytes: int = 0) -> dict:
    """A numpy callable: the first call is the warm-up and measures the allocation high-water mark with
    ``tracemalloc`` (numpy reports its buffers to it); timed calls run without tracing."""
    tracemalloc.start()
    start = time.perf_counter()
    output = fn()
    first_run_s = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "compile_s": None,
        "first_run_s": first_run_s,
        "flops": None,
        "flops_counter": None,
        "peak_mem_mb": (input_bytes + peak) / MB,
        "work_mem_mb": peak / MB,
        "mem_method": "tracemalloc",
        "output": output,
        "call": fn,
    }


def matmul_probe(size: int = 2048) -> tuple[Callable[[], Any], float]:
    """A compiled, warmed-up float32 ``size``² matmul in JAX: (call, FLOPs). Timed among a stage's
    rounds it gives the machine's matmul rate while that stage was measured."""
    a = jax.device_put(np.random.default_rng(0).standard_normal((size, size), np.float32))
    f = jax.jit(lambda x: x @ x).lower(a).compile()
    block(f(a))
    return (lambda: block(f(a))), 2.0 * size**3


def matmul_peak(size: int = 2048, reps: int = 5) -> dict:
    """Achieved float32 GFLOP/s of one square matmul in JAX and in torch: a practical ceiling for
    this machine (best of ``reps``)."""
    import torch

    call, flops = matmul_probe(size)
    jax_best = min(_time_call(call) for _ in range(reps))
    t = torch.randn(size, size)
    with torch.inference_mode():
        t @ t
        torch_best = min(_time_call(lambda: t @ t) for _ in range(reps))
    return {
        "jax_matmul_gflop_per_s": round(flops / jax_best / 1e9, 1),
        "torch_matmul_gflop_per_s": round(flops / torch_best / 1e9, 1),
        "matmul_size": size,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(torch_threads: int | None) -> dict:
    dev = jax.devices()[0]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "device": {
            "jax_device_kind": dev.device_kind,
            "jax_platform": dev.platform,
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "usable_cpus": usable,
            "torch_threads": torch_threads,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
            if hasattr(os, "sysconf")
            else None,
            "machine": platform.machine(),
        },
        "versions": {
            name: _version(name)
            for name in ("jax", "jaxlib", "flax", "torch", "transformers", "numpy", "xcodec2_jax")
        }
        | {"python": platform.python_version()},
    }


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_state() -> str | None:
    """The commit measured, with "+dirty" when the working tree differs from it."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=_REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=_REPO).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


def run_id() -> str:
    """A run's id: its start in UTC to the second (what report.py groups rows by and dates them with)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
