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
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..inference import batching, windows
from ..inference.codec import Xcodec2Codec
from ..utils import validation
from ..utils.compat import jax_distributed
from ..utils.dtypes import compute_dtype
from ..utils.hub import DEFAULT_MODEL_ID
from ..utils.progress import progress_bar
from ..utils.storage import Location, StorageError
from ..utils.version import __version__
from . import columns as metadata
from .readahead import read_ahead
from .shards import (
    DATA_DIR,
    ERRORS_DIR,
    Plan,
    check_job,
    cut,
    ids_digest,
    shard_stats,
    write_shard,
    write_summary,
)
from .sources import Item, TarShard, list_units, read_item

# Items of a shard are length-sorted into batches within windows of this many batches: a larger
# window pads less, a smaller one starts the device sooner.
WINDOW_BATCHES = 16
# Tar shards read at once (each a thread and a bounded queue of items).
TAR_SHARDS_AHEAD = 3


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


def init_distributed(coordinator_address, num_processes, process_id, distributed: bool) -> None:
    """``jax.distributed.initialize`` when any argument asks for several processes (once per process)."""
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
    jax_distributed.barrier(name, BARRIER_TIMEOUT_S)


def _load(model, dtype, precision, batch_size, revision, cache_dir, compilation_cache):
    return Xcodec2Codec.from_pretrained(
        model,
        dtype=compute_dtype(dtype),
        precision=precision,
        batch_size=batch_size,
        revision=revision,
        cache_dir=cache_dir,
        compilation_cache=compilation_cache,
    )


