"""Training crops: random fixed-length pieces of a corpus, a pure function of (seed, step, row).

Row r of step k's batch draws an item uniformly (as X-Codec-2.0's shuffled data loader does) and a
uniform offset in it from a generator seeded by ``(seed, k, r)`` alone; an item shorter than the crop
is zero-padded at its end. So a resumed run sees exactly the batches of one that never stopped, and
each process of a multi-host run reads only its own rows. An item that cannot be read is recorded
once (``on_bad``) and the row draws again from its own generator: the batches stay a function of the
seed and the corpus, whenever the bad item is discovered.

Items are listed by :func:`xcodec2_jax.corpus.sources.list_items` (what ``tokenize`` reads) and read
on worker threads ahead of the device (:class:`Prefetcher`), a few decoded items kept in memory.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ..corpus.sources import Item, read_item
from ..utils.storage import StorageError


class NoUsableAudio(ValueError):
    """Every item of the corpus failed to read."""


class Crops:
    """Random crops from ``items``.

    Args:
        items: the corpus, as listed by ``list_items``.
        seed: seed of every draw.
        on_bad: called once per unreadable item with ``(item, reason)``.
        cache_items: decoded items kept in memory (least recently used dropped first).
    """

    def __init__(
        self,
        items: Sequence[Item],
        seed: int = 0,
        on_bad: Callable[[Item, str], None] | None = None,
        cache_items: int = 256,
    ):
        if not items:
            raise NoUsableAudio("no items to draw crops from")
        self.items = list(items)
        self.seed = seed
        self.on_bad = on_bad
        self.bad: set[int] = set()
        self._lock = threading.Lock()
        self._read = functools.lru_cache(maxsize=cache_items)(self._read_uncached)

    def _read_uncached(self, index: int) -> np.ndarray | str:
        try:
            return read_item(self.items[index])
        except StorageError:
            raise  # the store, not the item: a run stops rather than skip every item after it
        except ValueError as e:
            return " ".join(str(e).split())

    def _audio(self, index: int) -> np.ndarray | None:
        audio = self._read(index)
        if isinstance(audio, np.ndarray) and audio.size:
            return audio
        reason = audio if isinstance(audio, str) else "no samples"
        with self._lock:
            new = index not in self.bad
            self.bad.add(index)
            exhausted = len(self.bad) == len(self.items)
        if new and self.on_bad is not None:
            self.on_bad(self.items[index], reason)
        if exhausted:
            raise NoUsableAudio(f"no usable audio: none of the {len(self.items)} item(s) could be read")
        return None

    def row(self, step: int, row: int, samples: int) -> np.ndarray:
        """Crop ``row`` of step ``step``'s batch, float32 (samples,)."""
        rng = np.random.default_rng([self.seed, step, row])
        while True:
            index = int(rng.integers(len(self.items)))
            if index in self.bad:
                continue
            audio = self._audio(index)
            if audio is not None:
                break
        start = int(rng.integers(0, max(len(audio) - samples, 0) + 1))
        out = np.zeros(samples, np.float32)
        piece = audio[start : start + samples]
        out[: len(piece)] = piece
        return out

    def batch(self, step: int, rows: Sequence[int], samples: int) -> np.ndarray:
        """Rows ``rows`` of step ``step``'s batch, float32 (len(rows), samples)."""
        return np.stack([self.row(step, r, samples) for r in rows])

    def first_usable(self) -> np.ndarray:
        """The audio of the first item that reads (probing in order); :class:`NoUsableAudio` if none does."""
        for index in range(len(self.items)):
            audio = self._audio(index)
            if audio is not None:
                return audio
        raise NoUsableAudio(f"no usable audio: none of the {len(self.items)} item(s) could be read")


class Prefetcher:
    """Batches of ``samples``-long crops for steps ``start .. stop - 1``, read on ``workers`` threads,
    ``depth`` steps ahead."""

    def __init__(
        self,
        crops: Crops,
        rows: Sequence[int],
        samples: int,
        start: int,
        stop: int,
        depth: int = 4,
        workers: int = 2,
    ):
        self.crops = crops
        self.rows = list(rows)
        self.samples = samples
        self.start, self.stop, self.depth = start, stop, depth
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="xcodec2-crops")

    def __iter__(self) -> Iterator[np.ndarray]:
        pending: collections.deque = collections.deque()
        step = self.start
        try:
            while step < self.stop or pending:
                while step < self.stop and len(pending) < self.depth:
                    pending.append(self.pool.submit(self.crops.batch, step, self.rows, self.samples))
                    step += 1
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
