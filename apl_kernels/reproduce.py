"""``python -m apl_kernels.reproduce``: the APL paper's noisy-label grid, resumable, with a report.

    python -m apl_kernels.reproduce --preset quick            # digits on CPU, minutes, offline
    python -m apl_kernels.reproduce --preset paper --data-dir ~/data --download   # CIFAR-10, GPU
    python -m apl_kernels.reproduce --preset paper --shard 3/8    # one eighth of the grid
    python -m apl_kernels.reproduce --report apl-results/cifar10  # tables and plots again

Output directory (``--out``): ``runs/<run>.json`` (one per finished run, written atomically),
``checkpoints/<run>.pt`` (the last epoch of an unfinished run), ``results.csv``, ``results.md``
and ``plots/*.png``. Running the same command again skips finished runs and continues unfinished
ones from their checkpoint. The contract is ``../shared/spec/reproduction.md``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as datasets
from .catalogue import FOCAL, available_losses, canonical_name
from .noise import NOISE_KINDS
from .train import SETTINGS, ConfigMismatch, Options, RunConfig, atomic_write, train_run

A = -math.log(1e-4)  # the RCE constant of the published code, -ln(1e-4)
PAPER_DATASET = "cifar10"


class UsageError(Exception):
    """Bad command-line input; the message says what to do instead."""


# ----------------------------------------------------------------------------------------------
# The published numbers and loss parameters

def paper_results() -> list[dict]:
    """The paper's table rows (dataset, noise, rate, loss, mean, std), from the package data."""
    text = resources.files("apl_kernels").joinpath("data/apl_icml2020_results.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    for row in rows:
        row["rate"], row["mean"], row["std"] = float(row["rate"]), float(row["mean"]), float(row["std"])
    return rows


def paper_losses(dataset: str = PAPER_DATASET) -> tuple[str, ...]:
    """The paper's loss rows for ``dataset`` that the catalogue has, in the paper's order."""
    catalogue = set(available_losses())
    names = dict.fromkeys(row["loss"] for row in paper_results() if row["dataset"] == dataset)
    return tuple(name for name in names if name in catalogue)


SYMMETRIC_KINDS = ("sym", "uniform")
MEMBER_PARAMS = {"fl": {"gamma": 0.5}, "nfl": {"gamma": 0.5}, "gce": {"q": 0.7}, "ngce": {"q": 0.1}}


def nrce_published_scale(num_classes: int) -> float:
    """The published code's NRCE is ``A (K-1)^2 / 4`` times the exact one (losses.md)."""
    return A * (num_classes - 1) ** 2 / 4


# The published code's NMAE divides by 2(K-1), half the exact normalization (losses.md).
NMAE_PUBLISHED_SCALE = 0.5


def loss_params(loss: str, noise: str, num_classes: int) -> dict:
    """The published CIFAR-10 parameters of ``loss`` (the spec's "CIFAR-10 loss parameters").

    Every pair alpha = beta = 1; FL/NFL gamma 0.5 with the published gradient; GCE q 0.7;
    NGCE q 0.1; SCE alpha 0.1, beta 1; NFL alone scale 10 under symmetric noise and 1 under
    asymmetric; NRCE and NMAE alone the published code's effective scales (they trained the
    paper's numbers); every other single scale 1.
    """
    if loss == "sce":
        return {"alpha": 0.1, "beta": 1.0}
    members = loss.split("+")
    params: dict = {}
    for member in members:
        params.update(MEMBER_PARAMS.get(member, {}))
    if any(member in FOCAL for member in members):
        params["official_grad"] = True
    if len(members) == 2:
        params.update(alpha=1.0, beta=1.0)
    elif loss == "nfl":
        params["scale"] = 10.0 if noise in SYMMETRIC_KINDS else 1.0
    elif loss == "nrce":
        params["scale"] = nrce_published_scale(num_classes)
    elif loss == "nmae":
        params["scale"] = NMAE_PUBLISHED_SCALE
    return params


# ----------------------------------------------------------------------------------------------
# Presets and the grid

@dataclass(frozen=True)
class Preset:
    dataset: str
    losses: tuple[str, ...]
    noise: str
    seeds: str
    device: str | None  # None: CUDA when available
    threads: int | None  # CPU threads; None: torch's default


PRESETS = {
    "paper": Preset(PAPER_DATASET, paper_losses(), "sym:0.0,0.2,0.4,0.6,0.8 asym:0.1,0.2,0.3,0.4",
                    "1,2,3", device=None, threads=None),
    # The small digits network gains little from a second CPU thread and loses much when the
    # cores are shared (threads wait on each other): one thread.
    "quick": Preset("digits", ("ce", "nce", "mae", "rce", "nce+mae", "nce+rce", "nfl+rce"),
                    "sym:0.0,0.4,0.8 asym:0.2", "1", device="cpu", threads=1),
}


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


def build_grid(dataset: str, losses, cells, seeds, epochs: int) -> list[RunConfig]:
    """Every run, seed-major: a full table with one seed is done first."""
    num_classes = datasets.DATASETS[dataset].num_classes
    return [RunConfig(dataset, loss, kind, rate, seed, epochs, loss_params(loss, kind, num_classes))
            for seed in seeds for kind, rate in cells for loss in losses]


def shard(runs: list[RunConfig], index: int, count: int) -> list[RunConfig]:
    """Shard ``index`` of ``count``: every ``count``-th run, so shards cost about the same."""
    return runs[index::count]


# ----------------------------------------------------------------------------------------------
# Files

def result_path(out: Path, run: RunConfig) -> Path:
    return out / "runs" / f"{run.run_id}.json"


def checkpoint_path(out: Path, run: RunConfig) -> Path:
    return out / "checkpoints" / f"{run.run_id}.pt"


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def load_record(path: Path) -> dict:
    return json.loads(path.read_text())


def finished(out: Path, run: RunConfig) -> bool:
    """Whether ``run`` has its result file; raise if that file is of other settings."""
    path = result_path(out, run)
    if not path.exists():
        return False
    stored = load_record(path)["config"]
    if stored != json.loads(json.dumps(run.to_dict())):
        changed = sorted(k for k in stored if stored[k] != run.to_dict().get(k))
        raise ConfigMismatch(f"{path} was trained with other settings ({', '.join(changed)} differ); "
                             f"use another --out or delete that directory")
    return True


# ----------------------------------------------------------------------------------------------
# Cost estimate

def forward_macs(model: torch.nn.Module, input_shape) -> int:
    """Multiply-accumulates of one image through the convolutions and linear layers."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.weight[0].numel()  # in_channels / groups * kh * kw
            total += output[0].numel() * kernel
        else:
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for hook in hooks:
        hook.remove()
    return total


def measure_step_seconds(dataset: str, device: str, backend: str, steps: int = 3) -> float:
    """Seconds per training step (batch of the spec, CE) of the dataset's network on ``device``."""
    from .models import build_model
    from .nn import get_loss

    info, settings = datasets.DATASETS[dataset], SETTINGS[dataset]
    model = build_model(settings.model, info.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    criterion = get_loss("ce", backend=backend)
    x = torch.randn(settings.batch_size, *info.image_shape, device=device)
    y = torch.randint(0, info.num_classes, (settings.batch_size,), device=device)
    for step in range(steps + 1):
        if step == 1:  # the first step warms up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def estimate_cost(runs: list[RunConfig], device: str, backend: str) -> str:
    """A few lines: training FLOPs of ``runs`` and their time at a step time measured on ``device``."""
    if not runs:
        return "nothing to train"
    from .models import build_model

    dataset = runs[0].dataset
    info, settings = datasets.DATASETS[dataset], SETTINGS[dataset]
    macs = forward_macs(build_model(settings.model, info.num_classes), info.image_shape)
    epochs = sum(run.epochs for run in runs)
    # Training is about 3 forward passes (forward, backward to inputs, backward to weights);
    # the test set is one forward pass per epoch.
    flops = 2 * macs * epochs * (3 * info.train_size + info.test_size)
    step = measure_step_seconds(dataset, device, backend)
    steps_per_epoch = math.ceil(info.train_size / settings.batch_size)
    seconds = epochs * step * (steps_per_epoch + info.test_size / settings.batch_size / 3)
    return (f"{len(runs)} runs, {epochs} epochs in all, on the full {info.title} "
            f"({info.train_size} training images): {settings.model} does {macs / 1e6:.1f} MMAC per "
            f"image, so about {flops / 1e15:,.1f} PFLOP of training.\n"
            f"Measured here: {step * 1e3:.0f} ms per training step of {settings.batch_size} on {device}, "
            f"so about {seconds / 3600:.1f} hours on this device (an estimate: {steps_per_epoch} steps "
            f"and a test pass per epoch at that speed; nothing else measured).")


# ----------------------------------------------------------------------------------------------
# Report: results.csv, results.md, plots

def load_records(out: Path) -> list[dict]:
    paths = sorted((out / "runs").glob("*.json"))
    return [load_record(path) for path in paths]


def summarize(records: list[dict]) -> list[dict]:
    """One row per (dataset, noise, rate, loss): mean ± population std over seeds, the paper's number."""
    paper = {(r["dataset"], r["noise"], r["rate"], r["loss"]): r for r in paper_results()}
    cells: dict[tuple, list[dict]] = {}
    for record in records:
        c = record["config"]
        cells.setdefault((c["dataset"], c["noise"], c["rate"], c["loss"]), []).append(record)
    rows = []
    for (dataset, noise, rate, loss), group in cells.items():
        final = [r["final_test_acc"] for r in group if r["status"] == "finished"]
        best = [r["best_test_acc"] for r in group if r["best_test_acc"] is not None]
        published = paper.get((dataset, noise, rate, loss))
        mean = float(np.mean(final)) if final else None
        rows.append({
            "dataset": dataset, "noise": noise, "rate": rate, "loss": loss,
            "epochs": group[0]["config"]["epochs"],
            "seeds": len(final), "diverged": sum(r["status"] == "diverged" for r in group),
            "mean": mean, "std": float(np.std(final)) if final else None,
            "best_epoch_mean": float(np.mean(best)) if best else None,
            "realized_noise": float(np.mean([r["noise"]["realized_rate"] for r in group])),
            "paper_mean": published["mean"] if published else None,
            "paper_std": published["std"] if published else None,
            "diff": mean - published["mean"] if published and mean is not None else None,
        })
    noise_order = list(NOISE_KINDS)
    loss_order = {name: i for i, name in enumerate(available_losses())}
    paper_order = {name: i for i, name in enumerate(paper_losses())}
    rows.sort(key=lambda r: (r["dataset"], noise_order.index(r["noise"]), r["rate"],
                             paper_order.get(r["loss"], len(paper_order) + loss_order[r["loss"]])))
    return rows


CSV_COLUMNS = ("dataset", "noise", "rate", "loss", "epochs", "seeds", "diverged", "mean", "std",
               "best_epoch_mean", "realized_noise", "paper_mean", "paper_std", "diff")


def results_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v))
                         for k, v in row.items()})
    return buffer.getvalue()


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def cell_label(kind: str, rate: float) -> str:
    return "clean" if rate == 0.0 else f"{kind} {rate:g}"


