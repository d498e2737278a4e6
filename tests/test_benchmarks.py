"""The benchmark script end to end on a tiny model: rows written with their fields, report regenerated.

No timing assertions: speed belongs in benchmarks/README.md, not in a test.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def test_report_regenerates_readme_block(results, tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(os.path.join(REPO, "benchmarks", "README.md"), readme)
    before = readme.read_text()
    head, tail = before.split(report.START)[0], before.split(report.END)[1]
    assert report.main(["--results", str(results), "--readme", str(readme)]) == 0
    after = readme.read_text()
    assert after.startswith(head) and after.endswith(tail)
    block = after.split(report.START)[1].split(report.END)[0]
    assert "| tiny | float32 | 1 s × 1 | encode |" in block
    assert "hf-numpy" in block and "codes 100.00%" in block and "matmul GFLOP/s during" in block
    assert (tmp_path / "results.png").stat().st_size > 0


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
