"""Corpora as people keep them: WebDataset tar shards of MP3/FLAC with JSON and text members, and
sources carrying metadata columns into the output.

Shards are built here with ``tarfile``: good samples in MP3 and FLAC, a corrupt audio member, a
sample with no audio, a shard cut short in the middle of a member, and a gzip-compressed shard. Good
items last 2.2-2.6 s (one length bucket), so the programs compiled by test_tokenize.py serve here.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import soundfile as sf
from conftest import load_speech
from test_tokenize import read_output

from xcodec2_jax import Xcodec2Codec, tokenize
from xcodec2_jax.cli import main
from xcodec2_jax.corpus.sources import TarShard, list_items, read_item
from xcodec2_jax.utils.storage import Location


def audio_bytes(audio: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, 16000, format=fmt)
    return buffer.getvalue()


def write_shard(path, members: list[tuple[str, bytes]], cut: int | None = None) -> None:
    """A tar of ``members`` in order (gzip-compressed for .tar.gz); ``cut``: keep only that many bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if str(path).endswith(".gz") else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    with open(path, "wb") as f:
        f.write(data if cut is None else data[:cut])


def as_json(fields: dict) -> bytes:
    return json.dumps(fields).encode()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards and what each item should give: {id: (audio bytes, fields)} and {id: error}."""
    root = tmp_path_factory.mktemp("shards")
    speech = np.concatenate(load_speech())
    clips = [speech[s : s + n] for s, n in ((0, 38000), (45000, 36500), (90000, 40000), (130000, 35500))]
    good = {
        "EN_B00000/EN_B00000_S00000_W000000": (audio_bytes(clips[0], "MP3"), {"text": "one", "speaker": "a"}),
        "EN_B00000/EN_B00000_S00000_W000001": (
            audio_bytes(clips[1], "FLAC"),
            {"text": "two", "speaker": "b"},
        ),
        "EN_B00001/EN_B00001_S00000_W000000": (
            audio_bytes(clips[2], "FLAC"),
            {"text": "three", "speaker": "a"},
        ),
        "EN_B00002/EN_B00002_S00000_W000000": (
            audio_bytes(clips[3], "MP3"),
            {"text": "four", "speaker": "c"},
        ),
    }
    errors = {
        "EN_B00000/EN_B00000_S00000_W000002": "cannot read audio",
        "EN_B00000/EN_B00000_S00000_W000003": "no audio member",
        "EN_B00002/EN_B00002_S00000_W000001": "cut short",
    }

    def members(key: str) -> list[tuple[str, bytes]]:
        data, fields = good[key]
        name = key.split("/")[1]
        ext = "flac" if data.startswith(b"fLaC") else "mp3"
        # A nested field and a text member besides the JSON.
        json_fields = {**fields, "dnsmos": 3.5, "tags": {"lang": "en"}}
        return [(f"{name}.{ext}", data), (f"{name}.json", as_json(json_fields)), (f"{name}.txt", b"raw text")]

    write_shard(
        root / "EN_B00000.tar",
        members("EN_B00000/EN_B00000_S00000_W000000")
        + members("EN_B00000/EN_B00000_S00000_W000001")
        + [("EN_B00000_S00000_W000002.mp3", b"\xff\xfbnot really an mp3" * 50)]
        + [("EN_B00000_S00000_W000002.json", as_json({"text": "bad", "speaker": "x"}))]
        + [("EN_B00000_S00000_W000003.json", as_json({"text": "no audio", "speaker": "x"}))],
    )
    write_shard(root / "EN_B00001.tar.gz", members("EN_B00001/EN_B00001_S00000_W000000"))
    last = members("EN_B00002/EN_B00002_S00000_W000000")
    cut_audio = audio_bytes(clips[0], "FLAC")
    whole = len(b"".join(d for _, d in last)) + 512 * (len(last) + 1)
    write_shard(
        root / "EN_B00002.tar",
        last + [("EN_B00002_S00000_W000001.flac", cut_audio)],
        cut=whole + 512 + len(cut_audio) // 2,  # past the last header, halfway through its data
    )
    return root, good, errors


@pytest.fixture(scope="module")
def expected(small_ref, shards):
    """Each good item's codes from Xcodec2Codec.encode of its decoded member alone."""
    codec = Xcodec2Codec.from_pretrained(small_ref.path, batch_size=1)
    out = {}
    for key, (data, _) in shards[1].items():
        audio, rate = sf.read(io.BytesIO(data), dtype="float32")
        out[key] = codec.encode(audio, rate)[0]
    return out


