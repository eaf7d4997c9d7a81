"""``python -m apl_kernels.reproduce``: the APL paper's noisy-label grid, resumable, with a report.

    python -m apl_kernels.reproduce --preset quick            # digits on CPU, minutes, offline
    python -m apl_kernels.reproduce --preset paper --data-dir ~/data --download   # CIFAR-10, GPU
    python -m apl_kernels.reproduce --preset paper --shard 3/8    # one eighth of the grid
    python -m apl_kernels.reproduce --report apl-results/cifar10  # tables and plots again

Output directory (``--out``): ``runs/<run>.json`` (one per finished run, written atomically),
``checkpoints/<run>.pt`` (the last epoch of an unfinished run), ``results.csv``, ``results.md``
and ``plots/*.png``. Running the same command again skips finished runs and continues unfinished
ones from their checkpoint. What is reproduced, and how, is docs/reproduction.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from ..catalogue import available_losses, canonical_name
from . import datasets
from .cost import estimate_cost
from .grid import build_grid, describe, finished, run_grid, shard
from .noise import NOISE_KINDS
from .report import load_records, write_report
from .settings import PRESETS, SETTINGS, UsageError, nrce_published_scale
from .train import ConfigMismatch, Options


def parse_noise(text: str) -> list[tuple[str, float]]:
    """``"sym:0.0,0.4 asym:0.2"`` -> ``[("sym", 0.0), ("sym", 0.4), ("asym", 0.2)]``."""
    example = "e.g. --noise sym:0.0,0.2,0.4 asym:0.1,0.2"
    cells: list[tuple[str, float]] = []
    for token in text.split():
        kind, colon, rates = token.partition(":")
        if not colon or kind not in NOISE_KINDS or not rates:
            raise UsageError(f"bad --noise {token!r}: write KIND:RATE[,RATE...] with KIND one of "
                             f"{', '.join(NOISE_KINDS)} ({example})")
        for rate_text in rates.split(","):
            try:
                rate = float(rate_text)
            except ValueError:
                rate = math.nan
            if not 0.0 <= rate <= 1.0:
                raise UsageError(f"bad --noise {token!r}: rate {rate_text!r} is not a number in [0, 1] "
                                 f"({example})")
            if (kind, rate) not in cells:
                cells.append((kind, rate))
    if not cells:
        raise UsageError(f"--noise is empty ({example})")
    return cells


def parse_losses(text: str) -> list[str]:
    names = []
    for item in text.split(","):
        try:
            name = canonical_name(item)
        except ValueError:
            raise UsageError(f"unknown loss {item.strip()!r} in --losses; available: "
                             f"{', '.join(available_losses())}") from None
        if name not in names:
            names.append(name)
    return names


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"bad --seeds {text!r}: write a comma-separated list of integers, e.g. 1,2,3") from None
    if any(s < 0 for s in seeds):
        raise UsageError(f"bad --seeds {text!r}: seeds must be >= 0")
    return list(dict.fromkeys(seeds))


def parse_shard(text: str) -> tuple[int, int]:
    index, slash, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        index, count = -1, 0
    if not slash or count < 1 or not 0 <= index < count:
        raise UsageError(f"bad --shard {text!r}: write INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 0/4")
    return index, count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m apl_kernels.reproduce",
        description="Train the APL paper's noisy-label grid and compare it with the published numbers.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                        help="paper: CIFAR-10, 23 losses x 9 noise cells x 3 seeds (621 runs, tens of "
                             "GPU-hours); quick: digits on CPU in minutes (default: paper)")
    parser.add_argument("--dataset", choices=sorted(datasets.DATASETS), help="override the preset's dataset")
    parser.add_argument("--losses", help="comma-separated loss names, e.g. ce,nce+rce")
    parser.add_argument("--noise", nargs="+", help="noise cells, e.g. sym:0.0,0.4 asym:0.2 "
                        f"(kinds: {', '.join(NOISE_KINDS)})")
    parser.add_argument("--seeds", help="comma-separated seeds, e.g. 1,2,3")
    parser.add_argument("--epochs", type=int, help="override the dataset's published number of epochs")
    parser.add_argument("--out", help="output directory (default: apl-results/DATASET)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the preset's, else cuda if available)")
    parser.add_argument("--backend", default="auto", help="loss backend (default: auto)")
    parser.add_argument("--data-dir", default="data", help="torchvision dataset root (default: ./data)")
    parser.add_argument("--download", action="store_true", help="download the dataset through torchvision")
    parser.add_argument("--shard", help="INDEX/COUNT: train only every COUNT-th run starting at INDEX")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and an estimate of their cost")
    parser.add_argument("--report", metavar="DIR", help="only rebuild tables and plots from results in DIR")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: the preset's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format (CUDA only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except (UsageError, ConfigMismatch, datasets.DatasetNotFound) as err:
        print(f"python -m apl_kernels.reproduce: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs and the last epoch of the current one are saved; "
              "run the same command again to continue", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
    if args.report:
        for path in write_report(args.report):
            print(path)
        return 0
    preset = PRESETS[args.preset]
    dataset = args.dataset or preset.dataset
    losses = parse_losses(args.losses) if args.losses else list(preset.losses)
    cells = parse_noise(" ".join(args.noise) if args.noise else preset.noise)
    seeds = parse_seeds(args.seeds or preset.seeds)
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"bad --epochs {args.epochs}: must be >= 1")
    epochs = args.epochs or SETTINGS[dataset].epochs
    for kind, _ in cells:
        if kind == "asym-sim" and dataset != "cifar10":
            raise UsageError(f"noise asym-sim is CIFAR-10's; the dataset is {dataset}")
    device = args.device or preset.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"bad --threads {args.threads}: must be >= 1")
    threads = args.threads or (preset.threads if dataset == preset.dataset else None)
    if threads:
        torch.set_num_threads(threads)
    options = Options(device=device, backend=args.backend, bf16=args.bf16,
                      channels_last=args.channels_last, compile=args.compile,
                      progress=not args.no_progress)
    try:
        torch.device(device)
    except RuntimeError:
        raise UsageError(f"bad --device {device!r}: write cpu, cuda or cuda:N") from None
    try:
        options.check()
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = Path(args.out or f"apl-results/{dataset}")
    runs = build_grid(dataset, losses, cells, seeds, epochs)
    if args.shard:
        index, count = parse_shard(args.shard)
        runs = shard(runs, index, count)
    done = sum(finished(out, run) for run in runs)
    shard_text = f" (shard {args.shard})" if args.shard else ""
    print(f"{len(runs)} runs{shard_text}, {done} already done: {dataset}, {len(losses)} losses, "
          f"{len(cells)} noise cells, seeds {','.join(map(str, seeds))}, {epochs} epochs; device "
          f"{device}, loss backend {args.backend}; results in {out}")
    if "nrce" in losses:
        print(f"note: NRCE alone trains at the published code's effective scale A(K-1)^2/4 = "
              f"{nrce_published_scale(datasets.DATASETS[dataset].num_classes):.3f}, A = -ln(1e-4)")
    if args.dry_run:
        print(describe(runs, out))
        pending = [run for run in runs if not finished(out, run)]
        print(estimate_cost(pending, device, args.backend))
        return 0
    started = time.perf_counter()
    trained = run_grid(runs, out, options, args.data_dir, args.download)
    print(f"trained {len(trained)} runs in {time.perf_counter() - started:.0f} s")
    if load_records(out):
        for path in write_report(out):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
