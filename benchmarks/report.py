"""Turn the JSON lines of ``bench_codec`` into Markdown tables and a plot inside ``benchmarks/README.md``.

The generated block replaces whatever lies between ``<!-- results:start -->`` and ``<!-- results:end -->``
(appended to the README when the markers are missing). Where the results file holds several measurements of
the same (config, dtype, duration, batch, stage, impl), the last one wins::

    python -m benchmarks.report [--results benchmarks/results.jsonl] [--readme benchmarks/README.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
START, END = "<!-- results:start -->", "<!-- results:end -->"
# Achieved float32 matmul rate of JAX on the 2-core machine the committed results come from: the FLOP
# floor of a stage is its FLOPs at this rate.
DEFAULT_PEAK_GFLOPS = 143.0
IMPL_ORDER = ("jax", "torch", "torch-compile", "numpy", "hf-numpy")
STAGE_ORDER = ("encode", "decode", "features")
# What JAX is compared with in the speedup column.
BASELINE = {"encode": "torch", "decode": "torch", "features": "hf-numpy"}
KEY = ("config", "dtype", "duration_s", "batch", "stage", "impl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=os.path.join(HERE, "results.jsonl"))
    p.add_argument("--readme", default=os.path.join(HERE, "README.md"))
    p.add_argument("--plot", default=None, help="PNG to write (default: results.png beside the README)")
    p.add_argument("--no-plot", action="store_true", help="tables only (no matplotlib needed)")
    p.add_argument(
        "--peak-gflops",
        type=float,
        default=DEFAULT_PEAK_GFLOPS,
        help="matmul GFLOP/s that defines the FLOP floor",
    )
    return p.parse_args(argv)


def load_rows(path: str) -> list[dict]:
    latest: dict[tuple, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                latest[tuple(row.get(k) for k in KEY)] = row
    return list(latest.values())


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


def _num(x, digits=2) -> str:
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


def _secs(x) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


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
    return ""


def environment_text(rows: list[dict]) -> str:
    first = rows[0]
    dev, ver = first.get("device", {}), first.get("versions", {})
    lines = [
        f"- Machine: {dev.get('cpu_model', '?')}, {dev.get('usable_cpus', '?')} CPUs, "
        f"{dev.get('memory_gb', '?')} GB RAM; JAX device `{dev.get('jax_device_kind')}` "
        f"({dev.get('jax_platform')}); torch intra-op threads: {dev.get('torch_threads')}, "
        f"OMP_WAIT_POLICY {dev.get('omp_wait_policy', '?')}.",
        f"- Versions: jax {ver.get('jax')}, jaxlib {ver.get('jaxlib')}, flax {ver.get('flax')}, "
        f"torch {ver.get('torch')}, transformers {ver.get('transformers')}, numpy {ver.get('numpy')}, "
        f"python {ver.get('python')}; audio: {first.get('audio_source', '?')}.",
    ]
    runs: dict[str, list[dict]] = {}
    for row in rows:
        runs.setdefault(row.get("run_id", "?"), []).append(row)
    for run_id, run_rows in sorted(runs.items()):
        d = run_rows[0].get("device", {})
        loads = [r[k] for r in run_rows for k in ("loadavg_start", "loadavg_end") if r.get(k) is not None]
        cases = sorted({(r["duration_s"], r["batch"]) for r in run_rows}, key=lambda c: (c[1], c[0]))
        text = f"- Run {run_id} (UTC), {len(run_rows)} rows ({', '.join(f'{x:g} s × {b}' for x, b in cases)})"
        if d.get("jax_matmul_gflop_per_s"):
            text += (
                f": 2048² float32 matmul at the start {d['jax_matmul_gflop_per_s']:.0f} GFLOP/s (JAX), "
                f"{d.get('torch_matmul_gflop_per_s', 0):.0f} (torch)"
            )
        if loads:
            text += f"; 1-minute load average {min(loads):.2f}–{max(loads):.2f}"
        lines.append(text + ".")
    lines.append(
        f"- A load average above {dev.get('usable_cpus', 2)} means other processes competed for the cores "
        "(the benchmark itself accounts for about 1): such timings are noisy and slower than on an idle "
        "machine."
    )
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """One line per (config, dtype, case, stage): median wall time per implementation and JAX's speedup."""
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in rows)]
    impls += sorted({r["impl"] for r in rows} - set(impls))
    groups: dict[tuple, dict[str, dict]] = {}
    for row in sorted(rows, key=_sort_key):
        groups.setdefault(tuple(row[k] for k in KEY[:-1]), {})[row["impl"]] = row
    header = ["config", "dtype", "audio", "stage"] + [f"{i} s" for i in impls]
    header += ["JAX speedup", "JAX RTF", "baseline RTF", "JAX agreement"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (config, dtype, duration, batch, stage), by_impl in groups.items():
        jax_row, base = by_impl.get("jax"), by_impl.get(BASELINE.get(stage, "torch"))
        speedup = base["median_s"] / jax_row["median_s"] if jax_row and base else None
        cells = [config, dtype, f"{duration:g} s × {batch}", stage]
        cells += [_secs(by_impl[i]["median_s"]) if i in by_impl else "" for i in impls]
        cells += [
            f"**{speedup:.2f}×** vs {BASELINE.get(stage)}" if speedup else "–",
            _num(jax_row["rtf"]) if jax_row else "–",
            _num(base["rtf"]) if base else "–",
            _agreement(jax_row) if jax_row else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(rows: list[dict], peak_gflops: float) -> str:
    floors = floor_flops(rows)
    header = [
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
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(rows, key=_sort_key):
        floor = floors.get(tuple(row[k] for k in KEY[:-1]))
        pct = pct_then = None
        probe = row.get("probe_matmul_gflop_per_s")
        if floor and row["median_s"] > 0:
            pct = 100.0 * floor[0] / (peak_gflops * 1e9) / row["median_s"]
            if probe:
                pct_then = 100.0 * floor[0] / (probe * 1e9) / row["median_s"]
        flop_cell = "–"
        if row.get("gflops"):
            tag = "xla" if row.get("flops_counter") == "xla_cost_analysis" else "torch"
            flop_cell = f"{_num(row['gflops'])} ({tag})"
        mark = "" if not floor or floor[1] == "torch_flop_counter" else " †"
        pct_cell = "–" if pct is None else f"{pct:.1f}%{mark}"
        pct_then_cell = "–" if pct_then is None else f"{pct_then:.1f}%{mark}"
        loads = [row.get("loadavg_start"), row.get("loadavg_end")]
        cells = [
            row["config"],
            row["dtype"],
            _case(row),
            row["stage"],
            row["impl"],
            _secs(row.get("compile_s")),
            _secs(row.get("first_run_s")),
            _secs(row["median_s"]),
            str(row.get("reps", "")),
            _num(row["rtf"]),
            flop_cell,
            _num(row.get("gflop_per_s")),
            pct_cell,
            _num(probe),
            pct_then_cell,
            _num(row.get("peak_mem_mb"), 1),
            _num(row.get("work_mem_mb"), 1),
            "–".join(f"{x:.1f}" for x in loads if x is not None),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
                by_case = {_case(r): r["median_s"] for r in sel if r["impl"] == impl}
                xs = [j for j, c in enumerate(cases) if c in by_case]
                ys = [by_case[cases[j]] for j in xs]
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
    fig.savefig(path, dpi=130)
    plt.close(fig)


def render(rows: list[dict], peak_gflops: float, plot_name: str | None, results_name: str) -> str:
    parts = [
        START,
        f"_Generated by `python -m benchmarks.report` from `{results_name}` ({len(rows)} measurements); "
        "edit the script, not this block._",
        "",
        environment_text(rows),
        "",
    ]
    if plot_name:
        parts += [f"![median wall time per stage and implementation]({plot_name})", ""]
    parts += [
        "#### Median wall time per call (seconds)",
        "",
        "Speedup = baseline time / JAX time (baseline: torch eager for encode/decode, transformers' numpy "
        "fbank for features). RTF = seconds of audio (duration × batch) per wall-clock second.",
        "",
        summary_table(rows),
        "",
        "#### Details",
        "",
        "GFLOP: each implementation's own count (xla: `cost_analysis()`, all ops; torch: "
        f"`FlopCounterMode`, matmul/conv/attention only). % of floor = (FLOPs / {peak_gflops:g} GFLOP/s) / "
        "median time, with the torch count as FLOPs for both implementations († where only the XLA count "
        "exists). Matmul GFLOP/s during: the median rate of a 2048² float32 JAX matmul timed in the same "
        "alternating rounds as the stage (the machine's speed at the time); % of floor then: the floor at "
        "that rate. Peak MB: weights + inputs + working memory; working MB: XLA temporaries + outputs "
        "(`memory_analysis()`), torch live tensors created during the call, numpy `tracemalloc` peak. "
        "First run: the warm-up call (torch: under the FLOP counter and memory tracker).",
        "",
        detail_table(rows, peak_gflops),
        END,
    ]
    return "\n".join(parts)


def update_readme(readme: str, block: str) -> None:
    text = open(readme).read() if os.path.exists(readme) else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    with open(readme, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = load_rows(args.results)
    if not rows:
        raise SystemExit(f"no results in {args.results}")
    plot_path = None
    if not args.no_plot:
        plot_path = args.plot or os.path.join(os.path.dirname(os.path.abspath(args.readme)), "results.png")
        plot(rows, plot_path)
    readme_dir = os.path.dirname(os.path.abspath(args.readme))
    plot_name = os.path.relpath(plot_path, readme_dir) if plot_path else None
    results_name = os.path.relpath(os.path.abspath(args.results), readme_dir)
    update_readme(args.readme, render(rows, args.peak_gflops, plot_name, results_name))
    print(f"{len(rows)} measurements -> {args.readme}" + (f", {plot_path}" if plot_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
