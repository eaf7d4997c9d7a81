"""The grid: every run of a reproduction, its files, and training the runs that are not done.

Output directory: ``runs/<run>.json`` (one per finished run, written atomically) and
``checkpoints/<run>.pt`` (the last epoch of an unfinished run). Running the same grid again skips
finished runs and continues unfinished ones from their checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from ..files import atomic_write_text
from . import datasets
from .report import load_record
from .settings import loss_params
from .train import ConfigMismatch, Options, RunConfig, train_run


def build_grid(dataset: str, losses, cells, seeds, epochs: int) -> list[RunConfig]:
    """Every run, seed-major: a full table with one seed is done first."""
    num_classes = datasets.DATASETS[dataset].num_classes
    return [RunConfig(dataset, loss, kind, rate, seed, epochs, loss_params(loss, kind, num_classes))
            for seed in seeds for kind, rate in cells for loss in losses]


def shard(runs: list[RunConfig], index: int, count: int) -> list[RunConfig]:
    """Shard ``index`` of ``count``: every ``count``-th run, so shards cost about the same."""
    return runs[index::count]



def result_path(out: Path, run: RunConfig) -> Path:
    return out / "runs" / f"{run.run_id}.json"


def checkpoint_path(out: Path, run: RunConfig) -> Path:
    return out / "checkpoints" / f"{run.run_id}.pt"


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
