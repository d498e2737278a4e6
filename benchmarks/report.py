"""Generate ``benchmarks/RESULTS.md`` from the benchmarks' JSON lines (``benchmarks/results*.jsonl``).

One section per benchmark file, one table row per run: when it ran, the commit, the hardware, the
command and the figures. A field that a file's rows do not record shows as "-" (nothing is guessed).
The output depends only on the JSON lines, never on the clock, so the same files give the same bytes::

    python -m benchmarks.report                                  # benchmarks/results*.jsonl -> RESULTS.md
    python -m benchmarks.report --results-dir DIR --out FILE.md  # other folders
    python -m benchmarks.report --results /tmp/r.jsonl           # bench_codec rows from another file
    python -m benchmarks.report --no-plot                        # tables only (no matplotlib needed)

The bench_codec section also draws ``results.png`` (median wall time per stage) beside the output.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from collections.abc import Callable, Iterable

HERE = os.path.dirname(os.path.abspath(__file__))
MISSING = "-"
# Achieved float32 matmul rate of JAX on the 2-core machine the first committed results come from:
# the FLOP floor of a stage is its FLOPs at this rate.
DEFAULT_PEAK_GFLOPS = 143.0
IMPL_ORDER = ("jax", "torch", "torch-compile", "numpy", "hf-numpy")
STAGE_ORDER = ("encode", "decode", "features")
# What JAX is compared with in the speedup column.
BASELINE = {"encode": "torch", "decode": "torch", "features": "hf-numpy"}
KEY = ("config", "dtype", "duration_s", "batch", "stage", "impl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default=HERE, help="folder of results*.jsonl (default: benchmarks/)")
    p.add_argument(
        "--results",
        default=None,
        help="bench_codec's JSON lines, instead of results.jsonl in --results-dir",
    )
    p.add_argument("--out", default=None, help="Markdown to write (default: RESULTS.md in --results-dir)")
    p.add_argument("--plot", default=None, help="PNG to write (default: results.png beside --out)")
    p.add_argument("--no-plot", action="store_true", help="tables only (no matplotlib needed)")
    p.add_argument(
        "--peak-gflops",
        type=float,
        default=DEFAULT_PEAK_GFLOPS,
        help="matmul GFLOP/s that defines the FLOP floor (bench_codec)",
    )
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# Reading and formatting


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_rows(path: str) -> list[dict]:
    """bench_codec's rows, the last of each (config, dtype, duration, batch, stage, impl) kept."""
    latest: dict[tuple, dict] = {}
    for row in read_jsonl(path):
        latest[tuple(row.get(k) for k in KEY)] = row
    return list(latest.values())


def group(rows: Iterable[dict], key: Callable[[dict], object]) -> dict[object, list[dict]]:
    """Rows grouped by ``key``, groups in the order of their first row."""
    out: dict[object, list[dict]] = {}
    for row in rows:
        out.setdefault(key(row), []).append(row)
    return out


def run_key(row: dict) -> object:
    """What identifies a row's run: its run id, else its timestamp or date (None: no record of it)."""
    return row.get("run_id") or row.get("timestamp") or row.get("date")


def cell(x) -> str:
    if x is None or x == "":
        return MISSING
    return str(x).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _num(x, digits=2) -> str:
    if x is None:
        return MISSING
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


def _secs(x) -> str:
    if x is None:
        return MISSING
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _pct(x, digits=1) -> str:
    return MISSING if x is None else f"{100 * x:.{digits}f}%"


def _ratio(x) -> str:
    return MISSING if x is None else f"{x:.2f}×"


def _range(values: Iterable, fmt: Callable = _num) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return MISSING
    lo, hi = min(values), max(values)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}–{fmt(hi)}"


def _median(values: Iterable):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def date(row: dict) -> str:
    """The run's date and time (UTC, to the minute), from its run id, timestamp or date."""
    stamp = run_key(row)
    if not isinstance(stamp, str) or len(stamp) < 16:
        return MISSING
    return f"{stamp[:10]} {stamp[11:16]}"


def commit(row: dict) -> str:
    return row.get("git") or row.get("commit") or MISSING


def command(row: dict) -> str:
    cmd = row.get("command") or row.get("argv")
    if isinstance(cmd, (list, tuple)):
        cmd = " ".join(map(str, cmd))
    return f"`{cmd}`" if cmd else MISSING


