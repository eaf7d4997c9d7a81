"""The report of a grid: ``results.csv`` and ``results.md`` (mean ± std per cell beside the paper's
number, and the notes that a reader needs: which settings ran, where parameters come from, the
published configs' quirks), the plots, and the headline printed at the end of a grid."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ..batch_losses import BATCH_LOSSES
from ..catalogue import available_losses
from . import datasets, plots, store
from .noise import HUMAN_LABEL_SETS, NOISE_KINDS, cell_label
from .settings import (LATER_LOSSES, NMAE_PUBLISHED_SCALE, PAPER_DATASET, VARIANTS, UsageError, dataset_notes,
                       paper_losses, paper_results, published, training_settings)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _accuracy(value) -> bool:
    return value is None or _number(value)


# What the readers of a result (the grid's status, the tables, the plots, the headline) use, each
# with its check: a result that fails one is damaged, as an unreadable file is.
RESULT_FIELDS = {
    "config.dataset": lambda r: r["config"]["dataset"] in datasets.DATASETS,
    "config.loss": lambda r: r["config"]["loss"] in available_losses() or r["config"]["loss"] in BATCH_LOSSES,
    "config.noise": lambda r: r["config"]["noise"] in NOISE_KINDS,
    # The rate names plots: a label set of the dataset's, or a number in [0, 1], nothing else.
    "config.rate": lambda r: (r["config"]["rate"] in HUMAN_LABEL_SETS.get(r["config"]["dataset"], ())
                              if r["config"]["noise"] == "human"
                              else _number(r["config"]["rate"]) and 0.0 <= r["config"]["rate"] <= 1.0),
    "config.epochs": lambda r: isinstance(r["config"]["epochs"], int) and r["config"]["epochs"] >= 1,
    "config.loss_params": lambda r: isinstance(r["config"]["loss_params"], dict),
    "config.variant": lambda r: r["config"].get("variant", "paper") in VARIANTS,
    "status": lambda r: r["status"] in ("finished", "diverged"),
    "final_test_acc": lambda r: (_number if r["status"] == "finished" else _accuracy)(r["final_test_acc"]),
    "best_test_acc": lambda r: _accuracy(r["best_test_acc"]),
    "noise.realized_rate": lambda r: _number(r["noise"]["realized_rate"]),
    "history.test_acc": lambda r: isinstance(r["history"]["test_acc"], list)
                                  and all(map(_accuracy, r["history"]["test_acc"])),
}


def load_record(path: Path) -> dict:
    """The run result in ``path``; ``ValueError`` if the file is not one its readers can use."""
    record = store.read_json(path)
    for name, valid in RESULT_FIELDS.items():
        try:
            ok = valid(record)
        except (KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise ValueError(f"not a run result: {name} missing or invalid")
    return record


def load_records(out: Path) -> list[dict]:
    """The run results in ``out/runs``; damaged files are skipped with a warning naming each."""
    records = []
    for path in sorted((Path(out) / "runs").glob("*.json")):
        try:
            records.append(load_record(path))
        except (OSError, ValueError) as err:
            store.warn(f"skipped {path}: damaged ({store.first_line(err)}); training the grid again "
                       f"retrains its run")
    return records


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
            "variant": group[0]["config"].get("variant", "paper"),
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
    paper_order = {name: i for i, name in enumerate(dict.fromkeys(paper_losses() + LATER_LOSSES))}
    rows.sort(key=lambda r: (r["dataset"], noise_order.index(r["noise"]), r["rate"],
                             paper_order.get(r["loss"], len(paper_order) + loss_order.get(r["loss"], 0))))
    return rows


CSV_COLUMNS = ("dataset", "noise", "rate", "loss", "variant", "epochs", "seeds", "diverged", "mean", "std",
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
    """What a reader must know to read the tables: which settings ran, where the parameters come
    from, the published configs' quirks that touch a cell, and how to read the numbers."""
    lines: list[str] = []
    for dataset in sorted({r["dataset"] for r in rows}):
        dataset_rows = [r for r in rows if r["dataset"] == dataset]
        title = datasets.DATASETS[dataset].title
        for variant in sorted({r["variant"] for r in dataset_rows}):
            published_epochs = training_settings(dataset, variant).epochs
            epochs = sorted({r["epochs"] for r in dataset_rows if r["variant"] == variant})
            which = ("the released configs (--settings released)" if variant == "released" else
                     "the paper (the pre-release code that produced its numbers)")
            lines.append(f"{title} is not in the paper: its own training settings and CIFAR-10's loss parameters "
                         f"of {which}." if dataset == "digits" else
                         f"{title}: training settings and loss parameters of {which}.")
            if epochs != [published_epochs]:
                lines.append(f"{title}: trained {', '.join(map(str, epochs))} epoch(s), the published "
                             f"setting is {published_epochs}: differences from the paper are not like for like.")
        for kind in dict.fromkeys(r["noise"] for r in dataset_rows):
            for variant in sorted({r["variant"] for r in dataset_rows}):
                lines += dataset_notes(dataset, kind, variant)
        for row in dataset_rows:
            lines += published(dataset, row["loss"], row["noise"], row["variant"]).notes
        if dataset not in (PAPER_DATASET, "digits"):
            lines.append(f"{title}: paper numbers are shown where the paper has this dataset and cell.")
    losses = {r["loss"] for r in rows}
    later = [loss for loss in LATER_LOSSES if loss in losses]
    if later:
        lines.append(f"{', '.join(later)}: no published numbers are available here (Active Negative Loss, "
                     "NeurIPS 2023; asymmetric losses, ICML 2021), so their rows show none.")
    if losses & {"nce+nnce", "nfl+nnfl"}:
        lines.append("NCE+NNCE and NFL+NNFL (ANL) train with weight decay 0 and the L1 penalty "
                     "delta * sum|theta| over every parameter, as their published configs.")
    if "nrce" in losses:
        scales = sorted({rec["config"]["loss_params"].get("scale", 1.0) for rec in records
                         if rec["config"]["loss"] == "nrce"})
        lines.append("NRCE alone trains at the published code's effective scale A(K-1)^2/4 with "
                     f"A = -ln(1e-4) (= {', '.join(f'{s:.3f}' for s in scales)}), not at scale 1: the "
                     "published code multiplies RCE by (K-1)/4 instead of dividing by A(K-1).")
    if "nmae" in losses:
        lines.append(f"NMAE alone trains at the published code's effective scale {NMAE_PUBLISHED_SCALE} "
                     "(its 1 / (2(K-1)) normalization), not at scale 1.")
    if any(r["noise"] == "asym" and r["dataset"] == "cifar10" for r in rows):
        lines.append("CIFAR-10 asym is the published sequential flipping (realized cat noise about "
                     "rate*(1-rate)); asym-sim draws every flip from the clean labels.")
    if any(r["noise"] == "human" for r in rows):
        lines.append("human: CIFAR-N's human labels (Wei et al., ICLR 2022), trained with the "
                     "symmetric-noise parameters; the realized noise row is the fraction of labels "
                     "that differ from the clean ones.")
    lines.append("Accuracy: clean test accuracy (%) at the last epoch, mean ± population std over "
                 "seeds; best_epoch_mean in results.csv is the mean of each run's best epoch "
                 "(selected on the test set, so optimistic).")
    return list(dict.fromkeys(lines))


