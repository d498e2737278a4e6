"""JAX's persistent compilation cache, on by default for ``Xcodec2Codec`` and the CLI.

Compiling the full model takes tens of seconds on a CPU, longer than encoding a short file. JAX can
keep compiled executables on disk and reuse them in later processes; this module only switches that on
(JAX's own cache, ``jax_compilation_cache_dir``), in a per-user folder:

1. a directory JAX is already configured with (``JAX_COMPILATION_CACHE_DIR``, or
   ``jax.config.update("jax_compilation_cache_dir", ...)``) is kept, whatever is asked here;
2. otherwise ``compilation_cache`` / ``--cache-dir`` if given, then ``$XCODEC2_JAX_CACHE_DIR``, then
   ``$XDG_CACHE_HOME/xcodec2_jax/jax`` (``~/.cache/xcodec2_jax/jax``);
3. ``compilation_cache=False``, ``--no-cache`` or ``XCODEC2_JAX_CACHE_DIR=off`` leave JAX as it is
   (no cache unless JAX was configured with one), and nothing is written.

The setting is process-wide, as JAX's is: the first codec (or CLI run) that switches the cache on
decides the directory for the rest of the process. When the directory is ours, every compilation is
kept (``jax_persistent_cache_min_compile_time_secs = 0``; JAX's default keeps only those over 1 s) so
that a second run of the same shapes compiles nothing. JAX does not bound the folder's size by
default (``jax_compilation_cache_max_size``); one full-model encode bucket takes a few MB to tens of MB.
Like JAX's, the cache is trusted code: the folder is created readable by its owner only.

Compiled executables are not all: a new process would still trace and lower the model before it
could look one up. ``Xcodec2Codec`` therefore also keeps its traced programs, serialized with
``jax.export``, in the subfolder ``xcodec2_jax_programs`` of the same folder (see
:mod:`xcodec2_jax.programs`); the same switches turn that off.
"""

from __future__ import annotations

import os
import warnings

ENV_VAR = "XCODEC2_JAX_CACHE_DIR"
OFF_VALUES = frozenset({"off", "none", "no", "false", "0", "disable", "disabled"})
# JAX's default for jax_persistent_cache_min_compile_time_secs: changed only while still at it.
_JAX_DEFAULT_MIN_COMPILE_SECS = 1.0


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/xcodec2_jax/jax``, ``~/.cache/xcodec2_jax/jax`` without XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xcodec2_jax", "jax")


def _is_off(value: str) -> bool:
    return value.strip().lower() in OFF_VALUES


def resolve_cache_dir(setting: str | os.PathLike | bool | None = None) -> str | None:
    """The folder asked for, ignoring what JAX is configured with: None when the cache is off.

    ``setting``: None or True for the environment variable or the per-user default, False or
    ``"off"`` for no cache, or a directory.
    """
    if setting is False:
        return None
    if setting is None or setting is True:
        env = os.environ.get(ENV_VAR, "")
        if env.strip():
            return None if _is_off(env) else os.path.abspath(os.path.expanduser(env))
        return default_cache_dir()
    if isinstance(setting, (str, os.PathLike)):
        path = os.fspath(setting)
        if not path.strip():
            raise ValueError("compilation_cache must be a directory, True/None (default) or False (off)")
        return None if _is_off(path) else os.path.abspath(os.path.expanduser(path))
    raise ValueError(
        f"compilation_cache must be a directory, True/None (default) or False (off), got {setting!r}"
    )


def enable_compilation_cache(setting: str | os.PathLike | bool | None = None) -> str | None:
    """Switch JAX's persistent compilation cache on as described in the module docstring.

    Returns the directory JAX's cache uses from now on (None: no persistent cache). A folder that
    cannot be created gives a warning and no cache, never an error.
    """
    import jax

    requested = resolve_cache_dir(setting)
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        explicit = isinstance(setting, (str, os.PathLike)) and requested is not None
        if explicit and os.path.abspath(configured) != requested:
            warnings.warn(
                f"JAX is already configured with the compilation cache {configured}; "
                f"keeping it instead of {requested}",
                stacklevel=2,
            )
        return configured if jax.config.jax_enable_compilation_cache else None
    if requested is None or not jax.config.jax_enable_compilation_cache:
        return None
    try:
        os.makedirs(requested, mode=0o700, exist_ok=True)
    except OSError as e:
        warnings.warn(f"no compilation cache: cannot create {requested} ({e})", stacklevel=2)
        return None
    if jax.config.jax_persistent_cache_min_compile_time_secs == _JAX_DEFAULT_MIN_COMPILE_SECS:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_dir", requested)
    return requested
