"""``tokenize`` from and to buckets: WebDataset shards on an S3 server and a GCS emulator started on
127.0.0.1 (``object_stores``), read and written through the real ``s3fs`` / ``gcsfs`` clients.

The shards are test_corpora.py's (MP3/FLAC with JSON and text, a corrupt member, a sample without
audio, a shard cut short); every good item must come out once, with the codes of
``Xcodec2Codec.encode`` of it alone and its JSON ``text`` beside them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from object_stores import gcs_server, s3_server  # noqa: F401
from test_corpora import expected, shards  # noqa: F401
from test_tokenize import REPO, _env, _free_port, run_hosts, sigkill_when

from xcodec2_jax import tokenize
from xcodec2_jax.utils.storage import filesystem

pytestmark = pytest.mark.subprocess


def upload(server, root, prefixes=("EN_B",)) -> tuple[str, object]:
    """The shards in a new bucket of ``server``, once under each shard-name prefix of ``prefixes``
    (EN_B00000.tar is also EN_C00000.tar ...): (bucket name, fsspec filesystem)."""
    bucket = f"corpus-{uuid.uuid4().hex[:8]}"
    server.make_bucket(bucket)
    fs, _ = filesystem(f"{server.scheme}://{bucket}", server.storage_options)
    for prefix in prefixes:
        for name in sorted(os.listdir(root)):
            fs.put_file(str(root / name), f"{bucket}/shards/{name.replace('EN_B', prefix)}")
    return bucket, fs


def copies(table: dict, prefixes) -> dict:
    """``table`` (by item id) for the shards uploaded under each of ``prefixes``."""
    return {p + key[len("EN_B") :]: value for p in prefixes for key, value in table.items()}


def read_bucket_output(fs, out: str) -> tuple[dict, dict, dict]:
    """({id: codes}, {id: text}, {id: error}) of a finished job at ``out`` (a bucket path)."""
    import pyarrow.parquet as pq

    fs.invalidate_cache()
    codes, texts = {}, {}
    for path in sorted(fs.glob(f"{out}/data/train-*.parquet")):
        with fs.open(path, "rb") as f:
            for row in pq.read_table(f).to_pylist():
                assert row["id"] not in codes, f"{row['id']} written twice"
                codes[row["id"]] = np.asarray(row["codes"], np.int32)
                texts[row["id"]] = row["text"]
    errors = {e["id"]: e["error"] for e in map(json.loads, fs.cat_file(f"{out}/errors.jsonl").splitlines())}
    return codes, texts, errors


def assert_job(fs, out, shards, expected, prefixes=("EN_B",)) -> None:  # noqa: F811
    codes, texts, errors = read_bucket_output(fs, out)
    good, bad, expected = (copies(t, prefixes) for t in (shards[1], shards[2], expected))
    assert sorted(codes) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(codes[key], expected[key], err_msg=key)
        assert texts[key] == good[key][1]["text"]
    assert sorted(errors) == sorted(bad)
    for key, reason in bad.items():
        assert reason in errors[key], errors[key]


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_bucket_on_four_devices_killed_after_a_shard_and_rerun(small_ref, shards, expected, scheme, request):  # noqa: F811
    """Configured the standard way (S3: AWS_* variables with AWS_ENDPOINT_URL; GCS: the emulator's
    STORAGE_EMULATOR_HOST), SIGKILLed once shard 0 is committed: the rerun finishes the job, every
    good item once."""
    server = request.getfixturevalue({"s3": "s3_server", "gs": "gcs_server"}[scheme])
    # Six shards (the three, twice), so that the job is still running when the first is committed.
    prefixes = ("EN_B", "EN_C")
    bucket, fs = upload(server, shards[0], prefixes)
    out = f"{bucket}/tokens"
    argv = [
        "tokenize",
        f"{scheme}://{bucket}/shards/*.tar*",
        "-o",
        f"{scheme}://{out}",
        "--model",
        small_ref.path,
    ]
    argv += ["--batch-size", "1", "--shard-size", "1"]
    env = {**_env(4), **server.env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xcodec2_jax", *argv], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    marker = f"{out}/.errors/train-00000-of-00006.jsonl"
    sigkill_when(proc, lambda: fs.invalidate_cache() or fs.exists(marker))
    fs.invalidate_cache()
    assert not fs.exists(f"{out}/manifest.json")
    done = len(fs.glob(f"{out}/.errors/*.jsonl"))
    assert 1 <= done < 6

    command = [sys.executable, "-m", "xcodec2_jax", *argv]
    rerun = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 2, rerun.stderr[-3000:]
    assert "6 failed items" in rerun.stderr
    assert_job(fs, out, shards, expected, prefixes)
    manifest = json.loads(fs.cat_file(f"{out}/manifest.json"))
    assert manifest["num_devices"] == 4 and manifest["complete_shards"] == 6 and manifest["num_items"] == 8


def test_gcs_with_explicit_storage_options(small_ref, shards, expected, gcs_server):  # noqa: F811
    bucket, fs = upload(gcs_server, shards[0])
    out = f"{bucket}/tokens"

    def job(shard_size: int) -> dict:
        return tokenize(
            f"gs://{bucket}/shards/",
            f"gs://{out}",
            model=small_ref.path,
            batch_size=1,
            shard_size=shard_size,
            storage_options=gcs_server.storage_options,
            progress=False,
        )

    result = job(3)
    assert result["num_items"] == 4 and result["num_errors"] == 3
    assert_job(fs, out, shards, expected)
    # The same job again does nothing; another shard size on the same output is refused.
    assert job(3)["run"]["items"] == 0
    with pytest.raises(ValueError, match="shard_size"):
        job(2)


@pytest.mark.slow
def test_two_processes_write_one_bucket(small_ref, shards, expected, s3_server):  # noqa: F811
    bucket, fs = upload(s3_server, shards[0])
    out = f"{bucket}/tokens"
    argv = ["tokenize", f"s3://{bucket}/shards", "-o", f"s3://{out}", "--model", small_ref.path]
    procs, outputs = run_hosts(argv + ["--batch-size", "1", "--shard-size", "2"], {**_env(), **s3_server.env})
    assert [p.returncode for p in procs] == [2, 2], [o[1][-2000:] for o in outputs]
    assert_job(fs, out, shards, expected)
    manifest = json.loads(fs.cat_file(f"{out}/manifest.json"))
    assert manifest["num_processes"] == 2 and manifest["num_shards"] == 3  # one per tar shard


def test_an_unreachable_endpoint_is_a_clear_error_in_bounded_time(tmp_path, capsys):
    from xcodec2_jax.cli import main

    # Nothing listens there; the client's own retries and timeouts apply (about 10 s here).
    options = {"endpoint_url": f"http://127.0.0.1:{_free_port()}", "key": "k", "secret": "s"}
    start = time.monotonic()
    argv = ["tokenize", "s3://nowhere/shards/*.tar", "-o", str(tmp_path / "o")]
    assert main(argv + ["--storage-options", json.dumps(options)]) == 2
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "s3://nowhere/shards/*.tar" in err and "connect" in err, err
    assert not os.path.exists(tmp_path / "o")