def hardware(row: dict) -> str:
    if isinstance(row.get("hardware"), str):
        return row["hardware"]
    dev = row.get("device")
    if isinstance(dev, dict):
        parts = [dev.get("cpu_model") or dev.get("machine") or "CPU"]
        cpus = dev.get("usable_cpus") or dev.get("cpu_count")
        if cpus:
            parts.append(f"{cpus} CPUs")
        if dev.get("memory_gb"):
            parts.append(f"{dev['memory_gb']:g} GB")
        platform = dev.get("jax_platform")
        if platform and platform != "cpu":
            parts.append(f"{platform} {dev.get('jax_device_kind', '')}".strip())
        return ", ".join(parts)
    cpus = row.get("cpu_count") or row.get("cores")
    cpu = row.get("cpu")
    if cpu or cpus:
        return ", ".join(x for x in (cpu, f"{cpus} CPUs" if cpus else None) if x)
    return MISSING


def versions(row: dict, names=("jax", "jaxlib", "flax", "torch", "transformers")) -> str:
    ver = row.get("versions") if isinstance(row.get("versions"), dict) else row
    got = [f"{n} {ver[n]}" for n in names if isinstance(ver.get(n), str)]
    return ", ".join(got) or MISSING


def load_average(rows: Iterable[dict]) -> str:
    keys = ("loadavg_start", "loadavg_end", "loadavg", "load_average")
    return _range((r.get(k) for r in rows for k in keys), lambda x: f"{x:.1f}")


def by_impl(rows: Iterable[dict], stage: str) -> dict[str, dict]:
    return {r.get("impl"): r for r in rows if r.get("stage") == stage}


# ---------------------------------------------------------------------------------------------------
# bench_codec: results.jsonl


def _sort_key(row):
    impl = row["impl"]
    return (
        row["config"],
        row["dtype"],
        row["batch"],
        row["duration_s"],
        STAGE_ORDER.index(row["stage"]) if row["stage"] in STAGE_ORDER else 99,
        IMPL_ORDER.index(impl) if impl in IMPL_ORDER else 99,
    )


def _case(row) -> str:
    return f"{row['duration_s']:g} s × {row['batch']}"


def floor_flops(rows: list[dict]) -> dict[tuple, tuple[float, str]]:
    """Per (config, dtype, duration, batch, stage): the FLOPs that define the floor, and their source. The
    torch FlopCounterMode count (matmul, convolution, attention only: the work that can run at matmul
    speed) where present, else XLA's count (which also counts elementwise work)."""
    out: dict[tuple, tuple[float, str]] = {}
    for source in ("xla_cost_analysis", "torch_flop_counter"):  # the torch count overrides
        for row in rows:
            if row.get("flops") and row.get("flops_counter") == source and row["impl"] in ("jax", "torch"):
                out[tuple(row[k] for k in KEY[:-1])] = (row["flops"], source)
    return out


def _agreement(row) -> str:
    if row.get("codes_agreement") is not None:
        return f"codes {100 * row['codes_agreement']:.2f}% ({row.get('distinct_codes')} distinct)"
    if row.get("audio_rel_err") is not None:
        return f"audio err/peak {row['audio_rel_err']:.1e}"
    if row.get("features_max_abs_diff") is not None:
        return f"max diff {row['features_max_abs_diff']:.1e}"
    return MISSING


def codec_runs(runs: dict[object, list[dict]]) -> str:
    header = ["date (UTC)", "commit", "hardware", "versions", "command", "cases", "rows"]
    header += ["matmul GFLOP/s at start (JAX / torch)", "load"]
    out = []
    for rows in runs.values():
        first = rows[0]
        dev = first.get("device") or {}
        cases = sorted({(r["duration_s"], r["batch"]) for r in rows}, key=lambda c: (c[1], c[0]))
        matmul = MISSING
        if dev.get("jax_matmul_gflop_per_s"):
            matmul = f"{dev['jax_matmul_gflop_per_s']:.0f} / {_num(dev.get('torch_matmul_gflop_per_s'))}"
        out.append(
            [
                date(first),
                commit(first),
                hardware(first),
                versions(first),
                command(first),
                ", ".join(f"{x:g} s × {b}" for x, b in cases),
                len(rows),
                matmul,
                load_average(rows),
            ]
        )
    return table(header, out)


