"""The per-call cost of a fused loss at a small batch: ``python bench/run_small.py``.

At (128, 10) (CIFAR-10's training batch) a fused loss's arithmetic takes a few microseconds; what a
call costs beyond it is the Python of the autograd path, the op's dispatch and its allocations. This
times, in one process, forward plus backward (and forward alone) of a loss module on ``cpp``
against ``F.cross_entropy`` on the same inputs: medians of ``--calls`` calls, the implementations
interleaved call by call (so that the machine's load falls on each alike), in ``--rounds`` rounds.
``--profile`` prints torch.profiler's table (self CPU time per operator and Python function) over
``--profile-calls`` forward plus backward calls of the fused loss.

    python bench/run_small.py                              # nce+mae at 128 x 10, float32
    python bench/run_small.py --loss nce+rce --shape 128 100 --dtype bfloat16
    python bench/run_small.py --profile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import apl_kernels as ak  # noqa: E402


def forward_backward(fn, logits, target):
    x = logits.detach().requires_grad_()
    fn(x, target).backward()


def forward(fn, logits, target):
    with torch.no_grad():
        fn(logits, target)


def medians(functions: dict, logits, target, calls: int, rounds: int) -> dict:
    """Each function's median time per call (seconds) over ``calls`` interleaved calls per round, the
    median over rounds."""
    results = {name: [] for name in functions}
    for _ in range(rounds):
        times = {name: [] for name in functions}
        for _ in range(calls):
            for name, fn in functions.items():
                start = time.perf_counter()
                fn(logits, target)
                times[name].append(time.perf_counter() - start)
        for name in functions:
            results[name].append(statistics.median(times[name]))
    return {name: statistics.median(values) for name, values in results.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", default="nce+mae")
    parser.add_argument("--shape", nargs=2, type=int, default=(128, 10), metavar=("N", "K"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-calls", type=int, default=300)
    args = parser.parse_args(argv)
    n, k = args.shape
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, k, generator=g) * 3).to(getattr(torch, args.dtype))
    target = torch.randint(0, k, (n,), generator=g)
    criterion = ak.get_loss(args.loss, backend="cpp")
    for _ in range(50):  # warm-up: the extension's load, caches
        forward_backward(criterion, logits, target)
        forward_backward(F.cross_entropy, logits, target)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], with_stack=False) as prof:
            for _ in range(args.profile_calls):
                forward_backward(criterion, logits, target)
        print(f"torch.profiler, {args.profile_calls} forward+backward calls of {args.loss} (cpp) at {n} x {k} "
              f"{args.dtype}; times are totals over the calls")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    timed = {
        f"{args.loss} cpp, forward+backward": lambda z, y: forward_backward(criterion, z, y),
        "cross_entropy, forward+backward": lambda z, y: forward_backward(F.cross_entropy, z, y),
        f"{args.loss} cpp, forward": lambda z, y: forward(criterion, z, y),
        "cross_entropy, forward": lambda z, y: forward(F.cross_entropy, z, y),
    }
    result = medians(timed, logits, target, args.calls, args.rounds)
    print(f"{args.loss} at {n} x {k} {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads: "
          f"medians of {args.calls} interleaved calls, median of {args.rounds} rounds")
    print("| call | median (us) | x cross_entropy |\n|---|---:|---:|")
    names = list(timed)
    for i, name in enumerate(names):
        baseline = result[names[i | 1]]
        print(f"| {name} | {result[name] * 1e6:.1f} | {result[name] / baseline:.2f} |")


if __name__ == "__main__":
    main()
