"""The params cache's bound: size limit with least-recently-used eviction, pruning of entries whose
sources are gone, the free-space check, and listing / clearing. Small fake entries, no model."""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest

from xcodec2_jax.checkpoint import prepared
from xcodec2_jax.checkpoint.prepared import (
    DEFAULT_MAX_BYTES,
    ENV_MAX_GB,
    clear,
    entries,
    format_entries,
    lookup,
    max_bytes_setting,
    prepare,
    prune,
)

N = 1024  # float32 values per fake checkpoint: 4 KiB of data, 4 KiB of source


def _checkpoint(tmp_path, name: str, seed: int = 0):
    """A fake checkpoint folder with one source file; returns (key, sources, build, expected params)."""
    folder = tmp_path / "ckpts" / name
    folder.mkdir(parents=True)
    values = np.random.default_rng(seed).standard_normal(N).astype(np.float32)
    (folder / "model.bin").write_bytes(values.tobytes())
    key, sources = prepared.entry_key([str(folder / "model.bin")], f"config-{name}", None)
    params = {"encoder": {"w": values.reshape(32, 32)}, "decoder": {"b": values[:10].copy()}}

    def build(file):
        return params

    return key, sources, build, params


def _folder_size(folder) -> int:
    return sum(os.path.getsize(folder / f) for f in os.listdir(folder))


def _prepare(folder, checkpoint, max_bytes):
    key, sources, build, params = checkpoint
    mapped = prepare(str(folder), key, sources, build, max_bytes=max_bytes)
    assert mapped is not None
    np.testing.assert_array_equal(mapped["encoder"]["w"], params["encoder"]["w"])
    return key


def _entry_size(folder, key) -> int:
    return os.path.getsize(folder / (key + ".params")) + os.path.getsize(folder / (key + ".json"))


def test_loading_more_checkpoints_than_the_limit_keeps_the_folder_under_it(tmp_path):
    folder = tmp_path / "params"
    checkpoints = [_checkpoint(tmp_path, f"c{i}", seed=i) for i in range(4)]
    first = _prepare(folder, checkpoints[0], max_bytes=None)  # sizes the entries
    size = _entry_size(folder, first)
    limit = 2 * size + size // 2  # two entries fit, three do not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = _prepare(folder, checkpoints[1], limit)
        assert lookup(str(folder), first) is not None  # the older one is used again: now the newer
        third = _prepare(folder, checkpoints[2], limit)
        assert {e.key for e in entries(folder)} == {first, third}  # second was least recently used
        assert _folder_size(folder) <= limit
        fourth = _prepare(folder, checkpoints[3], limit)
    assert [e.key for e in entries(folder)] == [fourth, third]
    assert _folder_size(folder) <= limit
    assert lookup(str(folder), second) is None and lookup(str(folder), first) is None
    assert sorted(os.listdir(folder)) == sorted(
        f"{k}.{s}" for k in (third, fourth) for s in ("json", "params")
    )

    # Explicit prune: a smaller limit evicts down to it, never the kept entry; 0 keeps nothing.
    assert prune(folder, size, keep=third) == [fourth]
    assert prune(folder, 0) == [third] and os.listdir(folder) == []


def test_an_entry_larger_than_the_limit_is_not_kept(tmp_path):
    folder = tmp_path / "params"
    key, sources, build, _ = _checkpoint(tmp_path, "big")
    with pytest.warns(UserWarning, match="exceed the params cache's limit") as record:
        assert prepare(str(folder), key, sources, build, max_bytes=1000) is None
    assert len(record) == 1 and not folder.exists()


