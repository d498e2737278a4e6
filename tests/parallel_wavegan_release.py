"""kan-bayashi's HiFi-GAN discriminators from the PyPI release ``parallel-wavegan==0.6.1``, unchanged.

X-Codec-2.0's ``module/mpd.py`` is this release's ``HiFiGANPeriodDiscriminator`` /
``HiFiGANMultiPeriodDiscriminator`` (with the channel growth a parameter, 4 in its config), so the
multi-period discriminator is tested against it.

The package is never installed: its ``setup.py`` imports pip, so the sdist neither builds in an
isolated environment nor has a wheel. :func:`hifigan_module` downloads the sdist with
``pip download --no-binary :all: --no-build-isolation`` (pip still runs ``setup.py`` for the
metadata, with this environment's setuptools) at first use, checks its sha256, and keeps only
``parallel_wavegan/models/hifigan.py`` and the licence in the per-user cache of
``original_release.py`` (``$XCODEC2_JAX_TEST_CACHE``, else ``~/.cache/xcodec2_jax_tests``), written
atomically. The file is imported by location under a private name; the ``parallel_wavegan`` modules it
imports for its generators (layers, duration predictor, HDF5 utilities, with h5py and yaml behind
them) are stood in for by empty placeholders only while it is imported, as the discriminators use none
of them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import os
import sys
import tarfile
import types

from original_release import _cached_source, _import_file, temporary_modules

PARALLEL_WAVEGAN_SDIST = dict(
    requirement="parallel-wavegan==0.6.1",
    filename="parallel_wavegan-0.6.1.tar.gz",
    sha256="819d6e5c622b9cba023cf34415b6489cfb39820079593887c982ac0a2ee1ce6f",
    pip_args=("--no-binary", ":all:", "--no-build-isolation"),
)
# Archive member -> file name in the cache.
_MEMBERS = {
    "parallel_wavegan-0.6.1/parallel_wavegan/models/hifigan.py": "hifigan.py",
    "parallel_wavegan-0.6.1/LICENSE": "LICENSE",
}
_MODULE = "_xcodec2_jax_tests_parallel_wavegan_hifigan"
# What hifigan.py imports from its own package, none of it used by the discriminators.
_PLACEHOLDERS = {
    "parallel_wavegan.layers": ("CausalConv1d", "CausalConvTranspose1d", "HiFiGANResidualBlock"),
    "parallel_wavegan.layers.duration_predictor": ("DurationPredictor",),
    "parallel_wavegan.layers.length_regulator": ("LengthRegulator",),
    "parallel_wavegan.utils": ("read_hdf5",),
}


def _extract(archive: str, dest: str) -> None:
    """hifigan.py and the licence, unchanged, into ``dest``."""
    with tarfile.open(archive, "r:gz") as tar:
        for member, name in _MEMBERS.items():
            with tar.extractfile(member) as src, open(os.path.join(dest, name), "wb") as out:
                out.write(src.read())


@contextlib.contextmanager
def _placeholder_package():
    """``parallel_wavegan`` and the submodules of :data:`_PLACEHOLDERS`, empty but for placeholder names,
    in ``sys.modules`` only while hifigan.py is imported; the previous entries are restored after."""

    def placeholder(*_args, **_kwargs):
        raise RuntimeError("a parallel_wavegan placeholder was called: only the discriminators are loaded")

    modules = {}
    for name in ("parallel_wavegan", "parallel_wavegan.layers", *_PLACEHOLDERS):
        module = modules[name] = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__path__ = []
        for attr in _PLACEHOLDERS.get(name, ()):
            setattr(module, attr, placeholder)
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    with temporary_modules(modules):
        yield


@functools.cache
def hifigan_module() -> types.ModuleType:
    """``parallel_wavegan/models/hifigan.py`` of the 0.6.1 sdist, fetched (cached) and imported once."""
    folder = _cached_source(PARALLEL_WAVEGAN_SDIST, _extract, ("hifigan.py", "LICENSE"))
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    import torch  # noqa: F401  (imported outside the placeholders, so nothing of it sees them)

    with _placeholder_package():
        return _import_file(_MODULE, os.path.join(folder, "hifigan.py"))
