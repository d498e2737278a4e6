"""Several streams read at once, consumed one after the other: tar shards fetched ahead of the job.

Each stream runs on a thread of its own into a bounded queue, at most ``ahead`` streams at a time,
so network reads of the next shards overlap the work on the current one while memory stays bounded
(``ahead`` × ``size`` items). A stream's error is raised where its items are consumed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

_END = object()
_POLL_S = 0.1


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def read_ahead(streams: Iterable[Callable[[], Iterable]], ahead: int = 2, size: int = 64) -> Iterator:
    """The items of ``streams`` (functions returning iterables), in order, each read by its own thread
    up to ``size`` items ahead, ``ahead`` streams at once. Closing the iterator stops the threads."""
    pending = list(streams)
    stop = threading.Event()
    started: list[queue.Queue] = []

    def start(make: Callable[[], Iterable]) -> None:
        q: queue.Queue = queue.Queue(size)
        started.append(q)
        threading.Thread(
            target=_fill, args=(make, q, stop), name="xcodec2_jax read-ahead", daemon=True
        ).start()

    try:
        for i in range(len(pending)):
            while len(started) < min(i + ahead, len(pending)):
                start(pending[len(started)])
            while True:
                item = started[i].get()
                if item is _END:
                    break
                if isinstance(item, _Failed):
                    raise item.error
                yield item
            started[i] = None  # its items are consumed: let the queue go
    finally:
        stop.set()


def _fill(make: Callable[[], Iterable], q: queue.Queue, stop: threading.Event) -> None:
    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in make():
            if not put(item):
                return
    except BaseException as e:  # handed to the consumer, which raises it
        put(_Failed(e))
        return
    put(_END)