def results_markdown(rows: list[dict], records: list[dict]) -> str:
    lines = ["# APL reproduction results", ""]
    lines += [f"- {line}" for line in notes(rows, records)] + [""]
    for dataset in sorted({r["dataset"] for r in rows}):
        dataset_rows = [r for r in rows if r["dataset"] == dataset]
        for kind in NOISE_KINDS:
            kind_rows = [r for r in dataset_rows if r["noise"] == kind]
            if not kind_rows:
                continue
            rates = sorted({r["rate"] for r in kind_rows})  # numbers, or human label set names
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
    store.write_text(out / "results.csv", results_csv(rows))
    store.write_text(out / "results.md", results_markdown(rows, records))
    return [out / "results.csv", out / "results.md", *plots.write_plots(rows, records, out / "plots")]


HEADLINE_WIDTH = 100  # noise kinds share a table while it stays this narrow


def headline(rows: list[dict]) -> str:
    """The grid's result in a few tables: last-epoch clean test accuracy per loss and noise cell,
    the best and the worst loss of each cell, and ours minus the paper where it has the cell."""
    if not rows:
        return "no finished runs"
    dataset = datasets.DATASETS[rows[0]["dataset"]].title
    seeds = max(r["seeds"] + r["diverged"] for r in rows)
    with_paper = any(r["paper_mean"] is not None for r in rows)
    lines = [f"Clean test accuracy (%) at the last epoch, {dataset}, {plural(seeds, 'seed')}"
             + (" (mean)" if seeds > 1 else "") + ("; in brackets ours minus the paper's number:" if with_paper else ":")]
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    by_cell = {(r["loss"], r["noise"], r["rate"]): r for r in rows}
    columns = list(dict.fromkeys((r["noise"], r["rate"]) for r in rows))

    def text(row: dict | None) -> str:
        if row is None:
            return ""
        if row["mean"] is None:
            return "diverged"
        diff = f" ({row['diff']:+.2f})" if row["diff"] is not None else ""
        return f"{row['mean']:.2f}{diff}"

    def extreme(column, pick) -> str:
        scored = [(by_cell[(loss, *column)]["mean"], loss) for loss in losses
                  if (loss, *column) in by_cell and by_cell[(loss, *column)]["mean"] is not None]
        return pick(scored)[1] if scored else ""

    table_rows = [[loss] + [text(by_cell.get((loss, *col))) for col in columns] for loss in losses]
    table_rows += [["best"] + [extreme(col, max) for col in columns],
                   ["worst"] + [extreme(col, min) for col in columns]]
    header = ["loss"] + [cell_label(*col) for col in columns]
    widths = [max(len(row[i]) for row in table_rows + [header]) for i in range(len(header))]
    groups: list[list[int]] = []  # column indices per printed table: whole noise kinds, not too wide
    for kind in dict.fromkeys(kind for kind, _ in columns):
        indices = [i + 1 for i, col in enumerate(columns) if col[0] == kind]
        width = widths[0] + sum(widths[i] + 2 for i in (groups[-1] if groups else []) + indices)
        if groups and width <= HEADLINE_WIDTH:
            groups[-1] += indices
        else:
            groups.append(indices)
    for indices in groups:
        lines.append("")
        for row in [header] + table_rows:
            cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in indices]
            lines.append("  ".join(cells).rstrip())
    sentence = takeaway(rows)
    return "\n".join(lines + (["", sentence] if sentence else []))