def test_a_limit_of_0_keeps_nothing_silently(tmp_path):
    folder = tmp_path / "params"
    kept = _prepare(folder, _checkpoint(tmp_path, "a"), max_bytes=None)
    key, sources, build, _ = _checkpoint(tmp_path, "b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prepare(str(folder), key, sources, build, max_bytes=0) is None
    assert os.listdir(folder) == [] and lookup(str(folder), kept) is None


def test_a_deleted_sources_entry_is_pruned_on_the_next_load(tmp_path):
    folder = tmp_path / "params"
    a, b, c = (_checkpoint(tmp_path, n, seed=i) for i, n in enumerate("abc"))
    gone = _prepare(folder, a, max_bytes=None)
    kept = _prepare(folder, b, max_bytes=None)
    os.unlink(a[1][0][0])
    assert [e.missing_sources for e in entries(folder)] == [False, True]
    # The next load of another checkpoint: a hit prunes nothing (no scan) ...
    assert lookup(str(folder), kept) is not None and len(entries(folder)) == 2
    # ... a miss does, before it is prepared.
    assert lookup(str(folder), c[0]) is None
    assert [e.key for e in entries(folder)] == [kept]
    assert not (folder / (gone + ".params")).exists()

    # Through prepare too, and for a changed (not just deleted) source.
    with open(b[1][0][0], "ab") as f:
        f.write(b"more")
    new = _prepare(folder, c, max_bytes=None)
    assert [e.key for e in entries(folder)] == [new]


def test_entries_report_size_sources_last_use_and_missing_sources(tmp_path):
    folder = tmp_path / "params"
    assert entries(folder) == [] and entries(tmp_path / "nowhere") == []
    assert format_entries([]) == "no prepared checkpoints"
    a, b = _checkpoint(tmp_path, "a"), _checkpoint(tmp_path, "b", seed=1)
    before = time.time()
    ka = _prepare(folder, a, max_bytes=None)
    kb = _prepare(folder, b, max_bytes=None)
    listed = entries(folder)
    assert [e.key for e in listed] == [kb, ka]  # most recently used first
    for entry, checkpoint in zip(listed, (b, a), strict=True):
        assert entry.size == _entry_size(folder, entry.key)
        assert entry.sources == (checkpoint[1][0][0],) and entry.source == entry.sources[0]
        assert before - 1 <= entry.last_used <= time.time() + 1
        assert not entry.missing_sources and entry.complete
        assert entry.modules == ("decoder", "encoder")
    # A lookup is a use: it moves to the front, its data untouched.
    data_mtime = os.stat(folder / (ka + ".params")).st_mtime_ns
    assert lookup(str(folder), ka) is not None
    assert [e.key for e in entries(folder)] == [ka, kb]
    assert os.stat(folder / (ka + ".params")).st_mtime_ns == data_mtime
    table = format_entries(entries(folder))
    assert ka in table and kb in table and "2 entries" in table

    # Broken and half-written entries are reported, and pruned (data without an index only when old).
    os.unlink(folder / (kb + ".params"))
    (folder / "f00d.params").write_bytes(b"x" * 64)
    old = tmp_path / "params" / "tmpold.tmp"
    old.write_bytes(b"x")
    young = tmp_path / "params" / "tmpyoung.tmp"
    young.write_bytes(b"x")
    an_hour_ago = time.time() - 2 * 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    by_key = {e.key: e for e in entries(folder)}
    assert not by_key[kb].complete and not by_key["f00d"].complete and by_key[ka].complete
    assert prune(folder, None) == [kb]
    assert sorted(os.listdir(folder)) == sorted([f"{ka}.json", f"{ka}.params", "f00d.params", young.name])
    os.utime(folder / "f00d.params", (an_hour_ago, an_hour_ago))
    assert prune(folder, None) == ["f00d"]


def test_clear_all_or_one(tmp_path):
    folder = tmp_path / "params"
    keys = [_prepare(folder, _checkpoint(tmp_path, n, seed=i), None) for i, n in enumerate("abc")]
    (folder / "tmpleft.tmp").write_bytes(b"x")
    assert clear(folder, keys[1]) == [keys[1]]
    assert sorted(e.key for e in entries(folder)) == sorted([keys[0], keys[2]])
    assert clear(folder, keys[2][:8]) == [keys[2]]  # a unique prefix will do
    with pytest.raises(ValueError, match="no params cache entry 'nope'.*cache list") as error:
        clear(folder, "nope")
    assert keys[0] not in str(error.value)
    with pytest.raises(ValueError, match="no params cache entry"):
        clear(folder, keys[1])
    assert clear(folder) == [keys[0]]
    assert os.listdir(folder) == []
    assert clear(folder) == [] and clear(tmp_path / "nowhere") == []


def test_the_limit_setting(monkeypatch):
    monkeypatch.delenv(ENV_MAX_GB, raising=False)
    assert max_bytes_setting() == DEFAULT_MAX_BYTES == 10 * 2**30
    monkeypatch.setenv(ENV_MAX_GB, "  ")
    assert max_bytes_setting() == DEFAULT_MAX_BYTES
    monkeypatch.setenv(ENV_MAX_GB, "2.5")
    assert max_bytes_setting() == int(2.5 * 2**30)
    assert max_bytes_setting(1) == 2**30  # the argument wins
    assert max_bytes_setting(0) == 0
    monkeypatch.setenv(ENV_MAX_GB, "0")
    assert max_bytes_setting() == 0
    for bad in ("-1", "ten", "nan", "inf"):
        monkeypatch.setenv(ENV_MAX_GB, bad)
        with pytest.raises(ValueError, match=ENV_MAX_GB):
            max_bytes_setting()
    for bad in (-0.5, float("nan"), "x", True):
        with pytest.raises(ValueError, match="max_gb"):
            max_bytes_setting(bad)


def test_prepare_reads_the_limit_from_the_environment(tmp_path, monkeypatch):
    folder = tmp_path / "params"
    key, sources, build, _ = _checkpoint(tmp_path, "a")
    monkeypatch.setenv(ENV_MAX_GB, str(1000 / 2**30))  # 1000 bytes: smaller than the entry
    with pytest.warns(UserWarning, match="limit"):
        assert prepare(str(folder), key, sources, build) is None
    monkeypatch.setenv(ENV_MAX_GB, "bad")
    with pytest.raises(ValueError, match=ENV_MAX_GB):
        prepare(str(folder), key, sources, build)
    monkeypatch.delenv(ENV_MAX_GB)
    assert prepare(str(folder), key, sources, build) is not None


def test_too_little_free_disk_space_skips_the_cache_with_one_warning(tmp_path, monkeypatch):
    folder = tmp_path / "params"
    key, sources, build, _ = _checkpoint(tmp_path, "a")

    class Usage:
        total, used, free = 2**40, 2**40, 2**20

    monkeypatch.setattr(prepared.shutil, "disk_usage", lambda path: Usage())
    with pytest.warns(UserWarning, match="less than 1 GiB free") as record:
        assert prepare(str(folder), key, sources, build, max_bytes=None) is None
    assert len(record) == 1
    assert "\n" not in str(record[0].message)
    assert not folder.exists()
    # An existing folder: nothing written into it, nothing evicted.
    monkeypatch.undo()
    kept = _prepare(folder, _checkpoint(tmp_path, "b"), None)
    monkeypatch.setattr(prepared.shutil, "disk_usage", lambda path: Usage())
    with pytest.warns(UserWarning, match="less than 1 GiB free"):
        assert prepare(str(folder), key, sources, build, max_bytes=None) is None
    assert sorted(os.listdir(folder)) == [f"{kept}.json", f"{kept}.params"]
