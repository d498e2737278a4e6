"""One small wrapper per private API of a dependency, each in a module of its own.

A private name can vanish in any release. Each wrapper module says which private name it uses,
checks the installed version against the range it was written for, and has a ``check()`` that
raises :class:`PrivateAPIMissing` when the name is gone; the test suite calls every ``check()``, so
an upgrade that removes one fails loudly there. At run time a missing name costs only the
optimisation it enabled, with one warning naming it, never a wrong result.
"""

from __future__ import annotations

import warnings


class PrivateAPIMissing(RuntimeError):
    """A private API of a dependency that a wrapper relies on is not there."""


_warned: set[str] = set()


def warn_missing(name: str, what: str) -> None:
    """One warning per process that the private ``name`` is missing and ``what`` is skipped."""
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"{name} is not available in this version: {what}", stacklevel=3)


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.10.2"`` -> ``(0, 10, 2)``; pre-release suffixes ignored."""
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_version(package: str, version: str, lowest: str, below: str) -> bool:
    """True if ``version`` of ``package`` lies in [lowest, below), the range a wrapper was written and
    tested for; else one warning that the private API it uses may have changed."""
    if version_tuple(lowest) <= version_tuple(version) < version_tuple(below):
        return True
    warn_missing(
        f"{package} {version}",
        f"a private API used by xcodec2_jax was tested with {package} >={lowest},<{below} only",
    )
    return False


# The wrapper modules, for the test that checks them all.
MODULES = ("jax_export", "jax_distributed", "jax_monitoring", "libc", "numpy_mmap", "orbax_tspec")
