"""Progress bars: tqdm, hidden when stderr is not a terminal."""

from __future__ import annotations

from collections.abc import Iterable


def progress_bar(items: Iterable | None, desc: str, unit: str, enabled: bool = True, **kwargs):
    """tqdm over ``items`` (hidden when not on a terminal), or the items themselves if not ``enabled``
    (``items`` None: a manual bar, ``update``d by the caller, or None if not ``enabled``)."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, disable=None, **kwargs)
