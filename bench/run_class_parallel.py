"""Per-rank peak memory and time of the class-parallel losses: ``python bench/run_class_parallel.py``.

Forward plus backward of ``nce+rce`` (mean) two ways, each against its single-process path:

* ``loss``: the logits (N, K) given. Single process: ``apl_loss`` on the whole logits (backend
  ``auto``: the C++ kernel); class-parallel: ``class_parallel_loss`` on each of P ranks' (N, K/P).
* ``linear``: hidden (N, H) and a classifier (K, H). Single process: ``linear_loss`` (chunked);
  class-parallel: ``class_parallel_linear_loss`` with (K/P, H) of the classifier on each rank.

Each path runs in processes of its own (gloo on CPU, P processes for the class-parallel one), once
per backend of ``--backend`` (``auto``: the fused C++ kernels, whole rows for the single process and
the shard kernel for the class-parallel path; ``torch``: the PyTorch reference and formulation).
Peak memory is per process, above what existed before the first forward (the inputs): the
allocator's peak, from torch.profiler's allocation records (bench/run_linear.py's
``peak_memory``, the gradients left in ``.grad`` not counted), and the peak RSS growth (the
process's high-water mark less its RSS before the runs; everything, BLAS buffers included). Times
are medians of forward plus backward over the reps (the slowest rank's, for the class-parallel
path); on this 2-core machine the P ranks share the cores, so a ratio near P is what P devices
would remove, not a speed-up measured here.

    python bench/run_class_parallel.py                     # bench/results/class-parallel-cpu.md
    python bench/run_class_parallel.py --quick --out DIR   # tiny shapes, a smoke test
    python bench/run_class_parallel.py --working-set       # chunk-sized tensors held, every loss

``--working-set``: in one process (a group of one), the allocator's peak of the class-parallel
linear + loss's forward plus backward for every catalogue loss and pair, with class indices and
with probability targets, in units of one chunk's logits (rows per chunk x K_r elements): what a
rank holds at once besides its gradients, whatever N and K are.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))

LOSS = "nce+rce"
BACKENDS = {"auto": "fused C++", "torch": "PyTorch"}  # the class-parallel path's two formulations
RESULTS = ROOT / "bench" / "results"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def shard_of(k: int, world: int, rank: int) -> tuple[int, int]:
    """torch.chunk's split of K classes: (offset, size) of rank's shard."""
    size = -(-k // world)
    return rank * size, max(0, min(k, (rank + 1) * size) - rank * size)


def worker(args) -> dict:
    """One process: build this rank's inputs, then time and measure forward + backward."""
    from run_linear import peak_memory

    from apl_kernels.distributed import class_parallel_linear_loss, class_parallel_loss
    from apl_kernels.functional import apl_loss
    from apl_kernels.linear import linear_loss

    torch.manual_seed(0)
    n, h, k, world, rank = args.rows, args.hidden, args.classes, args.world, args.rank
    parallel = world > 1
    if parallel:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=1800))
    offset, size = shard_of(k, world, rank) if parallel else (0, k)
    target = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(1))
    if args.workload == "loss":
        x = (torch.randn(n, size) * 3).requires_grad_()
        tensors = [x]

        def step():
            x.grad = None
            loss = (class_parallel_loss(x, target, LOSS, class_offset=offset, num_classes=k, backend=args.backend)
                    if parallel
                    else apl_loss(x, target, LOSS, backend=args.backend))
            loss.backward()
    else:
        hidden = torch.randn(n, h).requires_grad_()
        weight = (torch.randn(size, h) / h**0.5).requires_grad_()
        bias = torch.zeros(size).requires_grad_()
        tensors = [hidden, weight, bias]

        def step():
            for t in tensors:
                t.grad = None
            loss = (class_parallel_linear_loss(hidden, weight, target, LOSS, class_offset=offset, num_classes=k,
                                               bias_shard=bias, backend=args.backend) if parallel
                    else linear_loss(hidden, weight, target, LOSS, bias=bias, backend=args.backend))
            loss.backward()

    before = rss_bytes()
    step()  # a first call (lazy initializations) before the timings; its peak is a timed call's
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # (the warm-up's peak too)
    # (torch.profiler's memory records cost several times the inputs' memory at large shapes)
    allocated = peak_memory(step, lambda: [t.grad for t in tensors]) if args.allocator else None
    if parallel:
        dist.destroy_process_group()
    return {"rank": rank, "time": statistics.median(times), "rss": peak_rss, "allocated": allocated}


