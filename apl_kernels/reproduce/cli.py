"""``python -m apl_kernels.reproduce``: the noisy-label grids of the APL paper and of the later
families, resumable, with a report.

    python -m apl_kernels.reproduce --preset quick            # digits on CPU, minutes, offline
    python -m apl_kernels.reproduce --preset paper --data-dir ~/data --download   # CIFAR-10, GPU
    python -m apl_kernels.reproduce --preset paper --dataset cifar100 --dry-run --json   # the plan
    python -m apl_kernels.reproduce --preset paper --shard 3/8    # one eighth of the grid
    python -m apl_kernels.reproduce --report apl-results/cifar10  # tables and plots again

Output directory (``--out``): ``runs/<run>.json`` (one per finished run, written atomically),
``checkpoints/<run>.pt`` (the last epoch of an unfinished run), ``locks/``, ``results.csv``,
``results.md`` and ``plots/*.png``. Running the same command again skips finished runs and
continues unfinished ones from their checkpoint. What is reproduced, and how, is
docs/reproduction.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ..batch_losses import BATCH_LOSSES, batch_loss_name
from ..catalogue import available_losses, canonical_name
from . import datasets, store, webvision, webvision_grid
from .cost import choose_threads, estimate_cost
from .grid import build_grid, describe, plan, result_path, run_grid, shard, status
from .noise import HUMAN_LABEL_SETS, NOISE_KINDS
from .report import files_line, headline, load_record, summarize, write_report
from .settings import PRESETS, VARIANTS, UsageError, nrce_published_scale
from .train import ConfigMismatch, Options


def parse_noise(text: str, dataset: str | None = None) -> list[tuple[str, float | str]]:
    """``"sym:0.0,0.4 asym:0.2 human:aggre"`` -> ``[("sym", 0.0), ("sym", 0.4), ("asym", 0.2),
    ("human", "aggre")]``; with ``dataset``, also checks that the kinds exist for it."""
    example = "e.g. --noise sym:0.0,0.2,0.4 asym:0.1,0.2 (or human:aggre,worse for CIFAR-10N)"
    cells: list[tuple[str, float | str]] = []
    for token in text.split():
        kind, colon, rates = token.partition(":")
        if not colon or kind not in NOISE_KINDS or not rates:
            raise UsageError(f"bad --noise {token!r}: write KIND:RATE[,RATE...] with KIND one of "
                             f"{', '.join(NOISE_KINDS)} ({example})")
        for rate_text in rates.split(","):
            if kind == "human":
                if dataset is not None and dataset not in HUMAN_LABEL_SETS:
                    raise UsageError(f"human noise is CIFAR-10N's and CIFAR-100N's; the dataset is {dataset}")
                if dataset is not None and rate_text not in HUMAN_LABEL_SETS[dataset]:
                    raise UsageError(f"bad --noise {token!r}: {datasets.DATASETS[dataset].title}'s human label "
                                     f"sets are {', '.join(HUMAN_LABEL_SETS[dataset])}")
                rate: float | str = rate_text
            else:
                try:
                    rate = float(rate_text)
                except ValueError:
                    rate = math.nan
                if not 0.0 <= rate <= 1.0:
                    raise UsageError(f"bad --noise {token!r}: rate {rate_text!r} is not a number in [0, 1] "
                                     f"({example})")
                if kind == "asym-sim" and dataset not in (None, "cifar10"):
                    raise UsageError(f"noise asym-sim is CIFAR-10's; the dataset is {dataset}")
            if (kind, rate) not in cells:
                cells.append((kind, rate))
    if not cells:
        raise UsageError(f"--noise is empty ({example})")
    return cells
def parse_losses(text: str) -> list[str]:
    names = []
    for item in text.split(","):
        try:
            name = batch_loss_name(item) or canonical_name(item)
        except ValueError:
            raise UsageError(f"unknown loss {item.strip()!r} in --losses; available: "
                             f"{', '.join(available_losses() + list(BATCH_LOSSES))}") from None
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
        description="Train the noisy-label grids of the APL paper (and of the losses that followed it) "
                    "and compare them with the published numbers.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                        help="; ".join(f"{name}: {preset.help}" for name, preset in PRESETS.items())
                             + " (default: paper)")
    parser.add_argument("--dataset", choices=sorted(datasets.DATASETS), help="override the preset's dataset")
    parser.add_argument("--settings", choices=VARIANTS, default="paper",
                        help="paper: the settings and loss parameters that produced the paper's numbers "
                             "(the pre-release code); released: the released configs' (MNIST weight decay "
                             "1e-2 with Nesterov, CIFAR-100 ResNet-50, their CIFAR-10/100 parameters) "
                             "(default: paper)")
    parser.add_argument("--losses", help="comma-separated loss names, e.g. ce,nce+rce")
    parser.add_argument("--noise", nargs="+", help="noise cells, e.g. sym:0.0,0.4 asym:0.2 human:aggre "
                        f"(kinds: {', '.join(NOISE_KINDS)})")
    parser.add_argument("--seeds", help="comma-separated seeds, e.g. 1,2,3")
    parser.add_argument("--epochs", type=int, help="override the dataset's published number of epochs")
    parser.add_argument("--l1", type=float, metavar="DELTA",
                        help="add DELTA * sum|theta| over every model parameter to the loss (as ANL does) "
                             "in every run (default: only the ANL losses, with their published DELTA)")
    parser.add_argument("--out", help="output directory (default: apl-results/DATASET, "
                                      "apl-results/DATASET-released with --settings released)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the preset's, else cuda if available)")
    parser.add_argument("--backend", default="auto", help="loss backend: auto, torch, cpp, cuda, triton (default: auto)")
    parser.add_argument("--data-dir", default="data",
                        help="dataset root: torchvision's layouts and CIFAR-N's label files (default: ./data)")
    parser.add_argument("--download", action="store_true", help="download the dataset through torchvision")
    parser.add_argument("--shard", help="INDEX/COUNT: train only every COUNT-th run starting at INDEX")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and an estimate of their cost")
    parser.add_argument("--json", action="store_true",
                        help="with --dry-run: print the run plan as JSON lines, one per run, and nothing else "
                             "on stdout")
    parser.add_argument("--report", metavar="DIR", help="only rebuild tables and plots from results in DIR")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: the quick preset 1; otherwise, on CPU, measured "
                             "at start: 1, 2, 4, ... up to all cores, the count that trains the grid's network "
                             "at its batch size fastest)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (on CUDA; --preset webvision also on CPU)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format (on CUDA; --preset webvision also on CPU)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars: a line per finished run and per minute of a long run instead "
                             "(also when the output is not a terminal)")
    webvision_grid.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except (UsageError, ConfigMismatch, datasets.DatasetNotFound, webvision.ImageUnreadable) as err:
        print(f"python -m apl_kernels.reproduce: error: {err}", file=sys.stderr)
        return 2
    except store.WriteError as err:
        print(f"python -m apl_kernels.reproduce: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs and the last epoch of the current one are saved; "
              "run the same command again to continue", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
    if args.report:
        report = webvision_grid.write_report if webvision_grid.is_results_dir(args.report) else write_report
        for path in report(args.report):
            print(path)
        return 0
    preset = PRESETS[args.preset]
    if args.preset == "webvision":
        return webvision_grid.main(args)
    dataset = args.dataset or preset.dataset
    losses = parse_losses(args.losses) if args.losses else list(preset.loss_list(dataset))
    cells = parse_noise(" ".join(args.noise) if args.noise else preset.noise, dataset)
    seeds = parse_seeds(args.seeds or preset.seeds)
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"bad --epochs {args.epochs}: must be >= 1")
    if args.l1 is not None and not 0.0 <= args.l1 < math.inf:
        raise UsageError(f"bad --l1 {args.l1}: the penalty delta must be a number >= 0, e.g. --l1 5e-5")
    if args.json and not args.dry_run:
        raise UsageError("--json prints the run plan of --dry-run: add --dry-run")
    device = args.device or preset.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"bad --threads {args.threads}: must be >= 1")
    try:
        torch.device(device)
    except RuntimeError:
        raise UsageError(f"bad --device {device!r}: write cpu, cuda or cuda:N") from None
    options = Options(device=device, backend=args.backend, bf16=args.bf16,
                      channels_last=args.channels_last, compile=args.compile,
                      progress=not args.no_progress)
    try:
        options.check()
    except ValueError as err:
        raise UsageError(str(err).splitlines()[0]) from None
    suffix = "-released" if args.settings == "released" else ""
    out = Path(args.out or f"apl-results/{dataset}{suffix}")
    store.prepare_output(out, create=not args.dry_run)
    runs = build_grid(dataset, losses, cells, seeds, args.epochs, args.settings, args.l1)
    if args.shard:
        index, count = parse_shard(args.shard)
        runs = shard(runs, index, count)
    done = sum(status(out, run) == "done" for run in runs)
    epochs = sorted({run.epochs for run in runs})
    shard_text = f" (shard {args.shard})" if args.shard else ""
    summary = [f"{len(runs)} runs{shard_text}, {done} already done: {dataset}, {len(losses)} losses, "
               f"{len(cells)} noise cells, seeds {','.join(map(str, seeds))}, {'/'.join(map(str, epochs))} epochs, "
               f"{args.settings} settings; device {device}, loss backend {args.backend}; results in {out}"]
    if "nrce" in losses:
        summary.append(f"note: NRCE alone trains at the published code's effective scale A(K-1)^2/4 = "
                       f"{nrce_published_scale(datasets.DATASETS[dataset].num_classes):.3f}, A = -ln(1e-4)")
    if args.preset == "anl":
        summary.append("note: the anl preset trains the later families' published configs; their WebVision "
                       "configs are --preset webvision's")
    human = any(kind == "human" for kind, _ in cells)
    problem = None if dataset == "digits" else datasets.missing(dataset, args.data_dir, human)
    if not args.dry_run:
        print("\n".join(summary))
        if problem and args.download:  # now, before timing threads: a failed download stops at once
            datasets.load_arrays(dataset, args.data_dir, download=True)
            problem = datasets.missing(dataset, args.data_dir, human)
        if problem:
            raise datasets.DatasetNotFound(problem)
    threads = args.threads or (preset.threads if dataset == preset.dataset else None)
    if threads is None and torch.device(device).type == "cpu" and runs and not args.json:
        threads, line = choose_threads(dataset, args.backend, runs[0].settings.model)
        if args.dry_run:
            summary.append(line)
        else:
            print(line)
    if threads:
        torch.set_num_threads(threads)
    if args.dry_run:
        blocking = problem and datasets.missing(dataset, args.data_dir, human, download=args.download)
        return _dry_run(runs, out, summary, problem, blocking, args, device)
    started = time.perf_counter()
    trained = run_grid(runs, out, options, args.data_dir, args.download)
    print(f"trained {len(trained)} runs in {time.perf_counter() - started:.0f} s")
    records = []
    for run in runs:
        try:
            records.append(load_record(result_path(out, run)))
        except (OSError, ValueError):
            pass  # not done (another shard's), or damaged: write_report names it
    if records:
        write_report(out)
        rows = summarize(records)
        print()
        print(headline(rows))
        print(f"\n{files_line(rows, out)}")
    return 0


def _dry_run(runs, out: Path, summary: list[str], problem: str | None, blocking: str | None,
             args: argparse.Namespace, device: str) -> int:
    """The plan (``--json``: one JSON line per run on stdout, the rest on stderr), then its summary:
    the runs, the data missing, the estimated cost. :class:`datasets.DatasetNotFound` after it if
    data the grid needs is missing and ``--download`` cannot fetch it."""
    log = sys.stderr if args.json else sys.stdout  # with --json, stdout is the plan alone
    print("\n".join(json.dumps(plan(run, out)) for run in runs) if args.json else describe(runs, out))
    if problem:
        summary.append(f"data: {blocking}" if blocking else
                       f"data: not in {args.data_dir} yet; --download fetches it before training starts")
    if not args.json:
        summary.append(estimate_cost([run for run in runs if status(out, run) != "done"], device, args.backend))
    print("\n".join(summary), file=log)
    log.flush()
    if blocking:
        raise datasets.DatasetNotFound("the data of this plan is missing: the data: line above says how to get it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