def _cell_text(row: dict) -> str:
    if row["mean"] is None:
        text = "diverged"
    else:
        text = f"{row['mean']:.2f}" + (f" ± {row['std']:.2f}" if row["seeds"] > 1 else "")
        if row["diverged"]:
            text += f" ({row['diverged']} diverged)"
    if row["paper_mean"] is not None:
        diff = "" if row["diff"] is None else f", {row['diff']:+.2f}"
        text += f" (paper {row['paper_mean']:.2f}{diff})"
    return text


def notes(rows: list[dict], records: list[dict]) -> list[str]:
    """What a reader must know to read the tables."""
    lines = []
    datasets_seen = sorted({r["dataset"] for r in rows})
    for dataset in datasets_seen:
        published = SETTINGS[dataset].epochs
        epochs = sorted({r["epochs"] for r in rows if r["dataset"] == dataset})
        if dataset != PAPER_DATASET:
            lines.append(f"{dataset}: the loss parameters are the paper's CIFAR-10 ones; paper numbers "
                         f"are shown only where the paper has this dataset and cell.")
        if epochs != [published]:
            lines.append(f"{dataset}: trained {', '.join(map(str, epochs))} epoch(s), the published "
                         f"setting is {published}: differences from the paper are not like for like.")
    losses = {r["loss"] for r in rows}
    if "nrce" in losses:
        scales = sorted({rec["config"]["loss_params"]["scale"] for rec in records
                         if rec["config"]["loss"] == "nrce"})
        lines.append("NRCE alone trains at the published code's effective scale A(K-1)^2/4 with "
                     f"A = -ln(1e-4) (= {', '.join(f'{s:.3f}' for s in scales)}), not at scale 1: the "
                     "published code multiplies RCE by (K-1)/4 instead of dividing by A(K-1).")
    if "nmae" in losses:
        lines.append(f"NMAE alone trains at the published code's effective scale {NMAE_PUBLISHED_SCALE} "
                     "(its 1 / (2(K-1)) normalization), not at scale 1.")
    if "nfl" in losses:
        lines.append("NFL alone: scale 10 under symmetric noise, 1 under asymmetric (published configs).")
    if any(r["noise"] == "asym" and r["dataset"] == "cifar10" for r in rows):
        lines.append("CIFAR-10 asym is the published sequential flipping (realized cat noise about "
                     "rate*(1-rate)); asym-sim draws every flip from the clean labels.")
    lines.append("Accuracy: clean test accuracy (%) at the last epoch, mean ± population std over "
                 "seeds; best_epoch_mean in results.csv is the mean of each run's best epoch "
                 "(selected on the test set, so optimistic).")
    return lines