def summary_table(runs: dict[object, list[dict]]) -> str:
    """One line per (run, config, dtype, case, stage): median wall time per implementation and JAX's
    speedup over the baseline."""
    rows_all = [r for rows in runs.values() for r in rows]
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in rows_all)]
    impls += sorted({r["impl"] for r in rows_all} - set(impls))
    header = ["date (UTC)", "config", "dtype", "audio", "stage"] + [f"{i} s" for i in impls]
    header += ["JAX speedup", "JAX RTF", "baseline RTF", "JAX agreement"]
    out = []
    for rows in runs.values():
        groups: dict[tuple, dict[str, dict]] = {}
        for row in sorted(rows, key=_sort_key):
            groups.setdefault(tuple(row[k] for k in KEY[:-1]), {})[row["impl"]] = row
        for (config, dtype, duration, batch, stage), impl_rows in groups.items():
            jax_row, base = impl_rows.get("jax"), impl_rows.get(BASELINE.get(stage, "torch"))
            speedup = base["median_s"] / jax_row["median_s"] if jax_row and base else None
            cells = [date(rows[0]), config, dtype, f"{duration:g} s × {batch}", stage]
            cells += [_secs(impl_rows[i]["median_s"]) if i in impl_rows else "" for i in impls]
            cells += [
                f"**{speedup:.2f}×** vs {BASELINE.get(stage)}" if speedup else MISSING,
                _num(jax_row["rtf"]) if jax_row else MISSING,
                _num(base["rtf"]) if base else MISSING,
                _agreement(jax_row) if jax_row else MISSING,
            ]
            out.append(cells)
    return table(header, out)


