"""``tokenize``: a corpus to Parquet shards of codes on every local device, resumable, on many hosts.

The host pipeline is a thread pool that reads, decodes, resamples and computes each item's features
(soundfile, soxr and numpy release the GIL) a bounded number of items ahead of the device, in the
order the device needs them. The main thread groups the prepared items of a window by length into
batches padded to ``length_bucket`` × a row bucket, shards each batch's rows over a one-axis mesh of
the local devices (params replicated once), and dispatches the next batch before it waits for the
previous one, so host work and device compute overlap. Items are encoded with ``isolate_items``, so
each item's codes are those ``Xcodec2Codec.encode`` gives it alone, whatever it is batched with.
"""

from __future__ import annotations

import collections
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .shards import Plan, check_job, write_shard, write_summary
from .sources import Item, list_items, read_item

# Items of a shard are length-sorted into batches within windows of this many batches: a larger
# window pads less, a smaller one starts the device sooner.
WINDOW_BATCHES = 16


def _prefetch_map(fn, items: Iterable, workers: int, ahead: int) -> Iterator:
    """``map(fn, items)`` in order, computed by ``workers`` threads at most ``ahead`` items ahead."""
    with ThreadPoolExecutor(workers, thread_name_prefix="xcodec2-tokenize") as pool:
        queue: collections.deque = collections.deque()
        it = iter(items)
        for item in it:
            queue.append(pool.submit(fn, item))
            if len(queue) >= ahead:
                break
        while queue:
            result = queue.popleft().result()
            for item in it:
                queue.append(pool.submit(fn, item))
                break
            yield result


def _init_distributed(coordinator_address, num_processes, process_id, distributed: bool) -> None:
    import jax

    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if not (explicit or distributed) or jax.distributed.is_initialized():
        return
    # Without arguments JAX detects the cluster (TPU pod, Slurm, Open MPI) on its own.
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


# Processes finish their shards at different times; a dead one fails the barrier sooner (JAX's
# coordination service notices missing heartbeats).
BARRIER_TIMEOUT_S = 24 * 3600


def _barrier(name: str) -> None:
    """Wait for every process, through the coordination service: no device collective, so nothing to
    compile, and it works on every backend (sync_global_devices needs cross-process collectives)."""
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(name, BARRIER_TIMEOUT_S * 1000)


def _load(model, dtype, precision, batch_size, revision, cache_dir, compilation_cache):
    import jax.numpy as jnp

    from ..codec import Xcodec2Codec

    return Xcodec2Codec.from_pretrained(
        model,
        dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(dtype, dtype),
        precision=precision,
        batch_size=batch_size,
        revision=revision,
        cache_dir=cache_dir,
        compilation_cache=compilation_cache,
    )


