"""What the papers ran: training settings per dataset, the published loss parameters and numbers,
and the presets of ``python -m apl_kernels.reproduce``.

Package data (``data/``): the raw sources ``apl_icml2020_results.csv`` (the APL paper's numbers:
dataset, noise, rate, loss, mean, std), ``apl_icml2020_configs.csv`` (the APL code's released
configs) and ``anl_neurips2023_configs.csv`` (the later families' configs), and the curated
``published_params.csv``: every loss parameter a preset trains, per dataset, noise kind, loss and
variant, with its source and the quirk that touches it (that file's header says how it is read).
Where the APL code's parts disagree, the ``paper`` variant follows the pre-release code and notes
that produced the paper's numbers, ``released`` the released configs (docs/reproduction.md).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from importlib import resources

from ..catalogue import FOCAL, available_losses
from ..reference import RCE_A
from . import datasets

PAPER_DATASET = "cifar10"
VARIANTS = ("paper", "released")


class UsageError(Exception):
    """Bad command-line input; the message says what to do instead."""


@dataclass(frozen=True)
class Settings:
    """A dataset's published training settings (docs/reproduction.md, "Settings")."""

    model: str
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    lr_min: float  # the cosine schedule's final learning rate
    batch_size: int = 128
    grad_clip: float = 5.0  # max L2 norm of all gradients (clip_grad_norm_)
    nesterov: bool = False
    l1: float = 0.0  # delta of the L1 penalty delta * sum|theta| added to the loss (ANL)


# The paper variant: the pre-release code, which produced the paper's numbers.
SETTINGS = {
    "cifar10": Settings("cnn8", epochs=120, lr=0.01, momentum=0.9, weight_decay=1e-4, lr_min=0.0),
    "mnist": Settings("cnn4", epochs=50, lr=0.01, momentum=0.9, weight_decay=1e-3, lr_min=1e-3),
    "cifar100": Settings("resnet34", epochs=200, lr=0.1, momentum=0.9, weight_decay=1e-5, lr_min=0.0),
    # Not in the paper: the offline quick preset's. CIFAR-10's settings but for the learning rate,
    # 0.05 so that a small CNN fits 1,437 images in 50 epochs (600 steps): cross entropy then fits
    # the noisy labels, as CNN8 does on CIFAR-10 in 120 epochs.
    "digits": Settings("digits_cnn", epochs=50, lr=0.05, momentum=0.9, weight_decay=1e-4, lr_min=0.0),
}
# The released configs' changes (apl_icml2020_configs.csv; --settings released).
RELEASED_CHANGES = {
    "mnist": {"weight_decay": 1e-2, "nesterov": True},
    "cifar100": {"model": "resnet50"},
}
SETTING_NAMES = tuple(f.name for f in fields(Settings))


def training_settings(dataset: str, variant: str = "paper", overrides: dict | None = None,
                      epochs: int | None = None) -> Settings:
    """The training settings of ``dataset`` in ``variant``, with ``overrides`` (Settings fields)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown settings variant {variant!r}; available: {', '.join(VARIANTS)}")
    unknown = sorted(set(overrides or {}) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(SETTING_NAMES)}")
    changes = RELEASED_CHANGES.get(dataset, {}) if variant == "released" else {}
    settings = replace(SETTINGS[dataset], **changes, **(overrides or {}))
    if settings.l1 < 0 or settings.l1 != settings.l1:
        raise ValueError(f"the L1 penalty delta must be >= 0, got {settings.l1}")
    return replace(settings, epochs=epochs) if epochs is not None else settings


def read_csv(name: str) -> list[dict]:
    text = resources.files(__package__).joinpath(f"data/{name}").read_text()
    return list(csv.DictReader(line for line in io.StringIO(text) if not line.startswith("#")))


@lru_cache(maxsize=None)
def _paper_rows() -> tuple[dict, ...]:
    rows = read_csv("apl_icml2020_results.csv")
    for row in rows:
        row["rate"], row["mean"], row["std"] = float(row["rate"]), float(row["mean"]), float(row["std"])
    return tuple(rows)


def paper_results() -> list[dict]:
    """The paper's table rows (dataset, noise, rate, loss, mean, std), from the package data."""
    return [dict(row) for row in _paper_rows()]