def results_markdown(rows: list[dict], records: list[dict]) -> str:
    lines = ["# APL reproduction results", ""]
    lines += [f"- {line}" for line in notes(rows, records)] + [""]
    for dataset in sorted({r["dataset"] for r in rows}):
        dataset_rows = [r for r in rows if r["dataset"] == dataset]
        for kind in NOISE_KINDS:
            kind_rows = [r for r in dataset_rows if r["noise"] == kind]
            if not kind_rows:
                continue
            rates = sorted({r["rate"] for r in kind_rows})
            losses = list(dict.fromkeys(r["loss"] for r in kind_rows))
            by_cell = {(r["loss"], r["rate"]): r for r in kind_rows}
            seeds = max(r["seeds"] for r in kind_rows)
            lines += [f"## {datasets.DATASETS[dataset].title}, {kind} noise "
                      f"({plural(kind_rows[0]['epochs'], 'epoch')}, {plural(seeds, 'seed')})", ""]
            lines.append("| loss | " + " | ".join(cell_label(kind, rate) for rate in rates) + " |")
            lines.append("|---|" + "---|" * len(rates))
            for loss in losses:
                cells = [_cell_text(by_cell[loss, rate]) if (loss, rate) in by_cell else "" for rate in rates]
                lines.append(f"| {loss} | " + " | ".join(cells) + " |")
            realized = [np.mean([r["realized_noise"] for r in kind_rows if r["rate"] == rate]) for rate in rates]
            lines.append("| *realized noise* | " + " | ".join(f"{v:.3f}" for v in realized) + " |")
            lines.append("")
    return "\n".join(lines)


