"""Traced programs kept on disk, so a later process neither traces nor lowers the model again.

JAX's persistent compilation cache (:mod:`xcodec2_jax.cache`) saves the compilation, but every new
process still traces the Python model and lowers it to StableHLO before it can look the executable
up: about 2.5 s for a full-model encode on a 2-core CPU, every time ``xcodec2-jax encode`` starts.
:func:`cached_jit` keeps each traced program as a serialized ``jax.export.Exported`` in a folder
beside the compilation cache; a later process deserializes it (milliseconds), lowers the small call
to it, and finds the executable in the compilation cache.

A program is keyed by everything that shapes it: the function's name and ``key`` (model config,
dtype, precision, lowering), the argument tree with every shape and dtype, the platform, the
versions of JAX and of this library, and a digest of this library's source files, so an edited
checkout never runs a stale program. A file that cannot be read back is replaced; a folder that
cannot be written costs only the saving.

Compiling the full model grows the heap by hundreds of MB that the allocator keeps after the
compiler frees it; the process then runs the program with that heap and the weights' pages both
resident. A compilation of one of these programs (or its load from the compilation cache) is
therefore followed by ``malloc_trim`` (glibc; elsewhere nothing), which hands the freed heap back
to the OS before the program first runs.

Lowering the call to a read-back program makes JAX initialize its CPU LAPACK kernels, in case the
program calls them; that imports ``scipy.linalg`` (0.1-0.2 s under the GIL, on the way to every
first encode of a process). A program whose module names no LAPACK kernel (the codec's never do)
is lowered without that step; any other lowering, in this process, is left as JAX does it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

PROGRAMS_DIR = "xcodec2_jax_programs"
# JAX's monitoring event recorded right after each backend compilation (or compilation cache load).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_calling = threading.local()  # set while a cached_jit program is being called on this thread
# Programs read back or exported whose modules call no LAPACK kernel (see the module's docstring).
_LAPACK_FREE: weakref.WeakSet = weakref.WeakSet()


@functools.cache
def _source_digest() -> str:
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def programs_dir(compilation_cache_dir: str | None) -> str | None:
    """Where traced programs go for a compilation cache folder (None: no cache, nothing kept)."""
    return None if compilation_cache_dir is None else os.path.join(compilation_cache_dir, PROGRAMS_DIR)


def _signature(args) -> str:
    import jax

    leaves, treedef = jax.tree.flatten(args)
    shapes = ";".join(f"{tuple(x.shape)}:{jax.numpy.dtype(x.dtype).name}" for x in leaves)
    return f"{treedef}|{shapes}"


def cached_jit(
    fn: Callable, name: str, key: Any, directory: str | None, compiler_options: dict | None = None
) -> Callable:
    """``jax.jit(fn, compiler_options=...)``, whose traced programs are kept in ``directory`` (None:
    none kept). Each compilation (or load from the compilation cache) of one of its programs is
    followed by ``malloc_trim`` (see the module's docstring).

    ``key`` must name everything ``fn`` closes over that changes its program (config, dtype...);
    its ``repr`` goes into the file name's digest. Only positional array arguments are supported.
    ``compiler_options`` (XLA's, per compilation) are not part of the program; JAX's compilation
    cache keys the executables by them.
    """
    import jax

    _listen_for_compilations()
    jitted = jax.jit(fn, compiler_options=compiler_options)
    calls: dict[str, Callable] = {}
    lock = threading.Lock()  # held while a program is resolved or compiled ahead

    def _make(signature: str, args) -> Callable:
        # With the lock held: the signature's program, traced (or read back).
        if directory is None:
            return jitted
        return _load_or_export(jitted, name, key, directory, signature, args, compiler_options)

    def resolve(signature: str, args) -> Callable:
        # With the lock held: the signature's program, made the first time.
        program = calls.get(signature)
        if program is None:
            program = calls[signature] = _make(signature, args)
        return program

    def program_for(signature: str, args) -> Callable:
        program = calls.get(signature)
        if program is None:
            with lock:
                program = resolve(signature, args)
        return program

    def call(*args):
        program = program_for(_signature(args), args)
        with _running(program):
            return program(*args)

    def precompile(*specs) -> None:
        """Compile (or load from the compilation cache) the program for arguments shaped like
        ``specs`` (``jax.ShapeDtypeStruct`` s, with the shardings the real arguments will have), so
        that the first call with such arguments runs at once. Safe on another thread: a call with
        that signature meanwhile waits for it (the program is stored only once compiled; stored
        before, it let such a call compile it a second time)."""
        signature = _signature(specs)
        with lock:
            program = calls.get(signature)
            if isinstance(program, _Compiled):
                return
            if program is None:
                program = _make(signature, specs)
            with _running(program):
                compiled = program.trace(*specs).lower().compile()
            calls[signature] = _Compiled(compiled, program, lambda: calls.__setitem__(signature, program))

    # As jax.jit's: how many executables the function holds, one per argument signature here.
    call._cache_size = lambda: sum(
        1 if isinstance(p, _Compiled) else p._cache_size() for p in set(calls.values())
    )
    call.precompile = precompile
    call._programs = calls  # signature -> program (for tests and debugging)
    return call


class _Compiled:
    """A program compiled ahead for a signature. Its first call falls back to the jitted program
    (``replace`` puts that in its place) if the arguments are not placed as the specs said (another
    device, say): compiled ahead, an executable accepts only the shardings it was compiled for."""

    def __init__(self, compiled, program: Callable, replace: Callable[[], None]):
        self.compiled, self.program, self.replace, self.checked = compiled, program, replace, False

    def __call__(self, *args):
        if self.checked:
            return self.compiled(*args)
        try:
            out = self.compiled(*args)
        except (TypeError, ValueError):
            self.replace()
            return self.program(*args)
        self.checked = True
        return out


@contextlib.contextmanager
def _running(program: Callable):
    """Marks this thread as calling (or compiling) one of our programs, for ``_after_compile`` and
    ``_ensure_backends_initialized``."""
    _calling.active, _calling.lapack_free = True, program in _LAPACK_FREE
    try:
        yield
    finally:
        _calling.active = _calling.lapack_free = False


@functools.cache
def _skip_lapack_init_for_our_programs() -> None:
    """Wrap jax.export's hook that initializes the CPU LAPACK kernels before lowering a call to an
    exported module: skipped while a program of ``_LAPACK_FREE`` is lowered on this thread. A JAX
    without that hook (it is private) keeps its behaviour and the import."""
    try:
        from jax._src.export import _export

        ensure = _export._ensure_backends_initialized
    except (ImportError, AttributeError):
        return

    def ensure_unless_lapack_free(platforms, *args, **kwargs):
        if not getattr(_calling, "lapack_free", False):
            return ensure(platforms, *args, **kwargs)
        return None

    _export._ensure_backends_initialized = ensure_unless_lapack_free


def _call_program(exported, compiler_options) -> Callable:
    import jax

    program = jax.jit(exported.call, compiler_options=compiler_options)
    # A LAPACK custom call names its kernel (lapack_sgetrf_ffi...) in the serialized module.
    if b"lapack" not in exported.mlir_module_serialized:
        _skip_lapack_init_for_our_programs()
        _LAPACK_FREE.add(program)
    return program


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _after_compile(event: str, duration: float, **kwargs) -> None:
    if event == _COMPILE_EVENT and getattr(_calling, "active", False):
        trim = _malloc_trim()
        if trim is not None:
            trim(0)


@functools.cache
def _listen_for_compilations() -> None:
    import jax

    jax.monitoring.register_event_duration_secs_listener(_after_compile)


def _load_or_export(jitted, name, key, directory, signature, args, compiler_options) -> Callable:
    import jax
    from jax import export

    from . import __version__

    identity = "\n".join(
        [name, repr(key), signature, jax.default_backend(), jax.__version__, __version__, _source_digest()]
    )
    path = os.path.join(directory, f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:32]}.jaxexport")
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                exported = export.deserialize(bytearray(f.read()))
            return _call_program(exported, compiler_options)
        except Exception as e:  # a truncated or foreign file: export it again
            warnings.warn(f"re-tracing {name}: cannot read {path} ({type(e).__name__}: {e})", stacklevel=3)
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    exported = export.export(jitted)(*specs)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as f:
            f.write(exported.serialize())
        os.replace(f.name, path)  # complete or absent, never half-written
    except OSError as e:
        warnings.warn(f"cannot keep the traced {name} in {directory} ({e})", stacklevel=3)
    return _call_program(exported, compiler_options)