def paper_losses(dataset: str = PAPER_DATASET) -> tuple[str, ...]:
    """The paper's loss rows for ``dataset`` that the catalogue has, in the paper's order."""
    catalogue = set(available_losses())
    names = dict.fromkeys(row["loss"] for row in _paper_rows() if row["dataset"] == dataset)
    return tuple(name for name in names if name in catalogue)


# --------------------------------------------------------------------------------------------
# The published loss parameters (data/published_params.csv)

PARAM_COLUMNS = ("alpha", "beta", "scale", "gamma", "q", "a", "min_prob", "lamb")  # lamb: anl-ce-er's
OVERRIDE_COLUMNS = ("weight_decay", "lr_min", "l1")
TABLE_FILE = "published_params.csv"
# Which rows a noise kind reads: symmetric noise and the human labels of CIFAR-N the sym rows.
NOISE_ROWS = {"sym": "sym", "uniform": "sym", "human": "sym", "asym": "asym", "asym-sim": "asym"}


def nrce_published_scale(num_classes: int) -> float:
    """The published code's NRCE is ``A (K-1)^2 / 4`` times the exact one (losses.md)."""
    return RCE_A * (num_classes - 1) ** 2 / 4


# The published code's NMAE divides by 2(K-1), half the exact normalization (losses.md).
NMAE_PUBLISHED_SCALE = 0.5


@lru_cache(maxsize=None)
def published_table() -> tuple[dict, ...]:
    """The rows of ``data/published_params.csv``, numbers as floats (absent: not in the dict)."""
    rows = []
    for row in read_csv(TABLE_FILE):
        numbers = {k: float(row[k]) for k in PARAM_COLUMNS + OVERRIDE_COLUMNS if row.get(k) not in ("", None)}
        rows.append({k: row[k] for k in ("dataset", "noise", "loss", "variant", "source", "note")} | numbers)
    return tuple(rows)


@dataclass(frozen=True)
class Published:
    """What a cell trains: loss parameters, changes to the training settings, where they come from."""

    params: dict
    overrides: dict
    variant: str  # the settings variant the run trains ("paper" for the later families' rows)
    source: str  # a source of the table's header, or "fallback" / "default"
    notes: tuple[str, ...] = ()


def _matching(dataset: str, rows_noise: str, loss: str, variant: str) -> list[dict]:
    return [row for row in published_table() if row["dataset"] == dataset and row["loss"] == loss
            and row["noise"] in (rows_noise, "*") and row["variant"] in (variant, "*")]


def published(dataset: str, loss: str, noise: str, variant: str = "paper") -> Published:
    """The published parameters of ``loss`` on ``dataset`` under ``noise`` (a noise kind).

    ``digits`` (not in the papers) trains CIFAR-10's. A loss without a row for its dataset trains
    CIFAR-10's row (source ``fallback``); a pair without any row alpha = beta = 1 and its members'
    CIFAR-10 parameters (source ``default``). FL, NFL, NNFL and their pairs train with the published
    gradient (``official_grad=True``); NRCE and NMAE alone at the published code's effective scales.
    """
    rows_noise = NOISE_ROWS[noise]
    table_dataset = dataset if any(r["dataset"] == dataset for r in published_table()) else PAPER_DATASET
    rows = _matching(table_dataset, rows_noise, loss, variant)
    notes: list[str] = []
    if rows:
        source = rows[0]["source"]
    elif (rows := _matching(PAPER_DATASET, rows_noise, loss, variant)):
        source = "fallback"
        if table_dataset != PAPER_DATASET:
            notes.append(f"{loss} on {datasets.DATASETS[dataset].title}: no published parameters; "
                         f"trained with CIFAR-10's")
    else:
        source = "default"
    if len(rows) > 1:
        raise ValueError(f"{TABLE_FILE} has {len(rows)} rows for {table_dataset}/{rows_noise}/{loss}/{variant}")
    members = ("ce", "rce") if loss == "sce" else tuple(loss.split("+"))
    if rows:
        row = rows[0]
        notes[:0] = [row["note"]] if row["note"] else []
    else:  # a pair nobody published: alpha = beta = 1 and each member's own parameters
        row = {"alpha": 1.0, "beta": 1.0} if len(members) == 2 else {}
        for member in members:
            member_rows = _matching(PAPER_DATASET, rows_noise, member, variant)
            row |= {k: v for k, v in (member_rows[0] if member_rows else {}).items()
                    if k in PARAM_COLUMNS and k != "scale"}
    params = {k: row[k] for k in PARAM_COLUMNS if k in row}
    if len(members) == 1 and loss != "sce":
        num_classes = datasets.DATASETS[dataset].num_classes
        scale = {"nrce": nrce_published_scale(num_classes), "nmae": NMAE_PUBLISHED_SCALE}.get(loss)
        if scale is not None:
            params["scale"] = scale
    if any(member in FOCAL for member in members):
        params["official_grad"] = True
    if params.get("scale") == 1.0:
        del params["scale"]  # the default: not written into every run's identity
    overrides = {k: row[k] for k in OVERRIDE_COLUMNS if k in row}
    return Published(params, overrides, "paper" if row.get("source") == "anl" else variant, source,
                     tuple(notes))


