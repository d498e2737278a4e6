"""Traced programs kept on disk, so a later process neither traces nor lowers the model again.

JAX's persistent compilation cache (:mod:`.compilation_cache`) saves the compilation, but every new
process still traces the Python model and lowers it to StableHLO before it can look the executable
up: about 2.5 s for a full-model encode on a 2-core CPU, every time ``xcodec2-jax encode`` starts.
:class:`CachedProgram` keeps each traced program as a serialized ``jax.export.Exported`` in a folder
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
import dataclasses
import functools
import hashlib
import os
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import export

from ..modeling.layout import ENCODE_MODULES
from ..modeling.model import Xcodec2Model, abstract_params
from ..utils.compat import jax_export, jax_monitoring
from ..utils.compat.libc import malloc_trim
from ..utils.files import atomic_write, walk_files
from ..utils.version import __version__

PROGRAMS_DIR = "xcodec2_jax_programs"
# XLA:CPU spends most of a compilation in LLVM's optimisation passes over the fused element-wise
# loops; the expensive ones cut the full model's compile time by a third to a half on a 2-core CPU
# while the run time stays within noise (the convolutions and dots are library calls either way),
# so the codec skips them on CPUs. Codes are unchanged.
CPU_COMPILER_OPTIONS = {"xla_llvm_disable_expensive_passes": True}
_calling = threading.local()  # set while one of our programs is being called on this thread


@functools.cache
def _source_digest() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for path in walk_files(root, (".py",)):
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def programs_dir(compilation_cache_dir: str | None) -> str | None:
    """Where traced programs go for a compilation cache folder (None: no cache, nothing kept)."""
    return None if compilation_cache_dir is None else os.path.join(compilation_cache_dir, PROGRAMS_DIR)


def signature(args) -> str:
    """The argument tree with every leaf's shape and dtype: what a program is compiled for."""
    leaves, treedef = jax.tree.flatten(args)
    shapes = ";".join(f"{tuple(x.shape)}:{jnp.dtype(x.dtype).name}" for x in leaves)
    return f"{treedef}|{shapes}"


class CachedProgram:
    """``jax.jit(fn, compiler_options=...)`` whose traced programs are kept in ``directory`` (None:
    none kept), one per argument :func:`signature`. Each compilation (or load from the compilation
    cache) of one of its programs is followed by ``malloc_trim`` (see the module's docstring).

    ``key`` must name everything ``fn`` closes over that changes its program (config, dtype...);
    its ``repr`` goes into the file name's digest. Only positional array arguments are supported.
    ``compiler_options`` (XLA's, per compilation) are not part of the program; JAX's compilation
    cache keys the executables by them.
    """

    def __init__(self, fn: Callable, name: str, key: Any, directory: str | None, compiler_options=None):
        _listen_for_compilations()
        self.fn, self.name, self.key, self.directory = fn, name, key, directory
        self.compiler_options = compiler_options
        self.jitted = jax.jit(fn, compiler_options=compiler_options)
        self.programs: dict[str, Callable] = {}  # signature -> program (traced, read back or compiled)
        self.compiled: set[str] = set()  # signatures run or compiled ahead: one executable each
        self._lock = threading.Lock()  # held while a program is resolved or compiled ahead

    def __call__(self, *args):
        sig = signature(args)
        program = self.programs.get(sig)
        if program is None:
            with self._lock:
                program = self._resolve(sig, args)
        with _running(program):
            out = program(*args)
        self.compiled.add(sig)
        return out

    def precompile(self, *specs) -> None:
        """Compile (or load from the compilation cache) the program for arguments shaped like
        ``specs`` (``jax.ShapeDtypeStruct`` s, with the shardings the real arguments will have), so
        that the first call with such arguments runs at once. Safe on another thread: a call with
        that signature meanwhile waits for it (the program is stored only once compiled)."""
        sig = signature(specs)
        with self._lock:
            program = self.programs.get(sig)
            if isinstance(program, _Compiled):
                return
            if program is None:
                program = self._make(sig, specs)
            with _running(program):
                compiled = program.trace(*specs).lower().compile()
            self.programs[sig] = _Compiled(compiled, program, lambda: self.programs.__setitem__(sig, program))
            self.compiled.add(sig)

    def num_compiled(self) -> int:
        """How many executables the program holds: one per argument signature run or compiled ahead."""
        return len(self.compiled)

    def _resolve(self, sig: str, args) -> Callable:
        # With the lock held: the signature's program, made the first time.
        program = self.programs.get(sig)
        if program is None:
            program = self.programs[sig] = self._make(sig, args)
        return program

    def _make(self, sig: str, args) -> Callable:
        # With the lock held: the signature's program, traced (or read back).
        if self.directory is None:
            return self.jitted
        return _load_or_export(self, sig, args)


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


_LAPACK_FREE: weakref.WeakSet = weakref.WeakSet()  # programs whose modules call no LAPACK kernel