def test_tar_samples_are_listed_with_their_metadata(shards):
    root, good, errors = shards
    items = {it.id: it for it in list_items(root)}
    assert sorted(items) == sorted([*good, *errors])
    first = items["EN_B00000/EN_B00000_S00000_W000000"]
    assert first.meta == {
        "text": "one",
        "speaker": "a",
        "dnsmos": 3.5,
        "tags": {"lang": "en"},
        "txt": "raw text",
    }
    # A member is read by its byte range, the gzip-compressed shard through its stream.
    for key, (data, _) in good.items():
        audio, _ = sf.read(io.BytesIO(data), dtype="float32")
        np.testing.assert_array_equal(read_item(items[key]), audio, err_msg=key)
    for key, reason in errors.items():
        with pytest.raises(ValueError, match=reason):
            read_item(items[key])
    # What tokenize streams is what training lists, bytes included.
    streamed = [
        it for name in sorted(os.listdir(root)) for it in TarShard(Location(str(root / name))).items()
    ]
    assert [it.id for it in streamed] == list(items)
    for it in streamed:
        assert it.meta == items[it.id].meta and it.member == items[it.id].member
        if it.id in good:
            assert it.data == good[it.id][0]
        else:
            with pytest.raises(ValueError, match=errors[it.id]):
                read_item(it)

    bad = root.parent / "not_a_tar"
    bad.mkdir(exist_ok=True)
    (bad / "x.tar").write_bytes(b"\x00\x01" * 700)
    with pytest.raises(ValueError, match="not a readable tar"):
        list_items(bad / "x.tar")
    [alone] = TarShard(Location(str(bad / "x.tar"))).items()
    assert alone.id == "x/" and "not a readable tar" in alone.problem
    write_shard(bad / "again.tar", [("k.flac", b"a"), ("j.flac", b"b"), ("k.json", b"{}")])
    with pytest.raises(ValueError, match="key 'k' appears again"):
        read_item(list(TarShard(Location(str(bad / "again.tar"))).items())[-1])


def test_tars_tokenize_with_text_beside_codes(small_ref, shards, expected, tmp_path, capsys):
    root, good, errors = shards
    out = tmp_path / "out"
    argv = ["tokenize", str(root / "EN_B0000*.tar*"), "-o", str(out), "--model", small_ref.path]
    assert main(argv + ["--batch-size", "1", "--shard-size", "2"]) == 2
    assert "3 failed items" in capsys.readouterr().err
    codes = read_output(out)
    assert sorted(codes) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(codes[key], expected[key], err_msg=key)
    with open(out / "errors.jsonl") as f:
        got_errors = {e["id"]: e["error"] for e in map(json.loads, f)}
    assert sorted(got_errors) == sorted(errors)
    for key, reason in errors.items():
        assert reason in got_errors[key], got_errors[key]

    import datasets

    ds = datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "hf"))["train"]
    assert ds.features["text"].dtype == "string" and ds.features["dnsmos"].dtype == "float64"
    for row in ds:
        assert row["text"] == good[row["id"]][1]["text"] and row["txt"] == "raw text"
        assert json.loads(row["tags"]) == {"lang": "en"}
        np.testing.assert_array_equal(row["codes"], expected[row["id"]])


