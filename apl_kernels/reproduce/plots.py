"""Plots of a grid: test accuracy by epoch per noise cell, and the grid as a heat map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import datasets, store
from .noise import cell_label, cell_name


def save(figure, path: Path) -> None:
    """Write ``figure`` as a PNG, atomically, with the umask's mode; close it."""
    import matplotlib.pyplot as plt

    try:
        store.write(path, lambda f: figure.savefig(f, format="png", dpi=110))
    finally:
        plt.close(figure)


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
        path = store.child(plots, f"test_acc_{dataset}_{cell_name(kind, rate)}.png")
        figure.tight_layout()
        save(figure, path)
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
        path = store.child(plots, f"grid_{dataset}.png")
        save(figure, path)
        written.append(path)
    return written
