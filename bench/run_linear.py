"""Peak memory and time of the fused linear + loss: ``python bench/run_linear.py``.

Forward plus backward of ``loss(hidden @ weight.T + bias, target)`` (``nce+rce``, mean) with
gradients for hidden, weight and bias, three ways:

* ``linear``: ``apl_kernels.linear.linear_loss`` (rows in chunks; backend ``auto``);
* ``materialized``: ``F.linear`` then the fused loss (``apl_loss``, backend ``auto``) on the whole
  (N, K) logits;
* ``eager``: ``F.linear`` then the PyTorch reference loss (``backend="torch"``).

Peak memory is measured above the inputs, the weights and their gradients: the peak of the
memory allocated during one forward plus backward, less the bytes of the three gradients it
leaves in ``.grad``. On CPU it is read from torch.profiler's allocation records (every allocation
and free of CPU tensor memory through torch's allocator, the C++ kernel's included, in order;
buffers that a BLAS library allocates for itself are not seen), plus the linear path's chunk
workspace, which is mapped outside torch's allocator (``unseen_bytes``); on CUDA from
``torch.cuda.max_memory_allocated``. Times are medians of forward plus backward (the gradients
reset to None before each run), fewer repetitions at large K; ratios compare medians of one run
(this shared machine's timings vary up to 1.5x between runs).

    python bench/run_linear.py                # bench/results/linear-<device>.md and .png (~15 min on 2 cores)
    python bench/run_linear.py --quick        # tiny shapes, a smoke test: bench/results/partial/
    python bench/run_linear.py --out DIR      # write elsewhere
    python bench/run_linear.py --rss linear 4096 1024 32000   # resident memory over steps (below)

``--rss METHOD N H K`` runs 20 steps of one method in this process, as a training loop does
(``.grad = None`` before each step, as ``zero_grad()`` does), and prints one JSON line: the
process's peak resident memory above the loop's start (the kernel's high-water mark, reset at the
start through /proc/self/clear_refs), its peak above the resident memory after the first step (the
steady state: each later step starts holding the last step's gradients, which every path must
allocate, as a training loop between ``optimizer.step()`` and ``zero_grad()`` does), and its resident
memory after each step, above the start. This is
what a user (or the OOM killer) sees, beside the allocator-level peak above: freed memory that the
C heap keeps, or fragments, counts here. Run each method in a fresh process.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import apl_kernels.functional as AF  # noqa: E402
from apl_kernels.linear import default_chunk_size, linear_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
BYTES = torch.finfo(DTYPE).bits // 8
LOSS = "nce+rce"
RESULTS = ROOT / "bench" / "results"
METHODS = {
    "linear": lambda h, w, b, t, chunk: linear_loss(h, w, t, LOSS, bias=b, chunk_size=chunk),
    "materialized": lambda h, w, b, t, chunk: AF.apl_loss(F.linear(h, w, b), t, LOSS),
    "eager": lambda h, w, b, t, chunk: AF.apl_loss(F.linear(h, w, b), t, LOSS, backend="torch"),
}
# (N, H, K, timed rounds): the two shapes, and a sweep of K at N = 2048 for the plot.
HEADLINE = [(4096, 1024, 32000, 4), (2048, 1024, 128000, 3)]
SWEEP = [(2048, 1024, 8000, 3), (2048, 1024, 16000, 2), (2048, 1024, 32000, 2), (2048, 1024, 64000, 1)]
# Rows per chunk of the linear path beside the default, for its choice (linear.CPU_CHUNK_ROWS), timed in
# the same rounds as the shape's methods; a shape of its own is timed against the materialized path only.
CHUNKS = {(4096, 1024, 32000): (128, 512, 1024), (1024, 1024, 128000, 2): (64, 128, 512)}
QUICK = [(64, 32, 100, 1), (64, 32, 400, 1)], {(64, 32, 400): (16,), (32, 32, 400, 1): (8, 16)}


def inputs(n: int, h: int, k: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(n, h, generator=g, device=DEVICE).to(DTYPE).requires_grad_()
    weight = (torch.randn(k, h, generator=g, device=DEVICE) / h**0.5).to(DTYPE).requires_grad_()
    bias = torch.zeros(k, device=DEVICE, dtype=DTYPE).requires_grad_()
    target = torch.randint(0, k, (n,), generator=g, device=DEVICE)
    return hidden, weight, bias, target


def step(method: str, tensors: tuple, chunk: int | None = None) -> None:
    """One forward plus backward, from gradients of None (so every run allocates them)."""
    hidden, weight, bias, target = tensors
    for x in (hidden, weight, bias):
        x.grad = None
    METHODS[method](hidden, weight, bias, target, chunk).backward()
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def allocations(fn) -> list[tuple[int, int]]:
    """(bytes, address) of every CPU allocation (bytes > 0) and free (bytes < 0) while ``fn()`` runs, in
    order, from torch.profiler's memory records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    records = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return [(r["Bytes"], r["Addr"]) for r in sorted(records, key=lambda r: r["Ev Idx"])]