@contextlib.contextmanager
def _running(program: Callable):
    """Marks this thread as calling (or compiling) one of our programs, for ``_after_compile``, and
    skips JAX's LAPACK initialisation for programs that need none (see the module docstring)."""
    _calling.active = True
    try:
        with jax_export.lapack_init_skipped(program in _LAPACK_FREE):
            yield
    finally:
        _calling.active = False


def _call_program(exported, compiler_options) -> Callable:
    program = jax.jit(exported.call, compiler_options=compiler_options)
    # A LAPACK custom call names its kernel (lapack_sgetrf_ffi...) in the serialized module.
    if b"lapack" not in exported.mlir_module_serialized:
        _LAPACK_FREE.add(program)
    return program


def _after_compile(event: str, duration: float, **kwargs) -> None:
    if event == jax_monitoring.backend_compile_event() and getattr(_calling, "active", False):
        malloc_trim()


@functools.cache
def _listen_for_compilations() -> None:
    jax.monitoring.register_event_duration_secs_listener(_after_compile)


def _load_or_export(cached: CachedProgram, sig: str, args) -> Callable:
    parts = [cached.name, repr(cached.key), sig, jax.default_backend(), jax.__version__, __version__]
    identity = "\n".join(parts + [_source_digest()])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:32]
    path = os.path.join(cached.directory, f"{cached.name}-{digest}.jaxexport")
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                exported = export.deserialize(bytearray(f.read()))
            return _call_program(exported, cached.compiler_options)
        except Exception as e:  # a truncated or foreign file: export it again
            warnings.warn(
                f"re-tracing {cached.name}: cannot read {path} ({type(e).__name__}: {e})", stacklevel=4
            )
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    exported = export.export(cached.jitted)(*specs)
    try:
        os.makedirs(cached.directory, mode=0o700, exist_ok=True)
        atomic_write(path, lambda f: f.write(exported.serialize()), sync=False)
    except OSError as e:
        warnings.warn(f"cannot keep the traced {cached.name} in {cached.directory} ({e})", stacklevel=4)
    return _call_program(exported, cached.compiler_options)


def encoder_params(params: dict) -> dict:
    """The params that the encode program takes: those of ``layout.ENCODE_MODULES``. Passing only
    these makes it one program whether or not the caller holds the decoder's weights too."""
    return {m: v for m, v in params.items() if m in ENCODE_MODULES}


def specs_of(x) -> jax.ShapeDtypeStruct:
    """The shape and dtype of an array (and its sharding if it is a committed jax.Array)."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def encoder_param_specs(params: dict | None, config, device: jax.Device | None = None) -> dict:
    """Specs of the encode program's params: those of ``params`` where they are placed, or, before
    they are loaded (None), the model's shapes on ``device`` (default: the first local device)."""
    if params is not None:
        return jax.tree.map(specs_of, encoder_params(params))
    where = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    shapes = encoder_params(abstract_params(config))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), shapes)


@dataclasses.dataclass
class CodecPrograms:
    """The codec's compiled programs for one model (config, dtype, precision, lowering).

    ``encode(params, inputs)``: encoder params (:func:`encoder_params`) and a padded batch
    (``batching.pad_batch``: ``input_values`` (B, 1, T), ``padding_mask`` (B, T), ``input_features``
    (B, N, 160), ``input_features_mask`` (B, N)) -> codes (B, N) int32, each item exactly as alone.
    ``decode(params, codes, mask)``: codes and mask (B, N) int32 -> audio (B, N · hop) float32.
    ``encode_fn`` / ``decode_fn`` are the same functions unjitted, for callers that jit them with
    their own shardings (the corpus job over several devices). ``compiler_options``: XLA's.
    """

    model: Xcodec2Model
    compiler_options: dict
    encode: CachedProgram
    decode: CachedProgram

    @classmethod
    def build(cls, model: Xcodec2Model, directory: str | None, compiler_options: dict | None = None):
        """Programs for ``model``, their traces kept in ``directory`` (None: not kept).
        ``compiler_options`` None: :data:`CPU_COMPILER_OPTIONS` on a CPU, XLA's defaults elsewhere."""
        if compiler_options is None:
            cpu = jax.devices()[0].platform == "cpu"
            compiler_options = dict(CPU_COMPILER_OPTIONS) if cpu else {}
        options = dict(compiler_options) or None
        key = (model.config, jnp.dtype(model.dtype).name, model.precision, model.lowering)
        programs = cls(model, dict(compiler_options), None, None)
        programs.encode = CachedProgram(programs.encode_fn, "encode", key, directory, options)
        programs.decode = CachedProgram(programs.decode_fn, "decode", key, directory, options)
        return programs

    def encode_fn(self, params, inputs):
        out = self.model.apply({"params": params}, **inputs, isolate_items=True, method=Xcodec2Model.encode)
        return out.audio_codes[:, 0]

    def decode_fn(self, params, codes, mask):
        out = self.model.apply(
            {"params": params}, codes[:, None], audio_codes_mask=mask, method=Xcodec2Model.decode
        )
        return out.audio_values[:, 0]
