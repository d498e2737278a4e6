"""A call on a background thread whose failure becomes a warning: for work that only saves time."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable


class Background:
    """``fn(*args, **kwargs)`` on a daemon thread; :meth:`join` waits and turns its error into a
    warning that says ``fallback`` (what happens instead)."""

    def __init__(self, fn: Callable, *args, fallback: str = "", **kwargs):
        self.error: BaseException | None = None
        self.fallback = fallback

        def run():
            try:
                fn(*args, **kwargs)
            except Exception as e:  # reported by join; the caller's path works without it
                self.error = e

        self.thread = threading.Thread(
            target=run, name=f"xcodec2_jax {getattr(fn, '__name__', 'background')}", daemon=True
        )
        self.thread.start()

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            warnings.warn(
                f"{type(self.error).__name__}: {self.error}; {self.fallback}".strip("; "), stacklevel=3
            )