def peak_memory(fn, kept: list[torch.Tensor]) -> int:
    """Peak bytes allocated while ``fn()`` runs above what existed before, not counting the tensors
    ``kept()`` returns afterwards (the gradients: as if they had existed before, as the inputs did).
    On CUDA their bytes are subtracted from the peak instead, which undercounts a path whose peak
    comes before its gradients exist (the materialized ones): the ratios there favour them."""
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() - base - sum(x.numel() * x.element_size() for x in kept())
    records = allocations(fn)
    # The allocation of a kept tensor is the last one at its address (earlier ones there were freed).
    last = {address: i for i, (size, address) in enumerate(records) if size > 0}
    skipped = {last[x.data_ptr()] for x in kept() if x.data_ptr() in last}
    live: set[int] = set()  # frees of memory allocated before fn() ran are not counted either
    total = peak = 0
    for i, (size, address) in enumerate(records):
        if i in skipped or (size < 0 and address not in live):
            continue
        (live.add if size > 0 else live.discard)(address)
        total += size
        peak = max(peak, total)
    return peak


def measure(n: int, h: int, k: int, reps: int, runs: list[tuple[str, int | None]]) -> list[dict]:
    """Each (method, rows per chunk) of ``runs`` at one shape, on the same inputs: a profiled run
    for the peak (also the warm-up), then ``reps`` timed rounds that alternate the runs, so that a
    change of the machine's load between rounds reaches every run alike."""
    tensors = inputs(n, h, k)
    leaves = tensors[:3]
    peaks = [peak_memory(functools.partial(step, method, tensors, chunk), lambda: [x.grad for x in leaves])
             + unseen_bytes(method, n, h, k, chunk) for method, chunk in runs]
    times = [[] for _ in runs]
    for _ in range(reps):
        for (method, chunk), record in zip(runs, times):
            start = time.perf_counter()
            step(method, tensors, chunk)
            record.append(time.perf_counter() - start)
    del tensors
    gc.collect()
    results = [{"method": method, "n": n, "h": h, "k": k, "chunk": chunk, "median": statistics.median(record),
                "times": record, "peak": peak} for (method, chunk), record, peak in zip(runs, times, peaks)]
    for result in results:
        print(json.dumps(result), flush=True)
    return results