class _Encoder:
    """Encodes batches of prepared items on the local mesh, one batch in flight while the next is built."""

    def __init__(self, codec, batch_size: int):
        self.codec = codec
        self.devices = jax.local_devices()
        self.batch_size = batch_size
        if len(self.devices) == 1:
            # The codec's own program, kept on disk between runs (see programs.py).
            self.fn, self.params = codec.programs.encode, codec.encode_params
        else:
            mesh = Mesh(np.array(self.devices), ("data",))
            replicated, rows = (
                NamedSharding(mesh, PartitionSpec()),
                NamedSharding(mesh, PartitionSpec("data")),
            )
            self.fn = jax.jit(
                codec.programs.encode_fn,
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
        d = len(self.devices)
        return -(-batching.batch_bucket(n, self.batch_size) // d) * d

    def submit(self, batch: list[tuple[Any, dict]], sink) -> None:
        """Dispatch ``batch`` ((key, prepared) pairs) and collect the previous batch into ``sink``."""
        n = batching.length_bucket(max(p["num_codes"] for _, p in batch))
        parts = [p["features"] for _, p in batch]
        codec = self.codec
        inputs = batching.pad_batch(
            parts, n, self.rows(len(batch)), codec.hop_length, codec.features.padding_value
        )
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
    hop = codec.hop_length

    def prepare(item: Item) -> dict:
        try:
            audio = read_item(item)
            n = batching.num_codes(len(audio), hop)
            # An item past max_window_seconds becomes overlapping windows, each a row of its own,
            # exactly as Xcodec2Codec.encode plans and lays them out.
            pieces = batching.plan_pieces([n], hop, max_window_seconds, context_seconds)
            stats = None if len(pieces) == 1 else windows.feature_stats(audio, hop)
            parts = [
                {
                    "num_codes": w.end - w.start,
                    "features": batching.piece_inputs(codec.features, audio, w, stats),
                    "keep": (w.keep_start - w.start, w.keep_end - w.start),
                    "offset": w.keep_start,
                }
                for w in pieces
            ]
        except StorageError:
            raise  # not this item's fault: every later one would fail alike, so the job stops
        except ValueError as e:
            return {"error": str(e)}
        except Exception as e:  # an unforeseen decoder failure is still one bad item, not a dead job
            return {"error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
        return {"num_samples": len(audio), "num_codes": n, "parts": parts}

    return prepare


# long: 19 documented options; the body is the job's outline, its steps are functions below
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
    storage_options: dict | None = None,
    columns: Sequence[str] | None = None,
) -> dict:
    """Tokenize a corpus into Parquet shards of codes under ``out``; see README "Tokenizing a corpus".

    ``sources``: local paths or URLs (``s3://``, ``gs://``, ``hf://`` ..., globs allowed) of directories
    (audio files, recursively, Parquet files in the datasets layout, or WebDataset tar shards),
    ``.txt`` / ``.jsonl`` manifests, ``.parquet`` files or tar shards; ``out`` a local folder or URL;
    ``storage_options``: options of their filesystems (credentials, endpoint) beside the standard
    configuration. ``columns``: the sources' metadata fields to carry into the output (None: all;
    ``[]``: none). Runs on all local devices; on several hosts
    give ``coordinator_address``, ``num_processes``, ``process_id`` (or ``distributed=True`` to let
    ``jax.distributed.initialize`` detect a TPU pod, Slurm or Open MPI). Running it again finishes an
    interrupted job. Returns the manifest (as written to ``out/manifest.json``) plus this process's
    ``run`` statistics. ValueError for unusable sources or an ``out`` made by a different job; bad
    items are not errors but go to ``out/errors.jsonl`` (``manifest["num_errors"]``).
    ``max_window_seconds`` / ``context_seconds``: long items are encoded in overlapping windows, as by
    ``Xcodec2Codec.encode`` (defaults: its defaults).
    """
    if max_window_seconds is None:
        max_window_seconds = windows.DEFAULT_MAX_WINDOW_SECONDS
    if context_seconds is None:
        context_seconds = windows.DEFAULT_ENCODE_CONTEXT_SECONDS
    validation.positive_int(batch_size, "batch_size")
    init_distributed(coordinator_address, num_processes, process_id, distributed)
    pid, nproc = jax.process_index(), jax.process_count()
    out = Location(out, storage_options)
    model = os.fspath(model or DEFAULT_MODEL_ID)
    units = list_units(sources, storage_options)
    types = metadata.plan(_known_metas(units), columns)
    codec = _load(model, dtype, precision, batch_size, revision, cache_dir, compilation_cache)
    # Bad window settings fail here, once, not once per item.
    batching.plan_pieces([1], codec.hop_length, max_window_seconds, context_seconds)
    job = {
        "model": os.path.abspath(model) if os.path.isdir(model) else model,
        "config": codec.config.to_dict(),
        "dtype": np.dtype(codec.dtype).name,
        "precision": None if precision is None else str(precision),
        "shard_size": shard_size,
        "max_window_seconds": max_window_seconds,
        "context_seconds": context_seconds,
        "num_listed": sum(isinstance(u, Item) for u in units),
        # A tar shard counts by its name (its items' ids start with it), so moving a corpus keeps its job.
        "ids_sha256": ids_digest([u.id if isinstance(u, Item) else "tar:" + u.name for u in units]),
    }
    if any(isinstance(u, TarShard) for u in units):
        job["tar_shards"] = sum(isinstance(u, TarShard) for u in units)
    if types:  # absent without metadata, as in the outputs of earlier versions
        job["columns"] = types
    plan = Plan(out, cut(units, shard_size, lambda u: isinstance(u, TarShard)))
    check_job(out, job, create=pid == 0)
    mine = plan.mine(pid, nproc)
    _remove_leftovers(plan, mine)
    run = _ShardRunner(codec, units, batch_size, max_window_seconds, context_seconds, types)
    stats = run.shards(plan, mine, num_workers, progress and pid == 0)
    stats["process_id"] = pid
    if nproc > 1:
        _barrier("xcodec2_jax.tokenize: all shards written")
    extra = {"library_version": __version__, "num_devices": jax.device_count(), "num_processes": nproc}
    if pid == 0:
        manifest = write_summary(plan, job, extra)
    else:
        num, seconds, errs = shard_stats(plan)
        manifest = {**job, **extra, "num_items": num, "num_errors": len(errs), "audio_seconds": seconds}
    if nproc > 1:
        _barrier("xcodec2_jax.tokenize: manifest written")
    return {**manifest, "run": stats}


def _remove_leftovers(plan: Plan, mine: list[int]) -> None:
    """Temporary files of a killed run's shards that this process redoes."""
    for k in mine:
        plan.out.child(DATA_DIR).remove_temporary(plan.name(k) + ".parquet")
        plan.out.child(ERRORS_DIR).remove_temporary(plan.name(k) + ".jsonl")


def _known_metas(units: list) -> list:
    """The metadata the columns are planned from: every listed item's, and the first sample's of the
    first tar shard (tar shards are not read before the job; its first sample is read twice)."""
    metas = [u.meta for u in units if isinstance(u, Item)]
    first = next((u for u in units if isinstance(u, TarShard)), None)
    if first is not None:
        stream = first.items()
        metas.append(next(stream, Item("", "")).meta)
        stream.close()
    return metas


class _ShardRunner:
    """Runs this process's shards: items prepared on host threads, encoded in bucketed batches."""

    def __init__(self, codec, units: list, batch_size: int, max_window_seconds, context_seconds, types):
        self.codec, self.units, self.batch_size, self.types = codec, units, batch_size, types
        self.encoder = _Encoder(codec, batch_size)
        self.prepare = _prepare(codec, max_window_seconds, context_seconds)
        self.window = WINDOW_BATCHES * batch_size
        self.stats = {"items": 0, "errors": 0, "audio_seconds": 0.0, "wait_s": 0.0}

    def items_of(self, content) -> Callable[[], Iterable]:
        """Shard content's items, then None (the shard's end), as a stream to read ahead."""
        if isinstance(content, TarShard):
            return lambda: itertools.chain(content.items(), [None])
        return lambda: [*(self.units[i] for i in content), None]

    def shards(self, plan: Plan, mine: list[int], num_workers: int | None, progress: bool) -> dict:
        """Encode and write shards ``mine``; returns this run's statistics."""
        contents = [plan.shards[k] for k in mine]
        # Tar shards are streamed on their own threads, a few ahead, so their reads overlap the work.
        items = read_ahead([self.items_of(c) for c in contents], ahead=TAR_SHARDS_AHEAD)
        workers = num_workers or max(2, min(16, os.cpu_count() or 2))
        self.stream = _prefetch_map(self._prepare_or_end, items, workers, ahead=2 * self.window)
        total = None if any(isinstance(c, TarShard) for c in contents) else sum(map(len, contents))
        self.bar = progress_bar(
            None, "tokenize", "item", progress and bool(mine), total=total, file=sys.stderr
        )
        self.start = time.perf_counter()
        for k in mine:
            rows, errors = self.shard()
            write_shard(plan, k, [rows[i] for i in sorted(rows)], errors, self.types)
            self.stats["items"] += len(rows)
            self.stats["errors"] += len(errors)
        if self.bar is not None:
            self.bar.close()
        stats, encoder = self.stats, self.encoder
        stats["wall_s"] = time.perf_counter() - self.start
        stats["device_busy_s"] = encoder.busy_s
        stats["device_idle_fraction"] = max(0.0, 1.0 - encoder.busy_s / stats["wall_s"]) if mine else 0.0
        stats["compile_s"] = encoder.compile_s
        stats["shapes"] = sorted(encoder.shapes)
        stats["shards_written"] = len(mine)
        return stats

    def _prepare_or_end(self, item: Item | None):
        return None if item is None else (item, self.prepare(item))

    def shard(self) -> tuple[dict[int, dict], list[dict]]:
        """(rows by position, failed items) of the next shard of the stream, every batch collected."""
        rows: dict[int, dict] = {}
        errors: list[dict] = []

        def sink(key, codes):
            position, offset, (lo, hi) = key
            rows[position]["codes"][offset : offset + hi - lo] = codes[lo:hi]

        ended = False
        while not ended:
            ready, count, ended = self.take(rows, errors)
            ready.sort(key=lambda p: -p[1]["num_codes"])
            for b in range(0, len(ready), self.batch_size):
                self.encoder.submit(ready[b : b + self.batch_size], sink)
            self.show(count)
        self.encoder.collect(sink)
        return rows, errors

    def take(self, rows: dict, errors: list) -> tuple[list, int, bool]:
        """Up to a window of the shard's next prepared items: a row (codes to fill) per good item, and
        its pieces to encode; returns (pieces, items taken, whether the shard ended)."""
        ready: list = []
        count = 0
        while count < self.window:
            t = time.perf_counter()
            entry = next(self.stream)
            self.stats["wait_s"] += time.perf_counter() - t
            if entry is None:
                return ready, count, True
            item, prepared = entry
            position = len(rows) + len(errors)
            count += 1
            if "error" in prepared:
                errors.append({"id": item.id, "path": item.path, "error": prepared["error"]})
                continue
            duration = prepared["num_samples"] / self.codec.sampling_rate
            rows[position] = {
                "id": item.id,
                "codes": np.zeros(prepared["num_codes"], np.int32),
                "num_samples": prepared["num_samples"],
                "duration": duration,
                "meta": item.meta,
            }
            self.stats["audio_seconds"] += duration
            ready += [((position, part["offset"], part["keep"]), part) for part in prepared["parts"]]
        return ready, count, False

    def show(self, count: int) -> None:
        if self.bar is None:
            return
        seconds = self.stats["audio_seconds"]
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(count)
        self.bar.set_postfix(
            hours=f"{seconds / 3600:.2f}", audio_s_per_s=f"{seconds / elapsed:.1f}", refresh=False
        )
