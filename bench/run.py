"""Run the loss benchmarks and write the report: ``python bench/run.py``.

Times bench/bench_losses.py with pytest-benchmark, then writes ``<device>.md`` (a table per mode:
median, speed-up over eager and over torch.compile of the reference, GB/s for the bytes a fused
forward plus backward must move, % of a memory copy's bandwidth, bytes saved for backward, and
peak memory on CUDA) and ``<device>.png`` (speed-up against K), and prints the table.

A full, unfiltered run writes the committed report, ``bench/results/``. A partial one (``--quick``,
``-k EXPR``, other pytest options) or a rebuild (``--json FILE``) writes ``bench/results/partial/``
instead, unless ``--out DIR`` says where: committed results change only when asked.

    python bench/run.py                      # everything: bench/results/<device>.md and .png
    python bench/run.py -k "nce+rce and cpp" # a filter (pytest's -k): bench/results/partial/
    python bench/run.py --quick              # a smoke test of every benchmark, not a result
    python bench/run.py --json old.json --out /tmp/report   # a report from an earlier run's JSON

Other options are passed to pytest. pytest-benchmark's own tables are left out (the report has
the numbers); ``--pytest-table`` shows them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"  # the committed report of a full run
PARTIAL = RESULTS / "partial"  # partial runs and rebuilds (not committed: .gitignore)


def run_benchmarks(json_path: Path, extra: list[str], table: bool = False) -> None:
    command = [
        sys.executable, "-m", "pytest", str(HERE / "bench_losses.py"), "-q", "-p", "no:cacheprovider",
        "--benchmark-enable", "--benchmark-warmup=on", "--benchmark-min-rounds=5",
        "--benchmark-max-time=0.5", "--benchmark-disable-gc", f"--benchmark-json={json_path}",
        *([] if table else ["--benchmark-quiet"]), *extra,
    ]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=HERE.parent)


def load(json_path: Path) -> tuple[list[dict], dict]:
    data = json.loads(json_path.read_text())
    rows = []
    for bench in data["benchmarks"]:
        info = dict(bench["extra_info"])
        info["median"] = bench["stats"]["median"]
        rows.append(info)
    return rows, data.get("machine_info", {})


def human_bytes(n) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def build_table(rows: list[dict]) -> tuple[str, list[dict]]:
    """Markdown tables, one per mode, and the per-result derived numbers (for the plot)."""
    by_key = {(r["n"], r["k"], r["dtype"], r["mode"], r["loss"], r["impl"]): r for r in rows}
    copies = {(r["n"], r["k"], r["dtype"]): r["median"] for r in rows if r["impl"] == "copy"}
    derived = []
    lines = []
    for mode in ("forward+backward", "forward"):
        lines += [
            f"\n### {mode}\n",
            "| N x K | dtype | loss | impl | median | x eager | x compile | time / cross_entropy's | GB/s | "
            "% of copy bandwidth | saved for backward | peak memory |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (n, k, dtype, row_mode, loss, impl), r in sorted(by_key.items(), key=lambda kv: (kv[0][1] * kv[0][0], kv[0][0], kv[0][2], kv[0][4], kv[0][5])):
            if row_mode != mode:
                continue
            eager = by_key.get((n, k, dtype, mode, loss, "eager"))
            compiled = by_key.get((n, k, dtype, mode, loss, "compile"))
            copy = copies.get((n, k, dtype))
            # The cost floor of any loss over softmax at this shape (issue 27: at most 1.3 x at 128 x 10).
            floor = by_key.get((n, k, dtype, mode, "cross_entropy", "cross_entropy"))
            vs_floor = r["median"] / floor["median"] if floor and impl != "cross_entropy" else None
            vs_eager = eager["median"] / r["median"] if eager else None
            vs_compile = compiled["median"] / r["median"] if compiled else None
            # A fused forward+backward moves the bytes a copy moves: read N K, write N K.
            bandwidth = 100 * copy / r["median"] if copy and mode == "forward+backward" else None
            gbps = r["bytes_moved"] / r["median"] / 1e9  # for the bytes a fused forward+backward must move
            derived.append({**r, "vs_eager": vs_eager, "vs_compile": vs_compile})
            lines.append(
                f"| {n} x {k} | {dtype} | {loss} | {impl} | {r['median'] * 1e3:.3f} ms | "
                f"{'' if vs_eager is None else f'{vs_eager:.2f}'} | {'' if vs_compile is None else f'{vs_compile:.2f}'} | "
                f"{'' if vs_floor is None else f'{vs_floor:.2f}'} | "
                f"{gbps:.1f} | {'' if bandwidth is None else f'{bandwidth:.0f} %'} | {human_bytes(r.get('saved_bytes'))} | "
                f"{human_bytes(r.get('peak_bytes'))} |"
            )
    lines += ["\n### memory copy (the floor)\n", "| N x K | dtype | median | GB/s |", "|---|---|---|---|"]
    for r in sorted((r for r in rows if r["impl"] == "copy"), key=lambda r: (r["n"] * r["k"], r["dtype"])):
        lines.append(f"| {r['n']} x {r['k']} | {r['dtype']} | {r['median'] * 1e3:.3f} ms | {r['bytes_moved'] / r['median'] / 1e9:.1f} |")
    return "\n".join(lines), derived


def plot(derived: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from apl_kernels.reproduce.store import write

    dtypes = sorted({r["dtype"] for r in derived})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        series = defaultdict(list)
        for r in derived:
            if r["dtype"] == dtype and r["mode"] == "forward+backward" and r["vs_eager"] and r["impl"] != "eager":
                series[(r["impl"], r["loss"])].append((r["k"], r["vs_eager"]))
        ks = sorted({k for points in series.values() for k, _ in points})
        if len(ks) > 1:  # speed-up against K, one line per implementation and loss
            for (impl, loss), points in sorted(series.items()):
                points.sort()
                style = "--" if impl in ("compile", "cross_entropy") else "-"
                ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=f"{impl} {loss}")
            ax.set_xscale("log")
            ax.set_xlabel("K (classes); N varies with K as in the table")
            ax.legend(fontsize=7)
        else:  # one K: a bar per implementation and loss, its value written on it
            labels = [f"{impl} {loss}" for impl, loss in sorted(series)]
            values = [max(v for _, v in series[key]) for key in sorted(series)]
            bars = ax.barh(labels, values, color="tab:blue")
            ax.bar_label(bars, labels=[f"{v:.2f}x" for v in values], fontsize=7, padding=2)
            ax.set_xlim(0, 1.15 * max(values + [1.0]))
            ax.axvline(1.0, color="grey", linewidth=0.8)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_xlabel(f"speed-up over eager reference (K = {ks[0] if ks else '?'})")
        if len(ks) > 1:
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_ylabel("speed-up over eager reference")
        ax.set_title(f"{device}, {dtype}, forward + backward")
    fig.tight_layout()
    try:
        write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)


def describe(machine: dict, device: str) -> str:
    import torch

    cpu = machine.get("cpu", {})
    what = cpu.get("brand_raw") or machine.get("processor", "")
    if device == "cuda":
        what = torch.cuda.get_device_name()
    return (f"Device: {device} ({what}, {os.cpu_count()} CPU threads); torch {torch.__version__}; "
            f"medians of pytest-benchmark rounds, produced by `python bench/run.py`.")


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and the rest for pytest (``-k EXPR`` among them)."""
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.splitlines()[0],
                                     epilog="Other options are passed to pytest.")
    parser.add_argument("--json", type=Path, help="build the report from this pytest-benchmark JSON, timing nothing")
    parser.add_argument("--quick", action="store_true", help="the quick grid (a smoke test, not a result)")
    parser.add_argument("-k", dest="keyword", metavar="EXPR",
                        help="only the benchmarks matching this pytest -k expression, e.g. -k nce+rce")
    parser.add_argument("--out", type=Path, help=f"where to write the report (default: {RESULTS.relative_to(HERE.parent)} "
                                                 f"for a full run, {PARTIAL.relative_to(HERE.parent)} otherwise)")
    parser.add_argument("--pytest-table", action="store_true", help="also print pytest-benchmark's own tables")
    args, pytest_args = parser.parse_known_args(argv)
    if args.keyword:
        pytest_args = ["-k", args.keyword, *pytest_args]
    return args, pytest_args


