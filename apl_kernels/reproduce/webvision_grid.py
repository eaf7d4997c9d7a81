"""The WebVision-mini grid (``--preset webvision``): the published configs of both papers, the runs,
their files, training them one after another on every process of a torchrun group, and the
results beside the published numbers.

Configs: the ``webvision*`` rows of ``data/apl_icml2020_configs.csv`` (APL: CE, GCE, SCE, NCE+MAE,
NCE+RCE, NFL+MAE, NFL+RCE) and ``data/anl_neurips2023_configs.csv`` (ANL: CE, GCE, SCE, NCE+RCE,
NCE+AGCE, ANL-CE = NCE+NNCE with weight decay 0 and L1 delta 5e-6); where both papers have a loss
their rows agree (tests/test_reproduce_webvision.py holds them to it). Output directory as for the
other grids: ``runs/<run>.json``, ``checkpoints/<run>.pt``, ``locks/``, ``results.md``,
``results.csv``, and with ``--save-model`` ``models/<run>.pt``.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch

from . import ddp, store, webvision
from .settings import read_csv
from .train import ConfigMismatch

DATASET = "webvision"
LOSSES = ("ce", "gce", "sce", "nce+mae", "nce+rce", "nfl+mae", "nfl+rce", "nce+agce", "nce+nnce")
# Published WebVision val top-1 (%): (paper, value); docs/reproduction.md.
PUBLISHED_TOP1 = {"nce+rce": ("APL", 62.64), "nce+mae": ("APL", 62.36), "nce+nnce": ("ANL", 67.44),
                  "nce+agce": ("ANL", 65.00)}
ANL_NAMES = {"ce": "ce", "gce": "gce", "sce": "sce", "nce_rce": "nce+rce", "nce_agce": "nce+agce",
             "anl_ce": "nce+nnce"}
PARAMS = ("alpha", "beta", "gamma", "q", "a", "min_prob")
FOCAL = ("nfl",)  # the published gradient (official_grad) for the focal members, as elsewhere
POLL_S = 2.0


@dataclass(frozen=True)
class WebSettings:
    """The training settings of a WebVision run (both papers' configs)."""

    model: str = "resnet50"
    epochs: int = 250
    batch_size: int = 512  # global: batch_size / G per process
    lr: float = 0.4
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 3e-5
    grad_clip: float = 5.0
    lr_step_gamma: float = ddp.STEP_GAMMA  # StepLR(1, 0.97)
    l1: float = 0.0  # ANL's delta * sum|theta|
    sync_bn: bool = False
    image_size: int = 224
    augment: bool = True  # False: tests only (the test transform for training too)


def _number(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


@lru_cache(maxsize=None)
def published_configs() -> dict[str, dict]:
    """loss -> {"params", "settings" (WebSettings changes), "sources"} from both papers' rows."""
    configs: dict[str, dict] = {}

    def add(loss: str, source: str, row: dict, delta: str = "") -> None:
        params = {k: _number(row.get(k, "")) for k in PARAMS if _number(row.get(k, "")) is not None}
        if loss.split("+")[0] in FOCAL:
            params["official_grad"] = True
        changes = {"epochs": int(row["epochs"]), "batch_size": int(row["batch"]), "lr": float(row["lr"]),
                   "momentum": float(row["momentum"]), "nesterov": row["nesterov"] == "True",
                   "weight_decay": float(row["weight_decay"]), "grad_clip": float(row["grad_bound"]),
                   "l1": _number(delta) or 0.0}
        entry = {"params": params, "settings": changes, "sources": [source]}
        if loss in configs:
            if {k: configs[loss][k] for k in ("params", "settings")} != {k: entry[k] for k in ("params", "settings")}:
                raise ValueError(f"the APL and ANL WebVision configs of {loss} disagree")
            configs[loss]["sources"].append(source)
        else:
            configs[loss] = entry

    for row in read_csv("apl_icml2020_configs.csv"):
        if row["dataset"] == "webvision_mini":
            add(row["config"], "APL", row)
    for row in read_csv("anl_neurips2023_configs.csv"):
        if row["dataset"] == DATASET:
            add(ANL_NAMES[row["loss"]], "ANL", row, row["delta"])
    return configs


@dataclass(frozen=True)
class WebRun:
    """What identifies a WebVision run (its numbers)."""

    loss: str
    seed: int
    epochs: int
    loss_params: dict = field(default_factory=dict)
    settings: WebSettings = WebSettings()

    @property
    def run_id(self) -> str:
        return f"{DATASET}_{self.loss}_seed{self.seed}"

    def to_dict(self) -> dict:
        return {"dataset": DATASET, "loss": self.loss, "seed": self.seed, "epochs": self.epochs,
                "loss_params": dict(self.loss_params), "settings": asdict(self.settings)}


def build_runs(losses, seeds, epochs: int | None = None, changes: dict | None = None,
               l1: float | None = None) -> list[WebRun]:
    """Every run, seed-major, with its published parameters; ``changes``: WebSettings fields (tests,
    --sync-bn); ``l1`` replaces every run's L1 delta."""
    configs = published_configs()
    runs = []
    for seed in seeds:
        for loss in losses:
            if loss not in configs:
                raise ValueError(f"no published WebVision config for {loss}; WebVision's losses: {', '.join(configs)}")
            settings = replace(WebSettings(), **(configs[loss]["settings"] | (changes or {})))
            if l1 is not None:
                settings = replace(settings, l1=l1)
            if epochs is not None:
                settings = replace(settings, epochs=epochs)
            runs.append(WebRun(loss, seed, settings.epochs, configs[loss]["params"], settings))
    return runs


def paths(out: Path, run: WebRun) -> dict[str, Path]:
    return {"result": out / "runs" / f"{run.run_id}.json", "checkpoint": out / "checkpoints" / f"{run.run_id}.pt",
            "lock": out / "locks" / f"{run.run_id}.lock", "model": out / "models" / f"{run.run_id}.pt"}


def read_result(path: Path) -> dict:
    record = store.read_json(path)
    if not isinstance(record.get("config"), dict) or record.get("status") not in ("finished", "diverged"):
        raise ValueError("not a WebVision run result")
    return record


def status(out: Path, run: WebRun, repair: bool = False) -> str:
    """``done``, ``started`` or ``to run``; :class:`ConfigMismatch` for a result of other settings."""
    result, checkpoint = paths(out, run)["result"], paths(out, run)["checkpoint"]
    if result.exists():
        try:
            stored = read_result(result)["config"]
        except (OSError, ValueError) as err:
            if repair:
                store.move_aside(result, err, f"run {run.run_id} will be trained again")
            return "to run"
        if stored != json.loads(json.dumps(run.to_dict())):
            raise ConfigMismatch(f"{result} was trained with other settings; use another --out or delete it")
        return "done"
    return "started" if checkpoint.exists() else "to run"


def plan(run: WebRun, out: Path) -> dict:
    """Every setting of ``run`` for ``--dry-run --json``."""
    from ..catalogue import accepted_params

    published = PUBLISHED_TOP1.get(run.loss)
    return {"run_id": run.run_id, "status": status(out, run), "dataset": DATASET, "loss": run.loss,
            "loss_params": accepted_params(run.loss) | run.loss_params, "seed": run.seed, "epochs": run.epochs,
            "settings": asdict(run.settings) | {"scheduler": f"StepLR(step_size=1, gamma={run.settings.lr_step_gamma})"},
            "sources": published_configs()[run.loss]["sources"],
            "published_webvision_top1": None if published is None else {"paper": published[0], "value": published[1]}}


def make_loss_factory(run: WebRun, backend: str):
    from ..batch_losses import batch_loss_name
    from ..nn import get_loss

    # a batch loss (ANL-CE-ER) takes its batch statistics over every rank's batch, as the official
    # single-process code did (apl_kernels/batch_losses.py)
    extra = {"sync": True} if batch_loss_name(run.loss) else {}
    return lambda reduction: get_loss(run.loss, backend=backend, reduction=reduction, **run.loss_params, **extra)


def run_grid(runs: list[WebRun], out: Path, data, group: ddp.Group, options: ddp.Options,
             log=print) -> list[WebRun]:
    """Train every run not done, one after another on every rank of ``group``. Rank 0 decides each
    step (status, lock) and broadcasts it; runs that another job (``--shard``, another node's
    command on the same directory) is training are waited for."""
    waiting, trained = list(runs), []
    while waiting:
        progressed = False
        for run in list(waiting):
            lock, decision = None, None
            if group.main:
                decision = "done" if status(out, run, repair=True) == "done" else "busy"
                if decision == "busy":
                    lock = store.RunLock.acquire(paths(out, run)["lock"])
                    if lock is not None:
                        decision = "done" if status(out, run, repair=True) == "done" else "train"
            decision = ddp.broadcast(decision, group)
            if decision == "busy":
                continue
            waiting.remove(run)
            progressed = True
            if decision == "train":
                try:
                    _train(run, out, data, group, options, log, lock)
                finally:
                    if lock is not None:
                        lock.release()
                trained.append(run)
            elif lock is not None:
                lock.release()
        if waiting and not progressed:
            time.sleep(POLL_S)
    return trained


def _train(run: WebRun, out: Path, data, group: ddp.Group, options: ddp.Options, log, lock) -> dict:
    """Train ``run`` on every rank; rank 0 holds ``lock`` and checks it is still its own before each
    write (store.LockLost: another job took the run over; torchrun then stops every rank)."""
    files = paths(out, run)
    check = (lambda: lock.check_held(run.run_id)) if lock is not None else None

    def on_epoch(epoch: int, record: dict) -> None:
        if group.main:
            h = record["history"]
            log(f"  {run.run_id}: epoch {epoch}/{run.epochs}, train loss {h['train_loss'][-1]:.4f}, WebVision "
                f"top-1 {h['webvision_top1'][-1]:.2f} %, ImageNet top-1 {h['imagenet_top1'][-1]:.2f} % "
                f"({record['wall_time_s'] / 60:.1f} min)")

    record, model = ddp.train_run(run, data, group, options, files["checkpoint"],
                                  make_loss_factory(run, options.backend), on_epoch, check)
    published = PUBLISHED_TOP1.get(run.loss)
    record["published_webvision_top1"] = None if published is None else {"paper": published[0], "value": published[1]}
    if group.main:
        check()
        if options.save_model:
            state = model.state_dict()
            store.write(files["model"], lambda f: torch.save(state, f))  # plain: torch.load reads it
        store.write_text(files["result"], json.dumps(record, indent=1, allow_nan=False))
        files["checkpoint"].unlink(missing_ok=True)
        log(f"{run.run_id}: {record['status']}, WebVision top-1 {record['final_webvision_top1']}, "
            f"ImageNet top-1 {record['final_imagenet_top1']}")
    return record


REPORT_COLUMNS = ("loss", "seeds", "webvision_top1", "webvision_top5", "imagenet_top1", "imagenet_top5",
                  "published_webvision_top1", "paper")


def is_results_dir(out: Path) -> bool:
    """Whether ``out/runs`` holds WebVision run results (``--report`` then rebuilds this grid's report)."""
    for path in sorted(Path(out).glob("runs/*.json")):
        try:
            return read_result(path)["config"].get("dataset") == DATASET
        except (OSError, ValueError):
            continue
    return False


def write_report(out: Path, runs: list[WebRun] | None = None) -> list[Path]:
    """``results.csv`` and ``results.md``: per loss, the mean over seeds of the last epoch's accuracies
    beside the published WebVision top-1; of ``runs``, or (``--report``) of every result in ``out/runs``
    (a damaged file is skipped with a warning naming it)."""
    out = Path(out)
    by_loss: dict[str, list[dict]] = {}
    if runs is None:
        for path in sorted(out.glob("runs/*.json")):
            try:
                record = read_result(path)
            except (OSError, ValueError) as err:
                store.warn(f"skipped {path}: damaged ({store.first_line(err)}); training the grid again retrains its run")
                continue
            by_loss.setdefault(record["config"]["loss"], []).append(record)
        order = {loss: i for i, loss in enumerate(LOSSES)}  # the grid's order, as a training command writes it
        by_loss = dict(sorted(by_loss.items(), key=lambda item: order.get(item[0], len(order))))
    else:
        for run in runs:
            by_loss.setdefault(run.loss, [])
            if paths(out, run)["result"].exists():
                try:
                    by_loss[run.loss].append(read_result(paths(out, run)["result"]))
                except (OSError, ValueError):
                    pass
    rows = []
    for loss, records in by_loss.items():
        finished = [r for r in records if r["status"] == "finished"]
        if not records:
            continue
        row = {"loss": loss, "seeds": len(finished)}
        for metric in REPORT_COLUMNS[2:6]:
            values = [r[f"final_{metric}"] for r in finished]
            row[metric] = round(sum(values) / len(values), 2) if values else None
        paper, value = PUBLISHED_TOP1.get(loss, ("", None))
        row["published_webvision_top1"], row["paper"] = value, paper
        rows.append(row)
    text = io.StringIO()
    writer = csv.DictWriter(text, REPORT_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    csv_path, md_path = out / "results.csv", out / "results.md"
    store.write_text(csv_path, text.getvalue())
    shown = lambda v: "" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["# WebVision-mini: top-1 / top-5 (%) at the last epoch, mean over seeds", "",
             "| " + " | ".join(REPORT_COLUMNS) + " |", "|" + "---|" * len(REPORT_COLUMNS)]
    lines += ["| " + " | ".join(shown(row[c]) for c in REPORT_COLUMNS) + " |" for row in rows]
    store.write_text(md_path, "\n".join(lines) + "\n")
    return [csv_path, md_path]


# --------------------------------------------------------------------------------------------
# Command line (python -m apl_kernels.reproduce --preset webvision; cli.py hands over)

def add_arguments(parser) -> None:
    group = parser.add_argument_group("WebVision-mini (--preset webvision; several GPUs: torchrun)")
    group.add_argument("--imagenet-dir", help="the folder holding ILSVRC2012's val/<wnid>/ (torchvision's "
                                              "ImageNet layout; default DATA_DIR/imagenet)")
    group.add_argument("--workers", type=int, default=8, help="DataLoader worker processes per rank that decode "
                                                              "the images (default 8)")
    group.add_argument("--sync-bn", action="store_true", help="synchronized BatchNorm over the global batch "
                       "(default: per process, as the papers' DataParallel normalized per device)")
    group.add_argument("--save-model", action="store_true", help="keep each run's final weights in models/")
    group.add_argument("--model", choices=sorted(ddp.MODELS), help="override ResNet-50 (tiny_*: tests)")
    group.add_argument("--image-size", type=int, help="override the crop size 224 (tests)")
    group.add_argument("--batch-size", type=int, help="override the global batch 512")
    group.add_argument("--no-augment", action="store_true", help="train on the test transform (tests only)")
    group.add_argument("--dist-timeout", type=float, default=1800.0,
                       help="seconds a collective may wait for the other ranks before failing (default 1800)")


def main(args) -> int:
    """``--preset webvision``: one process, or every rank of a torchrun group."""
    group = ddp.init_group(args.device, args.dist_timeout)
    try:
        return _main(args, group)
    except webvision.ImageUnreadable as err:  # from a DataLoader worker: its message's own line
        lines = [line for line in str(err).splitlines() if line.strip()]
        print(f"python -m apl_kernels.reproduce: error: {lines[-1].split(': ', 1)[-1]}", file=sys.stderr)
        return 2
    except store.LockLost as err:
        print(f"python -m apl_kernels.reproduce: error: {err}", file=sys.stderr)
        return 1
    finally:
        if group.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _main(args, group: ddp.Group) -> int:
    from .cli import parse_losses, parse_seeds, parse_shard
    from .grid import shard
    from .settings import UsageError

    losses = parse_losses(args.losses) if args.losses else list(LOSSES)
    absent = [loss for loss in losses if loss not in published_configs()]
    if absent:
        raise UsageError(f"no published WebVision config for {', '.join(absent)}; WebVision's losses: "
                         f"{', '.join(published_configs())}")
    for name in ("epochs", "image_size", "batch_size", "workers"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "workers" else 1):
            raise UsageError(f"bad --{name.replace('_', '-')} {value}: must be >= {0 if name == 'workers' else 1}")
    changes = {k: v for k, v in (("model", args.model), ("image_size", args.image_size),
                                 ("batch_size", args.batch_size)) if v is not None}
    if args.sync_bn and torch.device(group.device).type != "cuda" and not args.dry_run:
        raise UsageError("--sync-bn needs CUDA: torch's SyncBatchNorm runs on GPUs only; leave it out on CPU")
    changes |= {"sync_bn": True} if args.sync_bn else {}
    changes |= {"augment": False} if args.no_augment else {}
    runs = build_runs(losses, parse_seeds(args.seeds or "1"), args.epochs, changes, args.l1)
    if args.shard:
        runs = shard(runs, *parse_shard(args.shard))
    out = Path(args.out or f"apl-results/{DATASET}")
    problem = webvision.missing(args.data_dir, args.imagenet_dir)
    log = (lambda *a, **k: print(*a, **k, flush=True)) if group.main else (lambda *a, **k: None)
    if args.dry_run:
        if group.main:
            stream = sys.stderr if args.json else sys.stdout
            print(f"{len(runs)} runs on WebVision-mini, global batch split over {group.world} process(es); "
                  f"results in {out}", file=stream)
            if problem:
                print(f"data: {problem}", file=stream)
            for run in runs:
                print(json.dumps(plan(run, out)) if args.json else
                      f"  {run.run_id:<32} {status(out, run):<7} {run.epochs} epochs  "
                      + ", ".join(f"{k}={v}" for k, v in run.loss_params.items()))
        return 2 if problem else 0  # as the other grids' dry runs: the data it plans for is missing
    if problem:
        raise webvision.DatasetNotFound(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = ddp.Options(backend=args.backend, bf16=args.bf16, channels_last=args.channels_last,
                          compile=args.compile, workers=args.workers, save_model=args.save_model)
    if group.main:
        store.prepare_output(out)
        if options.save_model:
            (out / "models").mkdir(exist_ok=True)
    data = webvision.load(args.data_dir, args.imagenet_dir, runs[0].settings.image_size if runs else 224,
                          runs[0].settings.augment if runs else True)
    log(f"{len(runs)} runs on WebVision-mini: {len(data.train)} training images, "
        f"{len(data.val_sets['webvision'])} WebVision and {len(data.val_sets['imagenet'])} ImageNet validation "
        f"images; {group.world} process(es), {runs[0].settings.batch_size // group.world if runs else 0} images "
        f"per process and step; results in {out}")
    ddp.broadcast(None, group)  # the output folders exist before any rank looks at them
    trained = run_grid(runs, out, data, group, options, log)
    if group.main:
        files = write_report(out, runs)
        log(f"trained {len(trained)} runs; {files[1]} ({files[0]}), {out / 'runs'}/*.json")
        log(files[1].read_text())
    return 0
