"""Every wrapper of a dependency's private API finds what it wraps in the installed versions: an
upgrade that removes one fails here, loudly, instead of silently losing the optimisation."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from xcodec2_jax.utils import compat
from xcodec2_jax.utils.compat import jax_export, libc, numpy_mmap


@pytest.mark.parametrize("name", compat.MODULES)
def test_private_api_is_there(name):
    importlib.import_module(f"xcodec2_jax.utils.compat.{name}").check()


def test_version_check_warns_outside_the_tested_range():
    assert compat.check_version("jax", "0.10.2", "0.9", "0.11")
    with pytest.warns(UserWarning, match="tested with somepkg >=0.1,<0.2"):
        assert not compat.check_version("somepkg", "9.0", "0.1", "0.2")


def test_populate_write_reports_success_on_anonymous_memory():
    import mmap

    mm = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    assert libc.populate_write(np.frombuffer(mm, np.uint8)) is True


def test_memmap_advice_reaches_the_mapping(tmp_path):
    import mmap

    arr = np.memmap(tmp_path / "f", np.uint8, mode="w+", shape=(1 << 16,))
    assert isinstance(numpy_mmap.mapping(arr), mmap.mmap)
    numpy_mmap.advise(arr, mmap.MADV_DONTNEED, 0, 4096)  # a valid call; raises on a bad range


def test_lapack_skip_is_scoped_to_the_thread_and_block():
    with jax_export.lapack_init_skipped(True):
        assert jax_export._state.skip is True
    assert jax_export._state.skip is False