def output_dir(args: argparse.Namespace, pytest_args: list[str]) -> Path:
    """The committed results for a full timing run; elsewhere for anything partial."""
    if args.out:
        return args.out
    return PARTIAL if args.json or args.quick or pytest_args else RESULTS


def main(argv: list[str] | None = None) -> int:
    args, pytest_args = parse(argv)
    import torch

    from apl_kernels.reproduce.store import write_text

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = output_dir(args, pytest_args)
    if args.json:
        json_path = args.json
    else:
        handle, name = tempfile.mkstemp(suffix=".json")
        os.close(handle)
        json_path = Path(name)
        if args.quick:
            os.environ["APL_BENCH_QUICK"] = "1"
        run_benchmarks(json_path, pytest_args, args.pytest_table)
    rows, machine = load(json_path)
    if not rows:
        print(f"no benchmark ran (filter: {' '.join(pytest_args) or 'none'}); nothing written", file=sys.stderr)
        return 1
    table, derived = build_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    partial = "" if out == RESULTS else "\n\nA partial run or a rebuild (not the committed report).\n"
    report = (f"# Loss benchmarks: {device}\n\n{describe(machine, device)}{partial}\n\n"
              f"![speed-up]({device}.png)\n{table}\n")
    write_text(out / f"{device}.md", report)
    plot(derived, out / f"{device}.png", device)
    print(report)
    print(f"wrote {out / f'{device}.md'} and {out / f'{device}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