def detail_table(runs: dict[object, list[dict]], peak_gflops: float) -> str:
    header = [
        "date (UTC)",
        "config",
        "dtype",
        "audio",
        "stage",
        "impl",
        "compile s",
        "first run s",
        "median s",
        "reps",
        "RTF",
        "GFLOP (own counter)",
        "GFLOP/s",
        "% of floor",
        "matmul GFLOP/s during",
        "% of floor then",
        "peak MB",
        "working MB",
        "load",
    ]
    out = []
    for rows in runs.values():
        floors = floor_flops(rows)
        for row in sorted(rows, key=_sort_key):
            floor = floors.get(tuple(row[k] for k in KEY[:-1]))
            pct = pct_then = None
            probe = row.get("probe_matmul_gflop_per_s")
            if floor and row["median_s"] > 0:
                pct = 100.0 * floor[0] / (peak_gflops * 1e9) / row["median_s"]
                if probe:
                    pct_then = 100.0 * floor[0] / (probe * 1e9) / row["median_s"]
            flop_cell = MISSING
            if row.get("gflops"):
                tag = "xla" if row.get("flops_counter") == "xla_cost_analysis" else "torch"
                flop_cell = f"{_num(row['gflops'])} ({tag})"
            mark = "" if not floor or floor[1] == "torch_flop_counter" else " †"
            out.append(
                [
                    date(row),
                    row["config"],
                    row["dtype"],
                    _case(row),
                    row["stage"],
                    row["impl"],
                    _secs(row.get("compile_s")),
                    _secs(row.get("first_run_s")),
                    _secs(row["median_s"]),
                    row.get("reps"),
                    _num(row["rtf"]),
                    flop_cell,
                    _num(row.get("gflop_per_s")),
                    MISSING if pct is None else f"{pct:.1f}%{mark}",
                    _num(probe),
                    MISSING if pct_then is None else f"{pct_then:.1f}%{mark}",
                    _num(row.get("peak_mem_mb"), 1),
                    _num(row.get("work_mem_mb"), 1),
                    load_average([row]),
                ]
            )
    return table(header, out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = [r for r in rows if r["dtype"] == "float32"] or rows
    configs = sorted({r["config"] for r in rows})
    stages = [s for s in STAGE_ORDER if any(r["stage"] == s for r in rows)]
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in rows)]
    colors = {
        "jax": "#1f77b4",
        "torch": "#d62728",
        "torch-compile": "#ff7f0e",
        "numpy": "#2ca02c",
        "hf-numpy": "#9467bd",
    }
    fig, axes = plt.subplots(
        len(configs), len(stages), figsize=(5.2 * len(stages), 4.2 * len(configs)), squeeze=False
    )
    for ci, config in enumerate(configs):
        for si, stage in enumerate(stages):
            ax = axes[ci][si]
            sel = sorted((r for r in rows if r["config"] == config and r["stage"] == stage), key=_sort_key)
            cases = list(dict.fromkeys(_case(r) for r in sel))
            present = [i for i in impls if any(r["impl"] == i for r in sel)]
            width = 0.8 / max(1, len(present))
            for k, impl in enumerate(present):
                case_times = {_case(r): r["median_s"] for r in sel if r["impl"] == impl}
                xs = [j for j, c in enumerate(cases) if c in case_times]
                ys = [case_times[cases[j]] for j in xs]
                pos = np.array(xs) + (k - (len(present) - 1) / 2) * width
                ax.bar(pos, ys, width, label=impl, color=colors.get(impl))
                for x, y in zip(pos, ys, strict=True):
                    ax.annotate(
                        f"{y:.2g}",
                        (x, y),
                        ha="center",
                        va="bottom",
                        fontsize=6.5,
                        xytext=(0, 1),
                        textcoords="offset points",
                    )
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{stage} ({config} config)", fontsize=10)
            ax.grid(axis="y", which="both", alpha=0.3)
            if si == 0:
                ax.set_ylabel("median wall time per call (s, log)")
            ax.legend(fontsize=8)
    dev = rows[0].get("device", {})
    machine = f"{dev.get('cpu_model', '')} × {dev.get('usable_cpus', '?')} CPUs"
    fig.suptitle(f"X-Codec2, JAX vs PyTorch, float32, {machine} (audio duration × batch)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130, metadata={"Software": None})
    plt.close(fig)


def codec_section(rows: list[dict], ctx: dict) -> list[str]:
    runs = group(rows, run_key)
    # Within a run, the last measurement of each case wins (a run may be appended to with --append).
    runs = {k: list({tuple(r.get(f) for f in KEY): r for r in v}.values()) for k, v in runs.items()}
    parts = ["Runs:", "", codec_runs(runs), ""]
    if ctx.get("plot_name"):
        parts += [f"![median wall time per stage and implementation]({ctx['plot_name']})", ""]
    parts += [
        "Median wall time per call (seconds). Speedup = baseline time / JAX time (baseline: torch eager "
        "for encode and decode, transformers' numpy fbank for features); RTF = seconds of audio "
        "(duration × batch) per wall-clock second.",
        "",
        summary_table(runs),
        "",
        "Details. GFLOP: each implementation's own count (xla: `cost_analysis()`, all ops; torch: "
        f"`FlopCounterMode`, matmul/conv/attention only). % of floor = (FLOPs / {ctx['peak_gflops']:g} "
        "GFLOP/s) / median time, with the torch count as FLOPs for both implementations († where only "
        "the XLA count exists). Matmul GFLOP/s during: the median rate of a 2048² float32 JAX matmul "
        "timed in the same rounds as the stage; % of floor then: the floor at that rate. Peak MB: "
        "weights + inputs + working memory; working MB: XLA temporaries + outputs, torch live tensors "
        "created during the call, numpy `tracemalloc` peak. First run: the warm-up call.",
        "",
        detail_table(runs, ctx["peak_gflops"]),
    ]
    return parts


# ---------------------------------------------------------------------------------------------------
# bench_cli: results_cli.jsonl


def cli_section(rows: list[dict], ctx: dict) -> list[str]:
    header = [
        "date (UTC)",
        "commit",
        "hardware",
        "command",
        "config, audio",
        "rounds",
        "CLI first-ever: ours / torch s",
        "CLI warm: ours s (× torch)",
        "peak RSS first-ever / warm (× torch)",
        "CPU s first-ever (× torch)",
        "`codec.encode`: ours / torch s",
        "codes equal",
        "load",
    ]
    out = []
    for run in group(rows, run_key).values():
        first = run[0]
        cold, warm = by_impl(run, "cli_encode_cold"), by_impl(run, "cli_encode_warm")
        codec = by_impl(run, "codec_encode")
        cj, ct, wj = cold.get("jax", {}), cold.get("torch", {}), warm.get("jax", {})
        kj, kt = codec.get("jax", {}), codec.get("torch", {})

        def ratio(a, b, stored=None):
            if stored is not None:
                return stored
            return a / b if a is not None and b else None

        cold_ratio = ratio(cj.get("median_s"), ct.get("median_s"), cj.get("time_ratio_vs_torch"))
        warm_ratio = ratio(wj.get("median_s"), ct.get("median_s"), wj.get("time_ratio_vs_torch"))
        rss = MISSING
        if cj.get("rss_ratio_vs_torch") is not None or wj.get("rss_ratio_vs_torch") is not None:
            rss = f"{_num(cj.get('max_rss_mb'))} / {_num(wj.get('max_rss_mb'))} MB "
            rss += f"({_ratio(cj.get('rss_ratio_vs_torch'))} / {_ratio(wj.get('rss_ratio_vs_torch'))})"
        speedup = kj.get("speedup_vs_torch") or ratio(kt.get("median_s"), kj.get("median_s"))
        agreements = [r.get("codes_agreement") for r in run if r.get("codes_agreement") is not None]
        codes = MISSING
        if agreements:
            codes = f"{_range(agreements, _pct)} ({first.get('num_codes') or cj.get('num_codes')} codes)"
        out.append(
            [
                date(first),
                commit(first),
                hardware(first),
                command(first),
                f"{first.get('config')}, {first.get('duration_s', 0):g} s",
                max((r.get("reps") or 0) for r in run if r.get("stage", "").startswith("cli_")) or MISSING,
                f"{_secs(cj.get('median_s'))} / {_secs(ct.get('median_s'))} (**{_ratio(cold_ratio)}**)",
                f"{_secs(wj.get('median_s'))} (**{_ratio(warm_ratio)}**)",
                rss,
                f"{_num(cj.get('cpu_s'))} ({_ratio(cj.get('cpu_ratio_vs_torch'))})",
                f"{_secs(kj.get('median_s'))} / {_secs(kt.get('median_s'))} (**{speedup:.2f}× faster**)"
                if speedup
                else MISSING,
                codes,
                load_average(run),
            ]
        )
    return [
        "Fresh processes: `xcodec2-jax encode` against a transformers script doing the same, first with "
        "an empty compilation cache (first-ever) and then warm; ratios are ours / torch (below 1: "
        "faster, smaller). `codec.encode`: in one warm process, against the reference's features + "
        "`encode`.",
        "",
        table(header, out),
    ]


# ---------------------------------------------------------------------------------------------------
# bench_load: results_load.jsonl


def load_section(rows: list[dict], ctx: dict) -> list[str]:
    # The rows carry no run id: a run is one commit's loads of one checkpoint in one mode.
    def key(r):
        return (
            run_key(r),
            r.get("git"),
            r.get("format"),
            r.get("path"),
            r.get("mode"),
            r.get("params_cache"),
        )

    header = [
        "date (UTC)",
        "commit",
        "hardware",
        "command",
        "format",
        "checkpoint",
        "to",
        "params cache",
        "loads",
        "wall s, median (range)",
        "CPU s, median",
        "model trace s, median",
        "peak RSS / checkpoint",
        "load",
    ]
    out = []
    for run in group(rows, key).values():
        first = run[0]
        wall = [r.get("seconds") for r in run]
        size = first.get("checkpoint_bytes")
        out.append(
            [
                date(first),
                commit(first),
                hardware(first),
                command(first),
                first.get("format"),
                f"{first.get('path') or MISSING} ({size / 1e9:.2f} GB)" if size else first.get("path"),
                first.get("mode"),
                "yes" if first.get("params_cache") else "no",
                len(run),
                f"{_secs(_median(wall))} ({_range(wall, _secs)})",
                _secs(_median(r.get("cpu_seconds") for r in run)),
                _secs(_median(r.get("trace_s") for r in run)),
                _range((r.get("rss_over_checkpoint") for r in run), lambda x: f"{x:.2f}×"),
                load_average(run),
            ]
        )
    return [
        "`load_checkpoint(path, device=...)` in a fresh process, the checkpoint's files in the page cache: "
        "wall and CPU seconds, the model trace within them, peak RSS over the checkpoint's bytes.",
        "",
        table(header, out),
    ]


# ---------------------------------------------------------------------------------------------------
# bench_long: results_long.jsonl


FIELD_LABELS = {
    "seconds": "audio s",
    "core_s": "core s",
    "crossfade_s": "crossfade s",
    "stream_codes": "codes",
    "context": "context (codes)",
}


def _sweep(rows, what, key_fields, column_field, value, label) -> tuple[list[str], list[list]]:
    """Rows of a sweep, one table row per ``key_fields`` combination, one column per ``column_field``."""
    sel = [r for r in rows if r.get("what") in what]
    columns = sorted({r.get(column_field) for r in sel if r.get(column_field) is not None})
    out = []
    for run in group(sel, lambda r: tuple(r.get(k) for k in ("what", *key_fields, "note"))).values():
        first = run[0]
        got = {r.get(column_field): r for r in run}
        cells = [date(first), commit(first), first.get("what")]
        cells += [
            first.get(k) if not isinstance(first.get(k), float) else f"{first[k]:g}" for k in key_fields
        ]
        cells += [value(got[c]) if c in got else "" for c in columns]
        out.append(cells + [first.get("note")])
    names = [FIELD_LABELS.get(k, k) for k in key_fields]
    header = ["date (UTC)", "commit", "what", *names, *(label(c) for c in columns), "note"]
    return header, out


def long_section(rows: list[dict], ctx: dict) -> list[str]:
    parts = [
        "Windows and streams against the one-piece codec (quality), streaming latency, and peak RSS "
        "against duration.",
        "",
    ]
    enc = _sweep(
        rows,
        ("encode", "encode_window_own_statistics"),
        ("config", "seconds", "core_s"),
        "context_s",
        lambda r: _pct(r.get("agreement")),
        lambda c: f"context {c:g} s",
    )
    if enc[1]:
        parts += ["Windowed encode: codes equal to the one-piece encode, per context on each side.", ""]
        parts += [table(*enc), ""]
    dec = _sweep(
        rows,
        ("decode",),
        ("config", "seconds", "core_s", "crossfade_s"),
        "context_s",
        lambda r: f"{r['snr_db']:.1f}" if r.get("snr_db") is not None else MISSING,
        lambda c: f"context {c:g} s",
    )
    if dec[1]:
        parts += ["Windowed decode: SNR (dB) against the one-piece decode, per context on each side.", ""]
        parts += [table(*dec), ""]
    stream = _sweep(
        rows,
        ("stream",),
        ("config", "seconds", "stream_codes", "chunk", "context"),
        "lookahead",
        lambda r: f"{r['snr_db']:.1f}" if r.get("snr_db") is not None else MISSING,
        lambda c: f"lookahead {c}",
    )
    if stream[1]:
        parts += [
            "Streaming decode: SNR (dB) of the whole stream against the one-piece decode; sizes in codes.",
            "",
        ]
        parts += [table(*stream), ""]
    latency = [r for r in rows if r.get("what") == "latency"]
    if latency:
        header = [
            "date (UTC)",
            "commit",
            "hardware",
            "config",
            "chunk / lookahead / context",
            "codes before first audio",
            "first push s",
            "per push s (wall)",
            "per push s (CPU)",
            "wall s per audio s",
            "compile s",
            "audio s",
            "load",
        ]
        out = [
            [
                date(r),
                commit(r),
                hardware(r),
                r.get("config"),
                f"{r.get('chunk')} / {r.get('lookahead')} / {r.get('context')}",
                r.get("first_audio_codes"),
                _secs(r.get("first_push_s")),
                _secs(r.get("push_s_median")),
                _secs(r.get("push_cpu_s_median")),
                _num(r.get("rtf")),
                _secs(r.get("first_compile_s")),
                _num(r.get("audio_s"), 1),
                load_average([r]),
            ]
            for r in latency
        ]
        parts += ["Streaming latency: codes pushed one at a time, the stream compiled before timing.", ""]
        parts += [table(header, out), ""]
    rss = [r for r in rows if str(r.get("what", "")).startswith("rss_")]
    if rss:
        header = [
            "date (UTC)",
            "commit",
            "config",
            "stage",
            "audio",
            "wall s",
            "wall s per audio s",
            "peak RSS",
        ]
        out = [
            [
                date(r),
                commit(r),
                r.get("config"),
                r["what"][4:],
                f"{r.get('minutes', 0):g} min",
                _num(r.get("wall_s")),
                _num(r.get("rtf"), 3),
                f"{r['max_rss_mb']:,.0f} MB" if r.get("max_rss_mb") else MISSING,
            ]
            for r in rss
        ]
        parts += ["Peak RSS of a fresh process encoding or decoding one long item (default windows).", ""]
        parts += [table(header, out), ""]
    return parts


# ---------------------------------------------------------------------------------------------------
# bench_tokenize: results_tokenize.jsonl


def tokenize_section(rows: list[dict], ctx: dict) -> list[str]:
    header = [
        "date (UTC)",
        "commit",
        "hardware",
        "command",
        "files (audio)",
        "batch",
        "ours, warm: audio-s/s",
        "torch: audio-s/s",
        "ours / torch",
        "ours, first run: wall s (compile s)",
        "device idle",
        "shapes",
        "codes equal to the baseline's",
        "load",
    ]
    out, notes = [], []
    for run in group(rows, lambda r: run_key(r) or id(r)).values():
        r = run[-1]
        rng = r.get("seconds_range")
        files = f"{r.get('files')} × {rng[0]:g}–{rng[1]:g} s" if rng else r.get("files")
        out.append(
            [
                date(r),
                commit(r),
                hardware(r),
                command(r),
                f"{files} ({_num(r.get('audio_seconds'), 1)} s)",
                r.get("batch_size"),
                _num(r.get("ours_audio_s_per_s"), 3),
                _num(r.get("torch_audio_s_per_s"), 3),
                f"**{_ratio(r.get('ratio'))}**" if r.get("ratio") else MISSING,
                f"{_secs(r.get('ours_first_run_wall_s'))} ({_secs(r.get('ours_first_run_compile_s'))})",
                _pct(r.get("device_idle_fraction")),
                ", ".join(f"({a}, {b})" for a, b in r.get("shapes") or []) or MISSING,
                f"{_pct(r.get('codes_agreement'))} of codes, {r.get('files_with_equal_codes')} files"
                if r.get("codes_agreement") is not None
                else MISSING,
                load_average([r]),
            ]
        )
        if r.get("note"):
            notes.append(f"- {date(r)}: {r['note']}")
    parts = [
        "`xcodec2_jax.tokenize` on a folder of WAV files against an X-Codec-2.0-style transformers script "
        "(padded batches, one `.npy` per file), each in fresh processes; throughput is audio seconds per "
        "second of the whole process.",
        "",
        table(header, out),
    ]
    if notes:
        parts += ["", "Notes recorded with the rows:", "", *notes]
    return parts


# ---------------------------------------------------------------------------------------------------
# bench_train: results_train.jsonl


TRAIN_RUN_FIELDS = (
    "config",
    "recipe",
    "dtype",
    "batch",
    "seconds",
    "cpu",
    "cpu_count",
    "jax",
    "torch",
    "loadavg_start",
    "loadavg_end",
)


def train_section(rows: list[dict], ctx: dict) -> list[str]:
    # No run id in these rows: the rows of one run share its settings, versions and load averages.
    def key(r):
        return (run_key(r), *(r.get(k) for k in TRAIN_RUN_FIELDS))

    header = [
        "date (UTC)",
        "commit",
        "hardware",
        "versions",
        "command",
        "config",
        "recipe",
        "dtype",
        "batch",
        "JAX step s, median (rounds)",
        "torch step s, median (rounds)",
        "JAX speedup",
        "peak MB, JAX / torch",
        "JAX compile s",
        "first loss, rel. diff",
        "load",
    ]
    out = []
    for run in group(rows, key).values():
        steps = by_impl(run, "train_step")
        j, t = steps.get("jax", {}), steps.get("torch", {})

        def step(r):
            if not r:
                return MISSING
            rounds = ", ".join(_secs(x) for x in r.get("times_s") or [])
            return f"{_secs(r.get('median_s'))} ({rounds})"

        speedup = j.get("speedup_vs_torch")
        diff = j.get("first_loss_rel_diff_vs_torch")
        first = run[0]
        out.append(
            [
                date(first),
                commit(first),
                hardware(first),
                versions(first, ("jax", "torch")),
                command(first),
                first.get("config"),
                first.get("recipe", "reconstruction"),  # rows from before the GAN recipe
                first.get("dtype", "float32"),
                f"{first.get('batch')} × {first.get('seconds', 0):g} s"
                + (" (a process each)" if first.get("isolated") else ""),
                step(j),
                step(t),
                f"**{speedup:.2f}×**" if speedup else MISSING,
                f"{_num(j.get('peak_mem_mb'))} / {_num(t.get('peak_mem_mb'))}",
                _secs(j.get("compile_s")),
                MISSING if diff is None else f"{diff:.1e}",
                load_average(run),
            ]
        )
    return [
        "One training step in `xcodec2_jax`'s `RecipeTrainer` against the same step in PyTorch eager, in "
        "alternating rounds: `xcodec2` is X-Codec2's whole GAN step (discriminators, then everything but "
        "w2v-BERT; torch bfloat16 under autocast), `reconstruction` the decoder's fine-tuning step "
        "(frozen encoder, log-mel + multi-resolution STFT loss). \"A process each\": every round ran "
        "one fresh process per framework (`--isolate`), so that one model is in memory at a time.",
        "",
        table(header, out),
    ]


# ---------------------------------------------------------------------------------------------------
# bench_sources: results_sources.jsonl


def sources_section(rows: list[dict], ctx: dict) -> list[str]:
    names = ("folder", "local tars", "S3 tars")
    out = []
    for r in rows:
        rates, rel, idle = (
            r.get("items_per_s", {}),
            r.get("relative_to_folder", {}),
            r.get("device_idle_fraction", {}),
        )
        decode = r.get("decode", {})
        out.append(
            [date(r), commit(r), hardware(r), command(r), r.get("files"), r.get("batch_size")]
            + [f"{_num(rates.get(n))} ({_ratio(rel.get(n))}, idle {_pct(idle.get(n))})" for n in names]
            + [_num(decode.get(f, {}).get("items_per_s_per_core"), 1) for f in ("mp3", "flac")]
        )
    header = ["date (UTC)", "commit", "hardware", "command", "files", "batch"]
    header += [f"{n}: items/s (vs folder, device idle)" for n in names]
    header += ["MP3 decode items/s/core", "FLAC decode items/s/core"]
    return [
        "Items per second of tokenize's encode loop (host reading and decoding overlap the device), the "
        "same files from each source, alternating rounds in one process; decode rates on one thread.",
        "",
        table(header, out),
    ]


# ---------------------------------------------------------------------------------------------------
# Any other results*.jsonl


def generic_section(rows: list[dict], ctx: dict) -> list[str]:
    skip = {"run_id", "timestamp", "date", "git", "commit", "command", "argv", "device", "versions"}
    skip.add("hardware")
    fields: list[str] = []
    for r in rows:
        fields += [
            k for k, v in r.items() if k not in skip and k not in fields and not isinstance(v, (dict, list))
        ]
    fields = fields[:14]

    def fmt(v):
        return _num(v, 3) if isinstance(v, float) else v

    out = [[date(r), commit(r), hardware(r), command(r), *(fmt(r.get(k)) for k in fields)] for r in rows]
    return [table(["date (UTC)", "commit", "hardware", "command", *fields], out)]


SECTIONS: dict[str, tuple[str, str, Callable[[list[dict], dict], list[str]]]] = {
    "results.jsonl": ("The model: `bench_codec.py`", "python -m benchmarks.bench_codec", codec_section),
    "results_cli.jsonl": ("The user's path: `bench_cli.py`", "python -m benchmarks.bench_cli", cli_section),
    "results_load.jsonl": ("Loading: `bench_load.py`", "python -m benchmarks.bench_load", load_section),
    "results_tokenize.jsonl": (
        "The corpus job: `bench_tokenize.py`",
        "python -m benchmarks.bench_tokenize",
        tokenize_section,
    ),
    "results_long.jsonl": (
        "Long audio and streaming: `bench_long.py`",
        "python -m benchmarks.bench_long",
        long_section,
    ),
    "results_train.jsonl": (
        "Training step: `bench_train.py`",
        "python -m benchmarks.bench_train",
        train_section,
    ),
    "results_sources.jsonl": (
        "Corpus sources: `bench_sources.py`",
        "python -m benchmarks.bench_sources",
        sources_section,
    ),
}


def result_files(results_dir: str, codec_results: str | None) -> list[tuple[str, str]]:
    """(name, path) of every results*.jsonl to report: the known ones in SECTIONS' order, then others."""
    found = {os.path.basename(p): p for p in glob.glob(os.path.join(results_dir, "results*.jsonl"))}
    if codec_results:
        found["results.jsonl"] = codec_results
    names = [n for n in SECTIONS if n in found] + sorted(n for n in found if n not in SECTIONS)
    return [(n, found[n]) for n in names]


def render(files: list[tuple[str, str, list[dict]]], ctx: dict) -> str:
    parts = [
        "# Benchmark results",
        "",
        "_Generated by `python -m benchmarks.report` from the JSON lines beside it; edit the script or "
        "rerun a benchmark, not this file._ What each benchmark measures, how to run it and the targets: "
        "[README.md](README.md). One row per run; a cell shows "
        f'"{MISSING}" where the rows do not record that field (older rows carry no date, commit or command).',
        "",
    ]
    for name, _, rows in files:
        title, cmd, section = SECTIONS.get(name, (f"`{name}`", None, generic_section))
        parts += [f"## {title}", ""]
        count = f"{len(rows)} row" + ("" if len(rows) == 1 else "s")
        parts += [f"`{name}`, {count}" + (f"; produced by `{cmd}`." if cmd else "."), ""]
        parts += section(rows, ctx)
        if parts[-1] != "":
            parts.append("")
    return "\n".join(parts).rstrip("\n") + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or os.path.join(args.results_dir, "RESULTS.md")
    found = result_files(args.results_dir, args.results)
    files = [(name, path, read_jsonl(path)) for name, path in found]
    files = [f for f in files if f[2]]
    if not files:
        raise SystemExit(f"no results*.jsonl rows in {args.results_dir}")
    out_dir = os.path.dirname(os.path.abspath(out))
    ctx = {"peak_gflops": args.peak_gflops, "plot_name": None}
    codec = next((path for name, path, _ in files if name == "results.jsonl"), None)
    plot_path = None
    if codec and not args.no_plot:
        plot_path = args.plot or os.path.join(out_dir, "results.png")
        try:
            plot(load_rows(codec), plot_path)
        except ImportError as e:  # matplotlib is optional: the tables do not need it
            print(f"no plot ({e}); tables only", file=sys.stderr)
            plot_path = None
    if plot_path:
        ctx["plot_name"] = os.path.relpath(os.path.abspath(plot_path), out_dir)
    text = render(files, ctx)
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    rows = sum(len(f[2]) for f in files)
    sources = f"{len(files)} file" + ("" if len(files) == 1 else "s")
    print(f"{rows} rows from {sources} -> {out}" + (f", {plot_path}" if plot_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