def test_parquet_and_manifest_columns_are_carried_typed(small_ref, shards, expected, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, good, _ = shards
    keys = sorted(good)[:2]
    table = pa.table(
        {
            "audio": [{"bytes": good[k][0], "path": None} for k in keys],
            "id": keys,
            "text": [good[k][1]["text"] for k in keys],
            "speaker_id": pa.array([7, 8], pa.int64()),
            "score": [0.5, None],
            "words": [["a", "b"], []],
        }
    )
    src = tmp_path / "src.parquet"
    pq.write_table(table, src)
    out = tmp_path / "out"
    tokenize(src, out, model=small_ref.path, batch_size=1, progress=False)
    got = pq.read_table(out / "data" / "train-00000-of-00001.parquet")
    assert (
        got.schema.field("speaker_id").type == pa.int64() and got.schema.field("score").type == pa.float64()
    )
    assert got.column("words").to_pylist() == ['["a", "b"]', "[]"]
    assert got.column("score").to_pylist() == [0.5, None]
    assert got.column("text").to_pylist() == [good[k][1]["text"] for k in keys]
    assert json.loads((out / "job.json").read_text())["columns"]["speaker_id"] == "int64"

    # --columns chooses; a changed choice on the same output is another job; unknown names are refused.
    with pytest.raises(ValueError, match="different job.*columns"):
        tokenize(src, out, model=small_ref.path, batch_size=1, columns=["text"], progress=False)
    with pytest.raises(ValueError, match="no item has a field 'lang'"):
        tokenize(src, tmp_path / "o2", model=small_ref.path, columns=["lang"], progress=False)
    with pytest.raises(ValueError, match="writes itself"):
        tokenize(src, tmp_path / "o3", model=small_ref.path, columns=["codes"], progress=False)

    # A manifest's other fields are carried too.
    manifest = tmp_path / "list.jsonl"
    flac_key = next(k for k in good if good[k][0].startswith(b"fLaC"))
    (tmp_path / "a.flac").write_bytes(good[flac_key][0])
    manifest.write_text(json.dumps({"path": "a.flac", "id": "a", "text": "hello", "n": 3}) + "\n")
    tokenize(manifest, tmp_path / "o4", model=small_ref.path, batch_size=1, columns=["text"], progress=False)
    row = pq.read_table(tmp_path / "o4" / "data" / "train-00000-of-00001.parquet").to_pylist()[0]
    assert row["text"] == "hello" and "n" not in row
    np.testing.assert_array_equal(row["codes"], expected[flac_key])


def test_any_fsspec_url_is_a_source_and_an_output(small_ref, shards, expected):
    """memory:// (fsspec's in-process store) as both ends: the same code path as a bucket's."""
    import fsspec
    import pyarrow.parquet as pq

    root, good, _ = shards
    fs = fsspec.filesystem("memory")
    fs.put_file(str(root / "EN_B00001.tar.gz"), "/corpus/EN_B00001.tar.gz")
    result = tokenize("memory://corpus/*.tar.gz", "memory://tokens", model=small_ref.path, progress=False)
    assert result["num_items"] == 1 and result["num_errors"] == 0
    with fs.open("/tokens/data/train-00000-of-00001.parquet", "rb") as f:
        [row] = pq.read_table(f).to_pylist()
    key = "EN_B00001/EN_B00001_S00000_W000000"
    assert row["id"] == key and row["text"] == good[key][1]["text"]
    np.testing.assert_array_equal(row["codes"], expected[key])
    assert json.loads(fs.cat_file("/tokens/manifest.json"))["complete_shards"] == 1


def test_a_url_whose_filesystem_is_missing_is_one_line(tmp_path, capsys):
    # Azure's adlfs is not a dependency of ours: fsspec knows the scheme but cannot load it.
    assert main(["tokenize", "abfs://container/shards/*.tar", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "xcodec2_jax[cloud]"' in err and "abfs://" in err
    assert not os.path.exists(tmp_path / "o")


def test_gzip_shards_read_by_range_keep_few_streams_open(tmp_path):
    """Training reads .tar.gz members by offset through forward streams; only the few used last stay
    open, and a shard whose stream was closed is read again from its start."""
    from xcodec2_jax.corpus import tars

    shards = []
    for i in range(tars._GzipStreams.MAX_STREAMS + 2):
        write_shard(tmp_path / f"s{i}.tar.gz", [(f"k{i}.flac", bytes([i]) * 3000)])
        shards.append(Location(str(tmp_path / f"s{i}.tar.gz")))
    for _ in range(2):
        for i, where in enumerate(shards):
            [sample] = tars.samples(where)
            assert tars.member_bytes(where, *sample.audio) == bytes([i]) * 3000
            assert len(tars._GZIP_STREAMS.streams) <= tars._GzipStreams.MAX_STREAMS