NON_ROBUST = ("ce", "fl")  # the APL paper's baselines that are not robust to label noise


def takeaway(rows: list[dict]) -> str | None:
    """What the table shows, in one sentence from its numbers: at the symmetric noise rate nearest
    40 %, where cross entropy ends and where the robust losses (all but :data:`NON_ROBUST`) end;
    ``None`` without that column, cross entropy or a robust loss in it."""
    column = [r for r in rows if r["noise"] == "sym" and r["rate"] > 0 and r["mean"] is not None]
    if not column:
        return None
    rate = min({r["rate"] for r in column}, key=lambda rate: (abs(rate - 0.4), rate))
    ce = [r["mean"] for r in column if r["rate"] == rate and r["loss"] == "ce"]
    robust = {r["loss"]: r["mean"] for r in column if r["rate"] == rate and r["loss"] not in NON_ROBUST}
    if not ce or not robust:
        return None
    seeds = max(r["seeds"] for r in column if r["rate"] == rate)
    where = (f"at {min(robust.values()):.1f} to {max(robust.values()):.1f} % (median "
             f"{float(np.median(list(robust.values()))):.1f} %)" if len(robust) > 1 else
             f"at {next(iter(robust.values())):.1f} %")
    who = f"the {len(robust)} robust losses" if len(robust) > 1 else next(iter(robust))
    return (f"At {rate * 100:g} % symmetric label noise cross entropy ends at {ce[0]:.1f} % clean test accuracy "
            f"and {who} {where}{f', means over {seeds} seeds' if seeds > 1 else ''}.")


def files_line(rows: list[dict], out: Path) -> str:
    """The line that ends a grid: the files written, and what each holds for these ``rows``."""
    out = Path(out)
    seeds = max(r["seeds"] + r["diverged"] for r in rows)
    tables = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    paper = ", beside the paper's numbers" if any(r["paper_mean"] is not None for r in rows) else ""
    return (f"files: {out / 'results.md'} (the tables, {tables}{paper}, and notes on the settings), "
            f"{out / 'results.csv'} (the same, a row per cell, with the realized noise), "
            f"{out / 'runs'}/*.json (each run's settings and per-epoch history), "
            f"{out / 'plots'}/ (test accuracy by epoch, the grid as a heat map)")