def working_set() -> str:
    """The ``--working-set`` table (the docstring)."""
    import torch.distributed as dist
    from run_linear import peak_memory

    from apl_kernels.catalogue import PAIRS, SINGLES
    from apl_kernels.distributed import class_parallel_linear_loss

    n, h, k, chunk = 256, 64, 8000, 64
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp(prefix='apl-working-set-')}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=600))
    torch.manual_seed(0)
    hidden, weight = torch.randn(n, h).requires_grad_(), (torch.randn(k, h) / h**0.5).requires_grad_()
    targets = {"class indices": torch.randint(0, k, (n,)), "probabilities": torch.randn(n, k).softmax(1)}
    columns = [(backend, kind) for backend in BACKENDS for kind in targets]
    lines = [f"Chunk-sized tensors held at the peak of forward plus backward (N = {n}, H = {h}, K_r = {k}, "
             f"{chunk} rows a chunk; `--working-set`):", "",
             "| loss | " + " | ".join(f"{kind}, {BACKENDS[backend]}" for backend, kind in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name in SINGLES + PAIRS:
        cells = []
        for backend, kind in columns:
            def step():
                hidden.grad = weight.grad = None
                class_parallel_linear_loss(hidden, weight, targets[kind], name, class_offset=0, num_classes=k,
                                           chunk_size=chunk, backend=backend).backward()
            peak = peak_memory(step, lambda: [hidden.grad, weight.grad])
            cells.append(f"{peak / (chunk * k * 4):.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    dist.destroy_process_group()
    return "\n".join(lines) + "\n"


def launch(args, workload: str, shape: tuple, world: int, backend: str = "auto") -> list[dict]:
    # The ranks meet in a file, not at a TCP port: a port found free can be taken before they meet.
    store = tempfile.mktemp(prefix="apl-class-parallel-store-")
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--workload", workload, "--world", str(world),
                               "--rank", str(r), "--store", store, "--backend", backend, "--rows", str(shape[0]),
                               "--hidden", str(shape[1]), "--classes", str(shape[2]), "--reps", str(args.reps)] + ([] if args.allocator else ["--no-allocator"]),
                              env=env, stdout=subprocess.PIPE, text=True) for r in range(world)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"a {workload} worker failed (exit {proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.0f}"


def ratio(x: float | None, y: float | None) -> str:
    return "" if x is None else f" ({x / y:.2f}x)" if y else " (-)"


def report(args, rows: list[tuple[str, tuple, list[dict], list[dict]]]) -> str:
    lines = [f"# Class-parallel losses on CPU: per-process memory and time ({LOSS}, mean, float32)", "",
             f"P = {args.world} gloo processes on {os.cpu_count()} cores, against one process "
             f"(`python bench/run_class_parallel.py{' ' + ' '.join(args.argv) if args.argv else ''}`). "
             "No GPU (NCCL) ran.", "",
             "| workload | N × H × K | path | peak allocated / process (MiB) | peak RSS growth / process (MiB) | "
             "forward + backward (s) |", "|---|---|---|---|---|---|"]
    backends = args.backend.split(",")
    for workload, (n, h, k), singles, parallel in rows:
        size = f"{n} × {h} × {k}" if workload == "linear" else f"{n} × {k}"
        for backend, single in zip(backends, singles):
            lines.append(f"| {workload} | {size} | single process, backend {backend} | {mib(single['allocated'])} | "
                         f"{mib(single['rss'])} | {single['time']:.3f} |")
        one = singles[0]  # the ratios: against the first backend's single process
        for backend, ranks in zip(backends, parallel):
            allocated = None if one["allocated"] is None else max(r["allocated"] for r in ranks)
            rss, slowest = max(r["rss"] for r in ranks), max(r["time"] for r in ranks)
            big = (lambda b: None if b is None or b < 2**20 else b)  # a ratio to less than 1 MiB says nothing
            lines.append(f"| {workload} | {size} | class-parallel, backend {backend}, largest of {len(ranks)} | "
                         f"{mib(allocated)}{ratio(allocated, big(one['allocated']))} | {mib(rss)}"
                         f"{ratio(rss, big(one['rss']))} | {slowest:.3f}{ratio(slowest, one['time'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=128000)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workloads", default="loss,linear")
    parser.add_argument("--linear-shape", default=None,
                        help="N,H,K of the linear workload (default: --rows, --hidden, --classes)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--no-allocator", dest="allocator", action="store_false",
                        help="skip the allocator's peak (torch.profiler), which costs memory at large shapes")
    parser.add_argument("--backend", default="auto",
                        help="backends of both paths, comma-separated (default: auto; the first one's single "
                             "process is the ratios' reference)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--working-set", action="store_true", help="chunk-sized tensors held, every loss (docstring)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--report", default="class-parallel-cpu.md", help="the report's file name in --out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--store", default="", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = [a for i, a in enumerate(argv) if a not in ("--out", "--report")
                 and (i == 0 or argv[i - 1] not in ("--out", "--report"))]
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.working_set:
        print(working_set())
        return 0
    if args.quick:
        args.rows, args.hidden, args.classes, args.reps = 64, 16, 1000, 1
    out = args.out or (RESULTS / "partial" if args.quick else RESULTS)
    shapes = {w: (args.rows, args.hidden, args.classes) for w in args.workloads.split(",")}
    if args.linear_shape and "linear" in shapes and not args.quick:
        shapes["linear"] = tuple(int(x) for x in args.linear_shape.split(","))
    rows = [(w, shape, [launch(args, w, shape, 1, b)[0] for b in args.backend.split(",")],
             [launch(args, w, shape, args.world, b) for b in args.backend.split(",")]) for w, shape in shapes.items()]
    text = report(args, rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / args.report).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
