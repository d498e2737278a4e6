"""The benchmark script end to end on a tiny model: rows written with their fields, report regenerated.

No timing assertions: speed belongs in benchmarks/README.md, not in a test.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks import bench_codec, report  # noqa: E402

FIELDS = {
    "device",
    "versions",
    "dtype",
    "config",
    "duration_s",
    "batch",
    "stage",
    "impl",
    "compile_s",
    "first_run_s",
    "median_s",
    "rtf",
    "gflops",
    "gflop_per_s",
    "peak_mem_mb",
    "reps",
    "loadavg_start",
    "loadavg_end",
    "probe_matmul_gflop_per_s",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.jsonl"
    argv = "--config tiny --durations 1 --batch 1 --reps 1 --quiet --out".split() + [str(out)]
    assert bench_codec.main(argv) == 0
    return out


def test_rows_have_fields_and_positive_times(results):
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    got = {(r["stage"], r["impl"]) for r in rows}
    expected = {
        ("encode", "jax"),
        ("encode", "torch"),
        ("decode", "jax"),
        ("decode", "torch"),
        ("features", "jax"),
        ("features", "numpy"),
        ("features", "hf-numpy"),
    }
    assert got == expected
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["config"] == "tiny" and r["dtype"] == "float32" and r["duration_s"] == 1 and r["batch"] == 1
        assert r["reps"] == 1 and r["median_s"] > 0 and r["first_run_s"] > 0 and r["rtf"] > 0
        assert r["peak_mem_mb"] > 0 and r["probe_matmul_gflop_per_s"] > 0
        assert {"jax", "jaxlib", "flax", "torch", "transformers"} <= set(r["versions"])
        assert r["device"]["jax_platform"] and r["device"]["cpu_model"]
        if r["impl"] == "jax":
            assert r["compile_s"] > 0 and r["gflops"] > 0 and r["gflop_per_s"] > 0
        if r["impl"] == "torch":
            assert r["compile_s"] is None and r["gflops"] > 0
    encode = {r["impl"]: r for r in rows if r["stage"] == "encode"}
    assert encode["jax"]["codes_agreement"] == 1.0
    assert encode["jax"]["distinct_codes"] > 1


def test_report_generates_results_md(results, tmp_path):
    """report.py turns every results*.jsonl of a folder into RESULTS.md (one row per run), the same
    bytes each time, with the plot beside it."""
    out = tmp_path / "RESULTS.md"
    args = ["--results-dir", str(results.parent), "--out", str(out)]
    assert report.main(args) == 0
    text = out.read_text()
    assert "| tiny | float32 | 1 s × 1 | encode |" in text
    assert "hf-numpy" in text and "codes 100.00%" in text and "matmul GFLOP/s during" in text
    assert (tmp_path / "results.png").stat().st_size > 0
    assert report.main(args) == 0 and out.read_text() == text


def test_torch_memory_tracker_counts_what_ops_create():
    """Fails loudly if torch's private dispatch-mode API, which the tracker wraps, changes."""
    import torch

    from benchmarks import measure

    weights = torch.ones(1000)
    tracker = measure.tensor_memory_tracker_cls()([weights])
    with tracker:
        doubled = weights * 2  # 4,000 bytes created by an op
        summed = (doubled + 1).sum()
    assert tracker.peak >= 8000 and tracker.peak < 8100, tracker.peak
    assert tracker.used_external_bytes == 4000
    del doubled, summed


def test_time_interleaved_alternates_and_stops():
    from benchmarks import measure

    order = []
    a = {"call": lambda: order.append("a")}
    b = {"call": lambda: order.append("b")}
    c = {"call": lambda: order.append("c")}
    measure.time_interleaved([a, b, c], reps=4)
    # Every round runs each implementation once, the first one rotating: abc, bca, cab, abc.
    assert order == list("abcbcacababc")
    for m in (a, b, c):
        assert "call" not in m and m["reps"] == 4 and len(m["times_s"]) == 4
        assert m["min_s"] <= m["median_s"] and m["min_s"] >= 0

    # The rounds stop once the slowest call's timed runs pass max_rep_seconds (one round at least).
    slow = {"call": lambda: __import__("time").sleep(0.02)}
    fast = {"call": lambda: None}
    measure.time_interleaved([fast, slow], reps=50, max_rep_seconds=0.05)
    assert fast["reps"] == slow["reps"] and 2 <= slow["reps"] <= 3