def write_plots(rows: list[dict], records: list[dict], plots: Path) -> list[Path]:
    """Test accuracy by epoch per noise cell, and the grid as a heat map; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    written = []
    curves: dict[tuple, dict[str, list]] = {}
    row_order = {(r["dataset"], r["noise"], r["rate"], r["loss"]): i for i, r in enumerate(rows)}
    records = sorted(records, key=lambda rec: row_order[tuple(rec["config"][k] for k in
                                                              ("dataset", "noise", "rate", "loss"))])
    for record in records:
        c = record["config"]
        curves.setdefault((c["dataset"], c["noise"], c["rate"]), {}).setdefault(c["loss"], []).append(
            record["history"]["test_acc"])
    for (dataset, kind, rate), by_loss in sorted(curves.items()):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for loss, histories in by_loss.items():
            length = max(len(h) for h in histories)
            padded = np.array([[np.nan if a is None else a for a in h] + [np.nan] * (length - len(h))
                               for h in histories], dtype=float)
            with np.errstate(all="ignore"):
                mean = np.nanmean(padded, axis=0) if np.isfinite(padded).any() else padded[0]
            axes.plot(np.arange(1, length + 1), mean, label=loss)
        axes.set(xlabel="epoch", ylabel="clean test accuracy (%)",
                 title=f"{datasets.DATASETS[dataset].title}, {cell_label(kind, rate)}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, ncol=2)
        path = plots / f"test_acc_{dataset}_{kind}{float(rate)}.png"
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

    for dataset in sorted({r["dataset"] for r in rows}):
        dataset_rows = [r for r in rows if r["dataset"] == dataset]
        columns = list(dict.fromkeys((r["noise"], r["rate"]) for r in dataset_rows))
        losses = list(dict.fromkeys(r["loss"] for r in dataset_rows))
        by_cell = {(r["loss"], r["noise"], r["rate"]): r for r in dataset_rows}

        def grid(key):
            return np.array([[np.nan if (row := by_cell.get((loss, *col))) is None or row[key] is None
                              else row[key] for col in columns] for loss in losses], dtype=float)

        panels = [("mean", "ours: test accuracy (%)", "viridis")]
        if np.isfinite(grid("diff")).any():
            panels.append(("diff", "ours minus paper (points)", "RdBu"))
        figure, all_axes = plt.subplots(1, len(panels), squeeze=False,
                                        figsize=(1.0 + 0.9 * len(columns) * len(panels), 1.2 + 0.32 * len(losses)))
        for axes, (key, title, cmap) in zip(all_axes[0], panels):
            values = grid(key)
            if key == "diff":  # symmetric about 0
                low = -np.nanmax(np.abs(values))
                high = -low
            else:  # accuracies on one 0-100 % scale
                low, high = 0.0, 100.0
            image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto", vmin=low, vmax=high)
            for i, j in np.ndindex(values.shape):
                if np.isfinite(values[i, j]):
                    red, green, blue, _ = image.cmap(image.norm(values[i, j]))
                    dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                    axes.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=6,
                              color="white" if dark else "black")
            axes.set_xticks(range(len(columns)), [cell_label(*col) for col in columns], rotation=45,
                            ha="right", fontsize=7)
            axes.set_yticks(range(len(losses)), losses, fontsize=7)
            axes.set_title(title, fontsize=9)
            figure.colorbar(image, ax=axes, fraction=0.046)
        figure.suptitle(f"{datasets.DATASETS[dataset].title}: last-epoch clean test accuracy", fontsize=10)
        figure.tight_layout()
        path = plots / f"grid_{dataset}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def write_report(out: str | Path) -> list[Path]:
    """(Re)build ``results.csv``, ``results.md`` and the plots from ``out/runs/*.json``."""
    out = Path(out)
    records = load_records(out)
    if not records:
        raise UsageError(f"no run results in {out / 'runs'}; train a grid first (--out {out})")
    rows = summarize(records)
    atomic_write_text(out / "results.csv", results_csv(rows))
    atomic_write_text(out / "results.md", results_markdown(rows, records))
    return [out / "results.csv", out / "results.md", *write_plots(rows, records, out / "plots")]


# ----------------------------------------------------------------------------------------------
# Running a grid

def run_grid(runs: list[RunConfig], out: str | Path, options: Options, data_dir: str | Path = "data",
             download: bool = False) -> list[RunConfig]:
    """Train every run of ``runs`` that has no result file in ``out``; returns those it trained."""
    out = Path(out)
    if len({run.dataset for run in runs}) > 1:
        raise ValueError("run_grid trains one dataset at a time; split the runs by dataset")
    pending = [run for run in runs if not finished(out, run)]
    if not pending:
        return []
    dataset = pending[0].dataset
    data = datasets.load(dataset, options.device, data_dir, download)
    bar = tqdm(total=len(runs), initial=len(runs) - len(pending), desc="grid", unit="run",
               dynamic_ncols=True, disable=not options.progress)
    try:
        for run in pending:
            bar.set_postfix_str(run.run_id)
            record = train_run(run, data, options, checkpoint_path(out, run))
            atomic_write_text(result_path(out, run), json.dumps(record, indent=1, allow_nan=False))
            checkpoint_path(out, run).unlink(missing_ok=True)
            if record["status"] == "diverged":
                tqdm.write(f"{run.run_id}: loss became NaN/inf at epoch {record['diverged_at_epoch']}; "
                           f"recorded as diverged")
            bar.update(1)
    finally:
        bar.close()
    return pending


def describe(runs: list[RunConfig], out: Path) -> str:
    lines = []
    for run in runs:
        if result_path(out, run).exists():
            status = "done"
        elif checkpoint_path(out, run).exists():
            status = "started"
        else:
            status = "to run"
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in run.loss_params.items())
        lines.append(f"  {run.run_id:<40} {status:<7} {run.epochs} epochs  {params}")
    return "\n".join(lines)


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
