"""``xcodec2-jax tokenize``: every item's codes equal ``Xcodec2Codec.encode`` of it alone, on 4 devices,
2 processes, after a SIGKILL and for every kind of source; bad items in errors.jsonl and exit code 2.

Good items all last 2.2-2.6 s (one length bucket, 128 codes) and most runs use batches of one, so
the whole module compiles two programs: (1, 128) on one device, (4, 128) sharded over four; the
compilation cache of the test session is shared with the child processes.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import load_speech, run_python

from xcodec2_jax import Xcodec2Codec, tokenize
from xcodec2_jax.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOOD = ["a.wav", "d.wav", "sub/b.wav", "sub/c.flac"]
BAD = {"bad/corrupt.wav": "cannot read audio", "bad/nan.wav": "NaN", "bad/empty.wav": "empty"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tree: 16 kHz mono float, 44.1 kHz stereo int16, FLAC, and a corrupt, a NaN and an empty file."""
    src = tmp_path_factory.mktemp("corpus")
    (src / "sub").mkdir()
    (src / "bad").mkdir()
    speech = np.concatenate(load_speech())
    sf.write(src / "a.wav", speech[:40000], 16000, subtype="FLOAT")
    sf.write(src / "d.wav", speech[45000:81500], 16000, subtype="PCM_16")
    stereo = soxr.resample(speech[90000:128400], 16000, 44100)
    sf.write(src / "sub" / "b.wav", np.stack([stereo, 0.6 * stereo], 1), 44100, subtype="PCM_16")
    sf.write(src / "sub" / "c.flac", speech[125000:162000], 16000)
    (src / "bad" / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    sf.write(src / "bad" / "nan.wav", np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    sf.write(src / "bad" / "empty.wav", np.zeros(0, np.float32), 16000)
    return src


@pytest.fixture(scope="module")
def expected(small_ref, corpus):
    """Each good item encoded alone by the codec, from its file in its own dtype and sample rate."""
    codec = Xcodec2Codec.from_pretrained(small_ref.path, batch_size=1)
    out = {}
    for rel in GOOD:
        audio, rate = sf.read(corpus / rel, dtype="int16" if rel.endswith("b.wav") else "float32")
        out[rel] = codec.encode(audio, rate)[0]
        assert len(out[rel]) > 100 and len(np.unique(out[rel])) > 10  # codes that can disagree
    return out


def read_output(out) -> dict[str, np.ndarray]:
    """id -> codes over all shards, each id once, rows consistent."""
    import pyarrow.parquet as pq

    rows = {}
    for path in sorted(glob.glob(os.path.join(out, "data", "train-*.parquet"))):
        table = pq.read_table(path).to_pylist()
        for row in table:
            assert row["id"] not in rows, f"{row['id']} written twice"
            assert row["num_codes"] == len(row["codes"])
            assert row["duration"] == pytest.approx(row["num_samples"] / 16000)
            rows[row["id"]] = np.asarray(row["codes"], np.int32)
    return rows


def assert_codes(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def read_errors(out) -> dict[str, str]:
    with open(os.path.join(out, "errors.jsonl")) as f:
        return {e["id"]: e["error"] for e in map(json.loads, f)}


def _env(devices: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


@pytest.mark.subprocess
@pytest.mark.slow
def test_tree_on_four_devices(small_ref, corpus, expected, tmp_path):
    out = tmp_path / "out"
    code = (
        "import json, sys, jax\n"
        "from xcodec2_jax.cli import main\n"
        "rc = main(['tokenize', sys.argv[1], '-o', sys.argv[2], '--model', sys.argv[3],"
        " '--batch-size', '3', '--shard-size', '4'])\n"
        "print('RESULT' + json.dumps({'rc': rc, 'devices': jax.local_device_count()}))\n"
    )
    result = run_python(code, [str(corpus), str(out), small_ref.path], _env(4), "RESULT", timeout=240)
    assert result == {"rc": 2, "devices": 4}
    assert_codes(read_output(out), expected)
    errors = read_errors(out)
    assert sorted(errors) == sorted(BAD)
    for key, reason in BAD.items():
        assert reason in errors[key]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_devices"] == 4 and manifest["num_processes"] == 1
    assert manifest["num_items"] == 4 and manifest["num_errors"] == 3
    assert manifest["model"] == os.path.abspath(small_ref.path)
    assert manifest["audio_seconds"] == pytest.approx(sum(len(v) for v in expected.values()) / 50, rel=0.05)

    import datasets

    ds = datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "hf"))["train"]
    assert sorted(ds["id"]) == sorted(GOOD)
    row = ds[ds["id"].index("sub/b.wav")]
    np.testing.assert_array_equal(row["codes"], expected["sub/b.wav"])


def test_batches_shards_resume_and_refusal(small_ref, corpus, expected, tmp_path, capsys):
    out = tmp_path / "out"
    # Batch size 1 reuses the program of `expected` (batches of several items: the 4-device test).
    result = tokenize(corpus, out, model=small_ref.path, batch_size=1, shard_size=3, progress=False)
    assert_codes(read_output(out), expected)
    assert result["num_items"] == 4 and result["num_errors"] == 3 and result["num_shards"] == 3
    assert result["run"]["shapes"] == [(1, 128)] and result["run"]["items"] == 4
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(str(out / "data" / "*"))}

    # A rerun of a finished job does nothing, and still exits 2 for the failures recorded before.
    argv = ["tokenize", str(corpus), "-o", str(out), "--model", small_ref.path, "--shard-size", "3"]
    assert main(argv + ["--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "3 failed items" in err and "Traceback" not in err
    assert {p: os.path.getmtime(p) for p in glob.glob(str(out / "data" / "*"))} == mtimes

    # Another model, config, precision or shard size in the same folder is refused, naming the change.
    other = tmp_path / "other-model"
    shutil.copytree(small_ref.path, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="different job.*config.*model"):
        tokenize(corpus, out, model=str(other), shard_size=3, progress=False)
    with pytest.raises(ValueError, match="precision"):
        tokenize(corpus, out, model=small_ref.path, shard_size=3, precision="default", progress=False)
    assert main(argv[:-1] + ["5"]) == 2
    assert "shard_size" in capsys.readouterr().err
    assert_codes(read_output(out), expected)


def _wait_for(predicate, timeout: float, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def sigkill_when(proc: subprocess.Popen, predicate, timeout: float = 240) -> None:
    """SIGKILL ``proc`` once ``predicate()`` holds (polled; the child must not exit first)."""
    try:
        _wait_for(predicate, timeout, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.subprocess
def test_sigkill_after_first_shard_then_rerun(small_ref, corpus, expected, tmp_path):
    """The second item is a FIFO nobody writes: the child writes shard 0, then blocks, and is killed."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(corpus / "a.wav", src / "a.wav")
    shutil.copy(corpus / "sub" / "c.flac", src / "c.flac")
    os.mkfifo(src / "slow.wav")
    (src / "list.txt").write_text("a.wav\nslow.wav\nc.flac\n")
    out = tmp_path / "out"
    argv = ["tokenize", str(src / "list.txt"), "-o", str(out), "--model", small_ref.path]
    argv += ["--batch-size", "1", "--shard-size", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "xcodec2_jax", *argv], env=_env(), cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    sigkill_when(proc, lambda: (out / ".errors" / "train-00000-of-00003.jsonl").exists())
    assert sorted(read_output(out)) == ["a.wav"]
    assert not (out / "manifest.json").exists()

    # The FIFO becomes a real file; a half-written shard 1 (Parquet renamed, not marked complete) is redone.
    os.unlink(src / "slow.wav")
    shutil.copy(corpus / "d.wav", src / "slow.wav")
    shutil.copy(out / "data" / "train-00000-of-00003.parquet", out / "data" / "train-00001-of-00003.parquet")
    assert main(argv) == 0
    want = {"a.wav": expected["a.wav"], "slow.wav": expected["d.wav"], "c.flac": expected["sub/c.flac"]}
    assert_codes(read_output(out), want)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_items"] == 3 and manifest["num_errors"] == 0 and manifest["complete_shards"] == 3
    assert not [p for p in os.listdir(out / "data") if p.endswith(".tmp")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_hosts(argv: list[str], env: dict, hosts: int = 2) -> tuple[list, list]:
    """``xcodec2-jax *argv`` as ``hosts`` jax.distributed processes on 127.0.0.1, to the end (bounded):
    (the processes, their (stdout, stderr))."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    try:
        for i in range(hosts):
            extra = ["--coordinator-address", address, "--num-processes", str(hosts), "--process-id", str(i)]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "xcodec2_jax", *argv, *extra],
                    env=env,
                    cwd=REPO,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        return procs, [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_processes_share_the_items(small_ref, corpus, expected, tmp_path):
    out = tmp_path / "out"
    argv = ["tokenize", str(corpus), "-o", str(out), "--model", small_ref.path, "--batch-size", "1"]
    procs, outputs = run_hosts(argv + ["--shard-size", "1"], _env())
    assert [p.returncode for p in procs] == [2, 2], [o[1][-2000:] for o in outputs]
    assert_codes(read_output(out), expected)
    assert sorted(read_errors(out)) == sorted(BAD)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_processes"] == 2 and manifest["num_devices"] == 2 and manifest["num_shards"] == 7
    # Process 0 did its share (shards 0, 2, 4, 6), not all of it.
    mine = int(re.search(r"this run: (\d+) items", outputs[0][1]).group(1))
    assert 0 < mine < 4


def test_parquet_and_manifest_sources(small_ref, corpus, expected, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_dir = tmp_path / "pq" / "data"
    pq_dir.mkdir(parents=True)

    def write(path, columns: dict):
        """As datasets writes an Audio column: struct<bytes, path>, features in the schema metadata."""
        features = {
            "audio": {"_type": "Audio"},
            **({"id": {"dtype": "string", "_type": "Value"}} if "id" in columns else {}),
        }
        audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        table = pa.table(
            {k: pa.array(v, audio_type if k == "audio" else pa.string()) for k, v in columns.items()}
        )
        meta = {"huggingface": json.dumps({"info": {"features": features}})}
        pq.write_table(table.replace_schema_metadata(meta), path, row_group_size=2)

    def cell(rel):
        return {"bytes": (corpus / rel).read_bytes(), "path": os.path.basename(rel)}

    write(pq_dir / "train-0.parquet", {"id": ["utt-a", "utt-b"], "audio": [cell("a.wav"), cell("sub/b.wav")]})
    # No id column: ids from audio.path; a cell with only a path is read from that file.
    cells = [cell("sub/c.flac"), cell("bad/corrupt.wav"), {"bytes": None, "path": str(corpus / "d.wav")}]
    write(pq_dir / "train-1.parquet", {"audio": cells})

    out = tmp_path / "out-pq"
    result = tokenize(tmp_path / "pq", out, model=small_ref.path, batch_size=1, progress=False)
    want = {"utt-a": expected["a.wav"], "utt-b": expected["sub/b.wav"], "c.flac": expected["sub/c.flac"]}
    want[str(corpus / "d.wav")] = expected["d.wav"]
    assert_codes(read_output(out), want)
    assert list(read_errors(out)) == ["corrupt.wav"] and result["num_errors"] == 1

    manifest = tmp_path / "list.jsonl"
    lines = [{"path": str(corpus / "a.wav"), "id": "first"}, {"path": str(corpus / "sub/b.wav")}]
    lines.append({"path": str(corpus / "missing.wav"), "id": "gone"})
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out-jsonl"
    tokenize(manifest, out, model=small_ref.path, batch_size=1, progress=False)
    assert_codes(
        read_output(out), {"first": expected["a.wav"], str(corpus / "sub/b.wav"): expected["sub/b.wav"]}
    )
    assert list(read_errors(out)) == ["gone"]

    with pytest.raises(ValueError, match="no such file"):
        tokenize(tmp_path / "nowhere", tmp_path / "x", model=small_ref.path, progress=False)
    (tmp_path / "dup.txt").write_text(f"{corpus / 'a.wav'}\n{corpus / 'a.wav'}\n")
    with pytest.raises(ValueError, match="given twice"):
        tokenize(tmp_path / "dup.txt", tmp_path / "x", model=small_ref.path, progress=False)


@pytest.mark.slow
def test_long_items_in_windows_equal_the_codec(small_ref, corpus, tmp_path):
    """An item past max_window_seconds is encoded in windows that batch with other items, giving
    exactly the codec's windowed encode of it; the window settings are part of the job."""
    codec = Xcodec2Codec.from_pretrained(small_ref.path, batch_size=4)
    long = np.concatenate(load_speech())[:88000]  # 5.5 s: three 2 s windows with 0.5 s of context
    sf.write(corpus.parent / "long.wav", long, 16000, subtype="FLOAT")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(corpus.parent / "long.wav", src / "long.wav")
    shutil.copy(corpus / "a.wav", src / "a.wav")
    windows = {"max_window_seconds": 2.0, "context_seconds": 0.5}
    out = tmp_path / "out"
    result = tokenize([src], out, model=small_ref.path, batch_size=4, progress=False, **windows)
    assert result["num_items"] == 2 and result["num_errors"] == 0
    rows = read_output(out)
    for name in ("long", "a"):
        audio, _ = sf.read(src / f"{name}.wav", dtype="float32")
        np.testing.assert_array_equal(rows[f"{name}.wav"], codec.encode(audio, 16000, **windows)[0])
    assert len(rows["long.wav"]) == -(-(len(long) + 1) // 320)
    # Windowed codes differ from a one-piece encode: the setting matters, so it is part of the job.
    assert not np.array_equal(rows["long.wav"], codec.encode(long, 16000, max_window_seconds=None)[0])
    with pytest.raises(ValueError, match="max_window_seconds"):
        tokenize([src], out, model=small_ref.path, batch_size=4, progress=False, max_window_seconds=3.0)