class _Encoder:
    """Encodes batches of prepared items on the local mesh, one batch in flight while the next is built."""

    def __init__(self, codec, batch_size: int):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.codec = codec
        self.devices = jax.local_devices()
        self.batch_size = batch_size
        if len(self.devices) == 1:
            # The codec's own program, kept on disk between runs (see programs.py).
            self.fn, self.params = codec._encode, codec.encode_params
        else:
            mesh = Mesh(np.array(self.devices), ("data",))
            replicated, rows = (
                NamedSharding(mesh, PartitionSpec()),
                NamedSharding(mesh, PartitionSpec("data")),
            )
            self.fn = jax.jit(
                codec._encode_fn,
                in_shardings=(replicated, rows),
                out_shardings=rows,
                compiler_options=codec.compiler_options or None,
            )
            self.params = jax.device_put(codec.encode_params, replicated)
        self.pending = None
        self.shapes: set[tuple[int, int]] = set()
        self.compile_s = self.busy_s = 0.0
        self._last_done = 0.0

    def rows(self, n: int) -> int:
        from ..codec import batch_bucket

        d = len(self.devices)
        return -(-batch_bucket(n, self.batch_size) // d) * d

    def submit(self, batch: list[tuple[Any, dict]], sink) -> None:
        """Dispatch ``batch`` ((key, prepared) pairs) and collect the previous batch into ``sink``."""
        from ..codec import length_bucket

        n = length_bucket(max(p["num_codes"] for _, p in batch))
        inputs = self.codec._batch_inputs([p["features"] for _, p in batch], n, self.rows(len(batch)))
        shape = (inputs["input_values"].shape[0], n)
        start = time.perf_counter()
        out = self.fn(self.params, inputs)
        if shape not in self.shapes:  # tracing and compiling happen inside the first call of a shape
            self.shapes.add(shape)
            self.compile_s += time.perf_counter() - start
        self.collect(sink)
        self.pending = (batch, out, time.perf_counter())

    def collect(self, sink) -> None:
        if self.pending is None:
            return
        batch, out, dispatched = self.pending
        self.pending = None
        codes = np.asarray(out)
        done = time.perf_counter()
        # The device is counted busy from dispatch (or the previous batch's end) until the result
        # arrived: an upper bound, so the idle fraction reported is a lower bound.
        self.busy_s += done - max(dispatched, self._last_done)
        self._last_done = done
        for row, (key, p) in enumerate(batch):
            sink(key, codes[row, : p["num_codes"]])


def _prepare(codec, max_window_seconds, context_seconds):
    from .. import windows

    hop = codec.hop_length

    def prepare(item: Item) -> dict:
        try:
            audio = read_item(item)
            n = math.ceil((len(audio) + 1) / hop)
            # An item past max_window_seconds becomes overlapping windows, each a row of its own,
            # exactly as Xcodec2Codec.encode plans and lays them out.
            pieces = codec._plan([n], max_window_seconds, context_seconds)
            stats = None if len(pieces) == 1 else windows.feature_stats(audio, hop)
            parts = [
                {
                    "num_codes": w.end - w.start,
                    "features": codec._piece_inputs(audio, w, stats),
                    "keep": (w.keep_start - w.start, w.keep_end - w.start),
                    "offset": w.keep_start,
                }
                for w in pieces
            ]
        except ValueError as e:
            return {"error": str(e)}
        except Exception as e:  # an unforeseen decoder failure is still one bad item, not a dead job
            return {"error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
        return {"num_samples": len(audio), "num_codes": n, "parts": parts}

    return prepare


def tokenize(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    batch_size: int = 8,
    shard_size: int = 1000,
    dtype: str = "float32",
    precision: str | None = None,
    num_workers: int | None = None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    distributed: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
    compilation_cache: str | os.PathLike | bool | None = None,
    progress: bool = True,
    max_window_seconds: float | None = None,
    context_seconds: float | None = None,
) -> dict:
    """Tokenize a corpus into Parquet shards of codes under ``out``; see README "Tokenizing a corpus".

    ``sources``: directories (audio files, recursively, or Parquet files in the datasets layout),
    ``.txt`` / ``.jsonl`` manifests, or ``.parquet`` files. Runs on all local devices; on several hosts
    give ``coordinator_address``, ``num_processes``, ``process_id`` (or ``distributed=True`` to let
    ``jax.distributed.initialize`` detect a TPU pod, Slurm or Open MPI). Running it again finishes an
    interrupted job. Returns the manifest (as written to ``out/manifest.json``) plus this process's
    ``run`` statistics. ValueError for unusable sources or an ``out`` made by a different job; bad
    items are not errors but go to ``out/errors.jsonl`` (``manifest["num_errors"]``).
    ``max_window_seconds`` / ``context_seconds``: long items are encoded in overlapping windows, as by
    ``Xcodec2Codec.encode`` (defaults: its defaults).
    """
    import jax

    from .. import __version__, windows
    from ..codec import DEFAULT_MODEL_ID
    from .shards import ids_digest

    if max_window_seconds is None:
        max_window_seconds = windows.DEFAULT_MAX_WINDOW_SECONDS
    if context_seconds is None:
        context_seconds = windows.DEFAULT_ENCODE_CONTEXT_SECONDS

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _init_distributed(coordinator_address, num_processes, process_id, distributed)
    pid, nproc = jax.process_index(), jax.process_count()
    out = os.path.abspath(os.fspath(out))
    model = os.fspath(model or DEFAULT_MODEL_ID)
    model_id = os.path.abspath(model) if os.path.isdir(model) else model
    items = list_items(sources)
    codec = _load(model, dtype, precision, batch_size, revision, cache_dir, compilation_cache)
    job = {
        "model": model_id,
        "config": codec.config.to_dict(),
        "dtype": np.dtype(codec.dtype).name,
        "precision": None if precision is None else str(precision),
        "shard_size": shard_size,
        "max_window_seconds": max_window_seconds,
        "context_seconds": context_seconds,
        "num_listed": len(items),
        "ids_sha256": ids_digest([it.id for it in items]),
    }
    plan = Plan(out, len(items), shard_size)
    check_job(out, job, create=pid == 0)
    mine = plan.mine(pid, nproc)
    for k in mine:  # leftovers of a killed run: temporary files of shards this process redoes
        for sub in (os.path.dirname(plan.parquet(k)), os.path.dirname(plan.errors(k))):
            if os.path.isdir(sub):
                for name in os.listdir(sub):
                    if name.startswith("." + plan.name(k)) and name.endswith(".tmp"):
                        os.unlink(os.path.join(sub, name))

    encoder = _Encoder(codec, batch_size)
    workers = num_workers or max(2, min(16, os.cpu_count() or 2))
    window = WINDOW_BATCHES * batch_size
    todo = [items[i] for k in mine for i in plan.shards[k]]
    prepare = _prepare(codec, max_window_seconds, context_seconds)
    codec._plan([1], max_window_seconds, context_seconds)  # bad window settings fail here, not per item
    stream = _prefetch_map(prepare, todo, workers, ahead=2 * window)
    bar = None
    if progress and pid == 0 and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="tokenize", unit="item", disable=None, file=sys.stderr)
    stats = {"process_id": pid, "items": 0, "errors": 0, "audio_seconds": 0.0, "wait_s": 0.0}
    start = time.perf_counter()
    for k in mine:
        rows: dict[int, dict] = {}
        errors: list[dict] = []

        def sink(key, codes, rows=rows):
            index, offset, (lo, hi) = key
            rows[index]["codes"][offset : offset + hi - lo] = codes[lo:hi]

        shard = plan.shards[k]
        for w in range(0, len(shard), window):
            ready, added = [], []
            for index in shard[w : w + window]:
                t = time.perf_counter()
                prepared = next(stream)
                stats["wait_s"] += time.perf_counter() - t
                if "error" in prepared:
                    errors.append(
                        {"id": items[index].id, "path": items[index].path, "error": prepared["error"]}
                    )
                    continue
                rows[index] = {
                    "id": items[index].id,
                    "codes": np.zeros(prepared["num_codes"], np.int32),
                    "num_samples": prepared["num_samples"],
                    "duration": prepared["num_samples"] / codec.sampling_rate,
                }
                added.append(index)
                for part in prepared["parts"]:
                    ready.append(((index, part.get("offset", 0), part["keep"]), part))
            ready.sort(key=lambda p: -p[1]["num_codes"])
            for b in range(0, len(ready), batch_size):
                encoder.submit(ready[b : b + batch_size], sink)
            seconds = sum(rows[i]["duration"] for i in added)
            stats["audio_seconds"] += seconds
            if bar is not None:
                elapsed = time.perf_counter() - start
                bar.update(len(shard[w : w + window]))
                bar.set_postfix(
                    hours=f"{stats['audio_seconds'] / 3600:.2f}",
                    audio_s_per_s=f"{stats['audio_seconds'] / max(elapsed, 1e-9):.1f}",
                    refresh=False,
                )
        encoder.collect(sink)
        write_shard(plan, k, [rows[i] for i in sorted(rows)], errors)
        stats["items"] += len(rows)
        stats["errors"] += len(errors)
    if bar is not None:
        bar.close()
    stats["wall_s"] = time.perf_counter() - start
    stats["device_busy_s"] = encoder.busy_s
    stats["device_idle_fraction"] = max(0.0, 1.0 - encoder.busy_s / stats["wall_s"]) if todo else 0.0
    stats["compile_s"] = encoder.compile_s
    stats["shapes"] = sorted(encoder.shapes)
    stats["shards_written"] = len(mine)
    if nproc > 1:
        _barrier("xcodec2_jax.tokenize: all shards written")
    extra = {
        "library_version": __version__,
        "num_devices": jax.device_count(),
        "num_processes": nproc,
    }
    if pid == 0:
        manifest = write_summary(plan, job, extra)
    else:
        from .shards import shard_stats

        num, seconds, errs = shard_stats(plan)
        manifest = {**job, **extra, "num_items": num, "num_errors": len(errs), "audio_seconds": seconds}
    if nproc > 1:
        _barrier("xcodec2_jax.tokenize: manifest written")
    return {**manifest, "run": stats}
