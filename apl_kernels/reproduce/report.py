"""The report of a grid: ``results.csv`` and ``results.md`` (mean ± std per cell beside the paper's
number) and the plots, from the run files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from ..catalogue import available_losses
from ..files import atomic_write_text
from . import datasets
from .noise import NOISE_KINDS
from . import plots
from .settings import NMAE_PUBLISHED_SCALE, PAPER_DATASET, SETTINGS, UsageError, paper_losses, paper_results


def load_record(path: Path) -> dict:
    return json.loads(path.read_text())


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


def write_report(out: str | Path) -> list[Path]:
    """(Re)build ``results.csv``, ``results.md`` and the plots from ``out/runs/*.json``."""
    out = Path(out)
    records = load_records(out)
    if not records:
        raise UsageError(f"no run results in {out / 'runs'}; train a grid first (--out {out})")
    rows = summarize(records)
    atomic_write_text(out / "results.csv", results_csv(rows))
    atomic_write_text(out / "results.md", results_markdown(rows, records))
    return [out / "results.csv", out / "results.md", *plots.write_plots(rows, records, out / "plots")]