def dataset_notes(dataset: str, noise: str, variant: str) -> tuple[str, ...]:
    """The table's notes for every cell of ``dataset`` under ``noise`` (its ``loss *`` rows)."""
    return tuple(row["note"] for row in _matching(dataset, NOISE_ROWS[noise], "*", variant))


# --------------------------------------------------------------------------------------------
# Presets

LATER_LOSSES = ("nce+nnce", "nfl+nnfl", "nce+agce", "nce+aul", "nce+ael", "anl-ce-er")
PAPER_NOISE = "sym:0.0,0.2,0.4,0.6,0.8 asym:0.1,0.2,0.3,0.4"


@dataclass(frozen=True)
class Preset:
    dataset: str
    losses: tuple[str, ...] | None  # None: the paper's loss rows for the dataset
    noise: str
    seeds: str
    device: str | None  # None: CUDA when available
    threads: int | None  # CPU threads for the preset's dataset; None: measured at start
    help: str = ""

    def loss_list(self, dataset: str) -> tuple[str, ...]:
        return self.losses if self.losses is not None else paper_losses(dataset)


PRESETS = {
    "paper": Preset(PAPER_DATASET, None, PAPER_NOISE, "1,2,3", device=None, threads=None,
                    help="the APL paper's grid: every loss row of its tables for --dataset cifar10 "
                         "(default; 23 losses x 9 noise cells x 3 seeds = 621 runs, tens of GPU-hours), "
                         "mnist or cifar100, with the published parameters of each"),
    # The small digits network gains little from a second CPU thread and loses much when the
    # cores are shared (threads wait on each other): one thread.
    "quick": Preset("digits", ("ce", "nce", "mae", "rce", "nce+mae", "nce+rce", "nfl+rce", "nce+nnce",
                               "nce+agce"), "sym:0.0,0.4,0.8 asym:0.2", "1", device="cpu", threads=1,
                    help="scikit-learn's digits on CPU in minutes, offline"),
    "anl": Preset(PAPER_DATASET, LATER_LOSSES, PAPER_NOISE, "1,2,3", device=None, threads=None,
                  help="the later families with their published configs: NCE+NNCE and NFL+NNFL (ANL, "
                       "weight decay 0 and an L1 penalty), NCE+AGCE, NCE+AUL, NCE+AEL, ANL-CE-ER (ANL-CE with "
                       "a batch entropy term), on --dataset cifar10 (default), cifar100 or mnist (WebVision: "
                       "--preset webvision)"),
    "cifar10n": Preset(PAPER_DATASET, None, "human:aggre,random1,random2,random3,worse", "1,2,3",
                       device=None, threads=None,
                       help="CIFAR-10N's five human label sets (CIFAR-10_human.pt in --data-dir), "
                            "CNN8 and the paper's losses"),
    "webvision": Preset("webvision", ("ce", "gce", "sce", "nce+mae", "nce+rce", "nfl+mae", "nfl+rce", "nce+agce",
                                      "nce+nnce"), "", "1", device=None, threads=None,
                        help="WebVision-mini (real web label noise), ResNet-50, both papers' configs; "
                             "several GPUs: torchrun --nproc_per_node=G -m apl_kernels.reproduce "
                             "--preset webvision --data-dir DIR (docs/reproduction.md, \"WebVision-mini\")"),
}