def resident() -> tuple[int, int]:
    """The process's resident memory now and its high-water mark, in bytes (/proc/self/status)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "VmHWM"))


def rss_steps(method: str, n: int, h: int, k: int, steps: int = 20) -> dict:
    """Resident memory over ``steps`` training steps of ``method`` (the docstring's ``--rss``)."""
    tensors = inputs(n, h, k)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again at the current RSS
    start = resident()[0]
    between, times = [], []
    for i in range(steps):
        begin = time.perf_counter()
        step(method, tensors)
        times.append(time.perf_counter() - begin)
        between.append(resident()[0] - start)
        if i == 0:  # the steady state: from here on every step starts with the last step's gradients held
            first_peak = resident()[1]
            Path("/proc/self/clear_refs").write_text("5")
            steady_start = resident()[0]
    result = {"method": method, "n": n, "h": h, "k": k, "steps": steps,
              "rss_peak": max(first_peak, resident()[1]) - start, "rss_peak_steady": resident()[1] - steady_start,
              "rss_between": between, "median": statistics.median(times)}
    print(json.dumps(result), flush=True)
    return result


def rss_runs(shapes: list[tuple[int, int, int]]) -> list[dict]:
    """``rss_steps`` of the linear and the materialized path at each shape, each in a fresh process."""
    import subprocess

    runs = []
    for n, h, k in shapes:
        for method in ("linear", "materialized"):
            out = subprocess.run([sys.executable, __file__, "--rss", method, str(n), str(h), str(k)], check=True,
                                 capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    return runs


def rss_table(runs: list[dict]) -> list[str]:
    """Resident memory of ``rss_steps`` results against the materialized path's at the same shape, with
    the issue's targets (peak at most 1/8, between steps no higher, time at most 1.15 x)."""
    lines = ["| N x H x K | method | peak RSS above the loop's start | / materialized | peak RSS above the "
             "steady state (after step 1) | / materialized | RSS between steps (median, max) | median step (s) | "
             "x materialized |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        base = next(b for b in runs if b["method"] == "materialized" and shape(b) == shape(r))
        lines.append(f"| {r['n']} x {r['h']} x {r['k']} | {r.get('label', r['method'])} | {mib(r['rss_peak'])} | "
                     f"{share(r, base, 'rss_peak')} | {mib(r['rss_peak_steady'])} | "
                     f"{share(r, base, 'rss_peak_steady')} | {mib(statistics.median(r['rss_between']))}, "
                     f"{mib(max(r['rss_between']))} | {r['median']:.2f} | {share(r, base, 'median')} |")
    return lines


def share(run: dict, base: dict, field: str) -> str:
    """``run``'s ``field`` over ``base``'s, or a dash where the base's is 0 (tiny shapes)."""
    return f"{run[field] / base[field]:.3f}" if base[field] else "-"


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def shape(r: dict) -> tuple[int, int, int]:
    return r["n"], r["h"], r["k"]


def comparison_table(results: list[dict]) -> list[str]:
    lines = ["| N x H x K | method | median (s) | x materialized | peak above inputs and grads | / materialized |",
             "|---|---|---:|---:|---:|---:|"]
    for n, h, k in sorted({shape(r) for r in results if r["method"] == "eager"}, key=lambda s: (s[2], s[0])):
        rows = {r["method"]: r for r in results if shape(r) == (n, h, k) and r["chunk"] is None}
        base = rows["materialized"]
        for method, r in rows.items():
            lines.append(f"| {n} x {h} x {k} | {method} | {r['median']:.2f} | {r['median'] / base['median']:.3f} | "
                         f"{mib(r['peak'])} | {r['peak'] / base['peak']:.3f} |")
    return lines


def chunk_table(results: list[dict]) -> list[str]:
    lines = ["| N x H x K | rows per chunk | median (s) | x materialized | peak above inputs and grads |",
             "|---|---:|---:|---:|---:|"]
    for n, h, k in sorted({shape(r) for r in results if r["chunk"] is not None}, key=lambda s: (s[2], s[0])):
        rows = [r for r in results if shape(r) == (n, h, k) and r["method"] != "eager"]
        base = next(r for r in rows if r["method"] == "materialized")
        default = default_chunk_size(n, h, k, DEVICE)
        for r in sorted(rows, key=lambda r: (r["method"] == "linear", r["chunk"] or default)):
            rows_per_chunk = ("all (materialized)" if r["method"] == "materialized" else r["chunk"] or
                              f"{default} (default)")
            lines.append(f"| {n} x {h} x {k} | {rows_per_chunk} | {r['median']:.2f} | "
                         f"{r['median'] / base['median']:.3f} | {mib(r['peak'])} |")
    return lines


def unseen_bytes(method: str, n: int, h: int, k: int, chunk: int | None) -> int:
    """What the allocator's records miss: on CPU the linear path's chunk workspace is an anonymous
    mapping of its own (linear._workspace), alive through the chunk loop, where the peak is."""
    if method != "linear" or DEVICE != "cpu":
        return 0
    return min(chunk or default_chunk_size(n, h, k, DEVICE), n) * k * BYTES


def one_chunk(r: dict) -> int:
    """The bytes of one default chunk's workspace at the shape of result ``r``: its logits, which
    the CPU op overwrites with their gradient (apl::fused_loss_); elsewhere the gradient beside them."""
    buffers = 1 if DEVICE == "cpu" else 2
    return buffers * default_chunk_size(r["n"], r["h"], r["k"], DEVICE) * r["k"] * BYTES


def verdicts(results: list[dict]) -> list[str]:
    """The issue's targets, met or not, from this run's numbers."""
    by = {(r["method"], r["n"], r["k"]): r for r in results if r["chunk"] is None}
    lines = []
    for n, _, k, _ in HEADLINE:
        if ("linear", n, k) not in by:
            continue
        lin, mat = by[("linear", n, k)], by[("materialized", n, k)]
        ratio, slowdown = lin["peak"] / mat["peak"], lin["median"] / mat["median"]
        lines.append(f"- N = {n}, K = {k}: peak {mib(lin['peak'])} = {ratio:.3f} of the materialized path's "
                     f"{mib(mat['peak'])}" + (f" (target at most 1/8 = 0.125: {'met' if ratio <= 0.125 else 'NOT met'})"
                                              if k == 32000 else "")
                     + f"; time {slowdown:.3f} x the materialized path's (target at most 1.15: "
                       f"{'met' if slowdown <= 1.15 else 'NOT met'}).")
    sweep = sorted((r for r in results if r["method"] == "linear" and r["chunk"] is None
                    and r["n"] == sweep_rows(results)),
                   key=lambda r: r["k"])
    if sweep:
        beyond = [r["peak"] - one_chunk(r) for r in sweep]
        lines.append(f"- Peak against K at N = {sweep[0]['n']}: the linear path's peak less one chunk's workspace "
                     f"({1 if DEVICE == 'cpu' else 2} x rows x K x {BYTES} bytes) is " + ", ".join(
                         f"{mib(b)} (K = {r['k']})" for b, r in zip(beyond, sweep)) + ": independent of K "
                     f"beyond one chunk {'(met)' if max(beyond) - min(beyond) < 2**20 else '(NOT met)'}.")
    return lines


def sweep_rows(results: list[dict]) -> int:
    """The N of the sweep over K: the one measured at most values of K."""
    return Counter(r["n"] for r in results).most_common(1)[0][0]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = sweep_rows(results)
    fig, (memory, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in METHODS:
        rows = sorted((r for r in results if r["method"] == method and r["n"] == n and r["chunk"] is None),
                      key=lambda r: r["k"])
        ks = [r["k"] for r in rows]
        memory.plot(ks, [r["peak"] / 2**20 for r in rows], marker="o", label=method)
        speed.plot(ks, [r["median"] for r in rows], marker="o", label=method)
        if method == "linear":
            memory.plot(ks, [one_chunk(r) / 2**20 for r in rows], "k:", label="one chunk's workspace")
    memory.set(xscale="log", yscale="log", xlabel="K (classes)", ylabel="peak MiB above inputs and gradients",
               title=f"Peak memory, N = {n}, H = 1024, {str(DTYPE).removeprefix('torch.')}")
    speed.set(xscale="log", yscale="log", xlabel="K (classes)", ylabel="forward + backward, median (s)",
              title=f"Time, {DEVICE}")
    for ax in (memory, speed):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, not a result")
    parser.add_argument("--out", type=Path, help="output directory (default bench/results, or partial/ with --quick)")
    parser.add_argument("--rss", nargs=4, metavar=("METHOD", "N", "H", "K"),
                        help="resident memory over 20 steps of one method (docstring)")
    args = parser.parse_args(argv)
    if args.rss:
        rss_steps(args.rss[0], *map(int, args.rss[1:]))
        return
    shapes, chunks = QUICK if args.quick else (SWEEP + HEADLINE, CHUNKS)
    out = args.out or (RESULTS / "partial" if args.quick else RESULTS)
    load = [os.getloadavg()[0]]  # this machine is shared: the report says how busy it was
    results = [r for n, h, k, reps in shapes for r in measure(
        n, h, k, reps, [(m, None) for m in METHODS] + [("linear", rows) for rows in chunks.get((n, h, k), ())])]
    results += [r for key, sizes in chunks.items() if len(key) == 4 for r in measure(
        *key, [("materialized", None), ("linear", None)] + [("linear", rows) for rows in sizes])]
    runs = rss_runs([(n, h, k) for n, h, k, _ in (shapes[:1] if args.quick else HEADLINE)])
    load.append(os.getloadavg()[0])
    out.mkdir(parents=True, exist_ok=True)
    name = f"linear-{DEVICE}"
    plot(results, out / f"{name}.png")
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    text = "\n".join([
        f"# Fused linear + loss: peak memory and time ({device}, {str(DTYPE).removeprefix('torch.')}, torch "
        f"{torch.__version__})", "",
        f"Written by `python bench/run_linear.py`. Forward plus backward of `{LOSS}` (mean) of "
        f"`hidden @ weight.T + bias`, gradients for all three; method and measurement in the script's docstring. "
        f"Load average (1 min) at the start and the end: {load[0]:.1f}, {load[1]:.1f}.",
        "", "## Targets", "", *verdicts(results), "", "## Results", "", *comparison_table(results), "",
        "## Resident memory over 20 steps", "",
        "The process's resident memory (`--rss` in the script's docstring), each path in a fresh process.", "",
        *rss_table(runs), "",
        f"![peak memory and time against K]({name}.png)", "", "## Chunk size", "",
        "The linear path at other rows per chunk than the default (`linear.default_chunk_size`), timed in the "
        "same rounds as the materialized path.", "",
        *chunk_table(results), "",
        "Raw results (JSON lines):", "", "```", *(json.dumps(r) for r in results + runs), "```", ""])
    (out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
