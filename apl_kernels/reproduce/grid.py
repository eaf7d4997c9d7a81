"""The grid: every run of a reproduction, its files, and training the runs that are not done.

Output directory: ``runs/<run>.json`` (one per finished run, written atomically),
``checkpoints/<run>.pt`` (the last epoch of an unfinished run) and ``locks/<run>.lock`` (the
process training a run). Running the same grid again skips finished runs and continues unfinished
ones from their checkpoint; processes sharing the directory train different runs; damaged files
are moved aside (``*.corrupt``) and their runs trained again.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import backends
from . import datasets, store
from .noise import NOISE_KINDS, cell_label
from .report import load_record, plural
from .settings import published, training_settings
from .train import ConfigMismatch, Options, RunConfig, train_run

LOG_EVERY_S = 60.0  # without progress bars, a line after an epoch when this long has passed
POLL_S = 2.0  # how often to look again at runs that other processes are training


def build_grid(dataset: str, losses, cells, seeds, epochs: int | None = None, variant: str = "paper",
               l1: float | None = None) -> list[RunConfig]:
    """Every run with its published parameters, seed-major: a full table with one seed is done first.

    ``epochs``: None for the dataset's published number; ``l1``: an L1 penalty for every run
    (None: the published one, which only the ANL losses have).
    """
    runs = []
    for seed in seeds:
        for kind, rate in cells:
            for loss in losses:
                cell = published(dataset, loss, kind, variant)
                overrides = cell.overrides | ({"l1": l1} if l1 is not None else {})
                if not overrides.get("l1"):
                    overrides.pop("l1", None)
                run_epochs = epochs or training_settings(dataset, cell.variant, overrides).epochs
                runs.append(RunConfig(dataset, loss, kind, rate, seed, run_epochs, cell.params, cell.variant,
                                      overrides))
    return runs


def shard(runs: list[RunConfig], index: int, count: int) -> list[RunConfig]:
    """Shard ``index`` of ``count``: every ``count``-th run, so shards cost about the same."""
    return runs[index::count]


def result_path(out: Path, run: RunConfig) -> Path:
    return out / "runs" / f"{run.run_id}.json"


def checkpoint_path(out: Path, run: RunConfig) -> Path:
    return out / "checkpoints" / f"{run.run_id}.pt"


def lock_path(out: Path, run: RunConfig) -> Path:
    return out / "locks" / f"{run.run_id}.lock"


def status(out: Path, run: RunConfig, repair: bool = False) -> str:
    """``done``, ``started``, ``to run`` or ``damaged`` (a result file that is not a readable run
    result, or a checkpoint that fails verification; with ``repair`` a damaged result is moved aside
    and the run is ``to run``, and the checkpoint is not read: training verifies it). Raises
    :class:`ConfigMismatch` if the result is of other settings."""
    path = result_path(out, run)
    if path.exists():
        try:
            stored = load_record(path)["config"]
        except (OSError, ValueError) as err:
            if not repair:
                return "damaged"
            store.move_aside(path, err, f"run {run.run_id} will be trained again")
        else:
            if stored != json.loads(json.dumps(run.to_dict())):
                changed = sorted(k for k in set(stored) | set(run.to_dict()) if stored.get(k) != run.to_dict().get(k))
                raise ConfigMismatch(f"{path} was trained with other settings ({', '.join(changed)} differ); "
                                     f"use another --out or delete that directory")
            return "done"
    checkpoint = checkpoint_path(out, run)
    if not checkpoint.exists():
        return "to run"
    if not repair:
        try:
            store.read_verified(checkpoint)
        except (OSError, ValueError):
            return "damaged"
    return "started"


def run_line(run: RunConfig, record: dict, index: int, total: int) -> str:
    """One line for a finished run: which, its clean test accuracy, its time."""
    what = f"[{index}/{total}] {run.loss} {cell_label(run.noise, run.rate)} seed {run.seed}"
    if record["status"] == "diverged":
        result = f"diverged at epoch {record['diverged_at_epoch']} (loss NaN/inf)"
    else:
        result = f"{record['final_test_acc']:.2f} % clean test accuracy"
    seconds = record["wall_time_s"]
    return (f"{what}: {result} ({plural(record['epochs_done'], 'epoch')}{resumed_text(record)}, "
            f"{seconds:.{1 if seconds < 10 else 0}f} s)")


def resumed_text(record: dict) -> str:
    """``, resumed from epoch 20`` for a run continued from its checkpoint; empty for one trained in one go."""
    epochs = record.get("resumed_at_epochs") or []
    return f", resumed from epoch{'s' if len(epochs) > 1 else ''} {', '.join(map(str, epochs))}" if epochs else ""


def load_backend(options: Options) -> str:
    """Load (compile if needed) the loss backend now, before any progress bar; its name."""
    return backends.resolve(options.backend, torch.device(options.device).type).name


def run_grid(runs: list[RunConfig], out: str | Path, options: Options, data_dir: str | Path = "data",
             download: bool = False) -> list[RunConfig]:
    """Train every run of ``runs`` that has no result file in ``out``; returns those it trained.

    Runs that another process is training (its lock is live) are left to it; this call returns
    when every run is done. Progress: bars when ``options.progress`` and stderr is a terminal,
    otherwise (and whenever stdout is not a terminal) one line per finished run and a line after
    an epoch when :data:`LOG_EVERY_S` has passed since the last.
    """
    out = Path(out)
    if len({run.dataset for run in runs}) > 1:
        raise ValueError("run_grid trains one dataset at a time; split the runs by dataset")
    store.prepare_output(out)
    store.remove_stale_temporaries([out / name for name in ("", "runs", "checkpoints", "locks", "plots")])
    pending = [run for run in runs if status(out, run, repair=True) != "done"]
    if not pending:
        return []
    human = any(run.noise == "human" for run in pending)
    data = datasets.load(pending[0].dataset, options.device, data_dir, download, human)
    load_backend(options)
    bars = options.progress and sys.stderr.isatty()
    lines = not bars or not sys.stdout.isatty()
    run_options = dataclasses.replace(options, progress=bars)
    bar = tqdm(total=len(runs), initial=len(runs) - len(pending), desc="grid", unit="run",
               dynamic_ncols=True, disable=not bars)
    trained: list[RunConfig] = []
    waiting: list[RunConfig] = list(pending)
    announced: set[str] = set()
    try:
        while waiting:
            for run in list(waiting):
                lock = store.RunLock.acquire(lock_path(out, run))
                if lock is None:
                    continue  # another process is training it
                bar.set_postfix_str(run.run_id)
                with lock:
                    done_elsewhere = status(out, run, repair=True) == "done"
                    try:
                        record = None if done_elsewhere else _train(run, out, data, run_options, lines, lock)
                    except store.LockLost as err:  # left to the process that took it over: wait for it
                        store.warn(str(err))
                        continue
                waiting.remove(run)
                bar.update(1)
                if record is None:
                    continue
                trained.append(run)
                if lines:
                    tqdm.write(run_line(run, record, len(runs) - len(waiting), len(runs)), file=sys.stdout)
                    sys.stdout.flush()
                elif record["status"] == "diverged":
                    tqdm.write(f"{run.run_id}: loss became NaN/inf at epoch {record['diverged_at_epoch']}; "
                               f"recorded as diverged")
            for run in waiting:
                if run.run_id not in announced:
                    owner = store.describe_owner(lock_path(out, run))
                    if owner is None:
                        continue  # released since: the next look takes the run, or finds it done
                    announced.add(run.run_id)
                    tqdm.write(f"{run.run_id} is being trained by another process ({owner}): waiting for it")
            if waiting:
                time.sleep(POLL_S)
    finally:
        bar.close()
    return trained


def _train(run: RunConfig, out: Path, data: datasets.Data, options: Options, lines: bool,
           lock: store.RunLock) -> dict:
    """Train ``run``, whose ``lock`` this process holds, and write its result; returns its record.
    :class:`store.LockLost`, before anything is written, if another process took the lock over."""
    for leftover in (store.temporaries(out / "runs", f"{run.run_id}.json")
                     + store.temporaries(out / "checkpoints", f"{run.run_id}.pt")):
        leftover.unlink(missing_ok=True)  # an interrupted write of this run's last owner
    record = train_run(run, data, options, checkpoint_path(out, run),
                       on_epoch=epoch_logger(run) if lines else None,
                       before_write=lambda: lock.check_held(run.run_id))
    lock.check_held(run.run_id)
    store.write_text(result_path(out, run), json.dumps(record, indent=1, allow_nan=False),
                     f"; the run's last checkpoint, {checkpoint_path(out, run).name}, is intact: "
                     f"free some space and run the same command again")
    checkpoint_path(out, run).unlink(missing_ok=True)
    return record


def epoch_logger(run: RunConfig):
    """An ``on_epoch`` callback printing a line when :data:`LOG_EVERY_S` has passed since the last."""
    last = time.monotonic()

    def log(epoch: int, record: dict) -> None:
        nonlocal last
        if time.monotonic() - last < LOG_EVERY_S:
            return
        last = time.monotonic()
        history = record["history"]
        tqdm.write(f"  {run.run_id}: epoch {epoch}/{run.epochs}, test accuracy {history['test_acc'][-1]:.2f} %, "
                   f"train loss {history['train_loss'][-1]:.4f} ({record['wall_time_s'] / 60:.1f} min)",
                   file=sys.stdout)
        sys.stdout.flush()

    return log


def plan(run: RunConfig, out: Path) -> dict:
    """Everything ``run`` is configured by, for ``--dry-run --json``."""
    from ..batch_losses import DEFAULTS, batch_loss_name
    from ..catalogue import accepted_params

    defaults = dict(DEFAULTS) if batch_loss_name(run.loss) else accepted_params(run.loss)
    cell = published(run.dataset, run.loss, run.noise, run.variant)
    return {"run_id": run.run_id, "status": status(out, run), "dataset": run.dataset, "loss": run.loss,
            "loss_params": defaults | run.loss_params, "params_source": cell.source,
            "noise": run.noise, "noise_meaning": NOISE_KINDS[run.noise], "rate": run.rate, "seed": run.seed,
            "epochs": run.epochs, "variant": run.variant, "settings": dataclasses.asdict(run.settings),
            "notes": list(cell.notes)}


def describe(runs: list[RunConfig], out: Path) -> str:
    lines = []
    for run in runs:
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in (run.loss_params | run.overrides).items())
        lines.append(f"  {run.run_id:<40} {status(out, run):<7} {run.epochs} epochs  {params}")
    return "\n".join(lines)
