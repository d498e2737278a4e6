"""Files: the one directory walk, the audio suffixes, and atomic writes (complete or absent)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

# Audio files that soundfile (libsndfile) reads, as found in folders by the CLI, tokenize and training.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au")


def walk_files(root: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Every file under ``root`` (recursively) whose lower-cased name ends in one of ``suffixes``
    (None: every file), in a fixed order: directories and names sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.fspath(root)):
        dirnames.sort()
        names = sorted(filenames)
        if suffixes is not None:
            names = [n for n in names if n.lower().endswith(suffixes)]
        found += [os.path.join(dirpath, n) for n in names]
    return found


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, sync: bool = True) -> None:
    """``write(f)`` into a hidden temporary file beside ``path``, then rename it to ``path``: readers
    see the old file or the whole new one, never a part. ``sync`` flushes it to disk before the
    rename, so a crash cannot leave a renamed but empty file. The temporary file is removed on error."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any, *, sync: bool = True) -> None:
    """``data`` as indented, key-sorted JSON, written with :func:`atomic_write`."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()), sync=sync)


def is_temporary(name: str, target: str) -> bool:
    """True for a leftover temporary file that :func:`atomic_write` made for ``target`` (a base name)."""
    return name.startswith("." + target + ".") and name.endswith(".tmp")