def test_bench_cli_rows_and_codes(tmp_path):
    """bench_cli on the tiny model, one round: fresh-process CLI (cold and warm compilation cache) and
    the torch script, then the in-process codec vs the reference; every run's codes equal torch's."""
    from benchmarks import bench_cli

    out = tmp_path / "cli.jsonl"
    argv = "--config tiny --duration 2 --rounds 1 --reps 1 --no-warmup --codec-cache warm --quiet --out"
    assert bench_cli.main(argv.split() + [str(out)]) == 0
    rows = {(r["stage"], r["impl"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {
        ("cli_encode_cold", "jax"),
        ("cli_encode_cold", "torch"),
        ("cli_encode_warm", "jax"),
        ("cli_encode_warm", "torch"),
        ("cli_encode", "extractor-import"),
        ("codec_encode", "jax"),
        ("codec_encode", "torch"),
    }
    for r in rows.values():
        assert {"device", "versions", "config", "duration_s", "median_s", "times_s", "reps", "rtf"} <= set(r)
        assert r["config"] == "tiny" and r["reps"] == 1 and r["median_s"] > 0
    for stage in ("cli_encode_cold", "cli_encode_warm"):
        ours, ref = rows[stage, "jax"], rows[stage, "torch"]
        assert ours["max_rss_mb"] > 0 and ref["max_rss_mb"] > 0
        assert ours["time_ratio_vs_torch"] == ours["median_s"] / ref["median_s"]
        assert ours["rss_ratio_vs_torch"] == ours["max_rss_mb"] / ref["max_rss_mb"]
        assert ours["cpu_ratio_vs_torch"] == ours["cpu_s"] / ref["cpu_s"] > 0
        assert ours["codes_agreement"] == 1.0 and ours["num_codes"] == 101 and ours["distinct_codes"] > 1
        assert ours["cache_files"] > 0
    # The warm run's RSS is its own (not the benchmark process's, which holds torch and JAX).
    assert rows["cli_encode", "extractor-import"]["max_rss_mb"] < rows["cli_encode_warm", "jax"]["max_rss_mb"]
    codec = rows["codec_encode", "jax"]
    assert codec["codes_agreement"] == 1.0 and codec["load_s"] > 0 and codec["first_run_s"] > 0
    assert codec["speedup_vs_torch"] > 0 and codec["compilation_cache_dir"]
    assert rows["codec_encode", "torch"]["load_s"] > 0


def test_bench_load_measures_each_format_in_a_fresh_process(small_ref, tmp_path):
    from benchmarks import bench_load
    from xcodec2_jax.checkpoint import save_orbax

    save_orbax(tmp_path / "orbax", small_ref.params, small_ref.config)
    for path in (small_ref.path, str(tmp_path / "orbax")):
        row = bench_load.measure(path)
        assert row["seconds"] > 0 and row["cpu_seconds"] > 0, row
        # The model is traced once for the strict check, whatever the format, and timed within.
        assert 0 < row["trace_s"] < row["seconds"], row
        assert row["leaf_type"] == "ArrayImpl" and row["param_bytes"] > 0, row
        assert row["peak_rss"] >= row["rss_after_imports"] > 0, row


def test_bench_decode_rows(small_ref, tmp_path):
    """bench_decode on a small checkpoint: one row per implementation, with the run's date, commit,
    hardware and command, times, achieved GFLOP/s against the matmul roof, and the ratio to torch."""
    from benchmarks import bench_decode

    out = tmp_path / "decode.jsonl"
    argv = [small_ref.path, "--rounds", "1", "--reps", "1", "--codes", "20", "--out", str(out)]
    assert bench_decode.main(argv) == 0
    rows = {r["impl"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"model", "model-stacked", "codec", "torch"}
    for row in rows.values():
        assert {"date", "commit", "hardware", "command"} <= set(row) and row["median_s"] > 0
        assert row["speed_vs_torch"] > 0
    assert rows["model"]["gflop_per_s"] > 0 and rows["model"]["roof_gflop_per_s"] > 0


def test_bench_sources_rows(small_ref, tmp_path):
    """bench_sources on a small checkpoint: a folder, local tars and tars on the S3 server tokenized
    alike (every item, no error: asserted inside), items/s per source and the MP3/FLAC decode rates."""
    from benchmarks import bench_sources

    out = tmp_path / "sources.jsonl"
    argv = ["--checkpoint", small_ref.path, "--files", "4", "--per-shard", "2", "--rounds", "1"]
    argv += ["--min-seconds", "2.2", "--max-seconds", "2.5", "--batch-size", "1", "--out", str(out)]
    assert bench_sources.main(argv) == 0
    row = json.loads(out.read_text())
    assert set(row["items_per_s"]) == set(bench_sources.SOURCES)
    assert all(v > 0 for v in row["items_per_s"].values()) and row["relative_to_folder"]["folder"] == 1
    assert (
        row["decode"]["mp3"]["items_per_s_per_core"] > 0
        and row["decode"]["flac"]["audio_s_per_s_per_core"] > 0
    )
    assert row["command"].startswith("python -m benchmarks.bench_sources") and row["git"]
