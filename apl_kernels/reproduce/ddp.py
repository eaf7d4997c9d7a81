"""Training one WebVision-mini run on one or several processes (torchrun, DistributedDataParallel).

    torchrun --nproc_per_node=G -m apl_kernels.reproduce --preset webvision --data-dir DIR

Every process of the group trains the same run: the published batch is the **global** batch, each
rank takes ``batch / G`` samples of it from a :class:`DistributedSampler` seeded with the run's
seed (its order is reseeded every epoch by ``set_epoch``), DDP averages the gradients, and the loss
is the exact mean over the global batch (:mod:`apl_kernels.distributed.global_mean`: each rank's
sum divided by the all-reduced divisor, scaled by ``G`` for DDP's average). Gradient clipping sees
the averaged gradients, identical on every rank, so it clips as one process would.

BatchNorm: per rank by default (``--sync-bn`` synchronizes it). The papers trained with
``nn.DataParallel``, whose BatchNorm normalizes each device's slice of the batch with that slice's
statistics (the running statistics kept are those of the first device's replica, as DDP's
``broadcast_buffers`` keeps rank 0's): per-rank BatchNorm is what they ran, and it needs no
collective per layer. Synchronized BatchNorm normalizes over the global batch, as one device with
the whole batch would.

Rank 0 alone reads and writes checkpoints; it broadcasts what it read, so every rank resumes from
the same state. Augmentation randomness is reseeded per epoch and rank (the DataLoader's worker
seeds and the main process's generator), so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .. import backends
from ..distributed.global_mean import global_mean, mean_divisor
from . import store
from .train import optimizer_step, read_checkpoint, restore, seed_everything

STEP_GAMMA = 0.97  # StepLR(step_size=1, gamma=0.97): the learning rate times 0.97 after every epoch
TOP = (1, 5)
VAL_METRICS = tuple(f"{name}_{metric}" for name in ("webvision", "imagenet")
                    for metric in ("loss", "top1", "top5"))
METRICS = ("lr", "train_loss", "train_top1") + VAL_METRICS


@dataclass(frozen=True)
class Group:
    """This process's place in the process group (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_group(device: str | None = None, timeout_s: float = 1800.0) -> Group:
    """Join torchrun's process group (``WORLD_SIZE`` > 1 in the environment): NCCL and the GPU
    ``LOCAL_RANK`` on CUDA, gloo on CPU; without torchrun, one process on ``device``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if world == 1:
        return Group(device=device or kind)
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return Group(dist.get_rank(), dist.get_world_size(), local_rank, device)


def broadcast(obj, group: Group):
    """Rank 0's ``obj`` on every rank."""
    if group.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float], group: Group, device) -> list[float]:
    """The element-wise sum over ranks of ``values`` (float64; one all-reduce)."""
    total = torch.tensor(values, dtype=torch.float64, device=device)
    if group.world > 1:
        dist.all_reduce(total)
    return total.tolist()


class TinyMLP(nn.Sequential):
    """Tests only: average-pool to 4x4, FC 48-32-ReLU-FC. No BatchNorm, so a run on G processes
    equals one process on the same global batch up to rounding."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, num_classes))


class TinyCNN(nn.Sequential):
    """Tests only: conv3x3(8, stride 2)-BN-ReLU, global pool, FC."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def resnet50(num_classes: int) -> nn.Module:
    """torchvision's ResNet-50 from scratch (its own initialization), ``num_classes`` outputs."""
    from torchvision.models import resnet50 as torchvision_resnet50

    return torchvision_resnet50(weights=None, num_classes=num_classes)


MODELS = {"resnet50": resnet50, "tiny_mlp": TinyMLP, "tiny_cnn": TinyCNN}


def build_model(name: str, num_classes: int, sync_bn: bool) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    model = MODELS[name](num_classes)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync_bn else model


@dataclass
class Options:
    """How to run (not what): none of these changes the numbers beyond rounding (bf16 aside)."""

    backend: str = "auto"
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    workers: int = 4
    save_model: bool = False  # keep the final weights in models/<run>.pt (rank 0)


def _loader(dataset, batch: int, workers: int, group: Group, sampler=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                      pin_memory=torch.device(group.device).type == "cuda", generator=torch.Generator())


def evaluate(model: nn.Module, dataset, criterion_sum, batch: int, options: Options, group: Group, autocast) -> dict:
    """Loss and top-1 / top-5 accuracy (%) over the whole of ``dataset``: each rank takes every
    G-th sample (no padding, unlike DistributedSampler), one all-reduce of the sums."""
    part = Subset(dataset, range(group.rank, len(dataset), group.world))
    sums = torch.zeros(2 + len(TOP), dtype=torch.float64, device=group.device)  # loss, count, correct at each k
    model.eval()
    with torch.no_grad():
        for x, y in _loader(part, batch, options.workers, group):
            x, y = x.to(group.device), y.to(group.device)
            if options.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = model(x).float()
            ranked = logits.topk(max(TOP), dim=1).indices == y[:, None]
            sums += torch.stack([criterion_sum(logits, y).double(), torch.tensor(float(y.numel()), device=y.device,
                                 dtype=torch.float64), *(ranked[:, :k].any(1).sum().double() for k in TOP)])
    model.train()
    loss, count, *correct = all_sum(sums.tolist(), group, group.device)
    return {"loss": loss / count, **{f"top{k}": 100.0 * c / count for k, c in zip(TOP, correct)}}


def train_run(run, data, group: Group, options: Options, checkpoint: Path | None,
              make_loss: Callable, on_epoch: Callable[[int, dict], None] | None = None,
              before_write: Callable[[], None] | None = None) -> tuple[dict, nn.Module]:
    """Train ``run`` (a webvision_grid.WebRun) on ``data`` (webvision.WebVisionData) on every rank
    of ``group``; returns the run's record (the same on every rank) and the trained model. ``make_loss(reduction)`` gives
    the loss module. Rank 0 writes ``checkpoint`` after every epoch, calling ``before_write()`` first
    (it raises to stop: the run's lock lost), and resumes from it."""
    settings = run.settings
    device = torch.device(group.device)
    if settings.batch_size % group.world:
        raise ValueError(f"the global batch {settings.batch_size} does not split over {group.world} processes; "
                         f"use a process count that divides it")
    per_rank = settings.batch_size // group.world
    seed_everything(run.seed)
    model = build_model(settings.model, data.num_classes, settings.sync_bn and group.world > 1).to(device)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay, nesterov=settings.nesterov)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=STEP_GAMMA)
    criterion_sum = make_loss("sum")
    # A batch loss (ANL-CE-ER) has no per-row sum: its mean over this rank's batch (the official
    # single-process code's batch is the whole batch; docs/reproduction.md, "ANL-CE-ER").
    batch_loss = getattr(criterion_sum, "batch_loss", False)
    criterion = make_loss("mean") if batch_loss else None
    backend = backends.resolve(options.backend, device.type).name if not batch_loss else "torch"
    ran = asdict(options) | {"backend": backend, "world_size": group.world,
                                                         "batch_per_rank": per_rank}
    history = {name: [] for name in METRICS}
    record = {"run_id": run.run_id, "config": run.to_dict(), "settings": asdict(settings), "status": "running",
              "history": history, "epochs_done": 0, "wall_time_s": 0.0, "resumed_at_epochs": [],
              "options": ran | {"backends": [backend], "world_sizes": [group.world]},
              "versions": {"torch": str(torch.__version__), "python": platform.python_version()}}
    state = read_checkpoint(checkpoint, run) if group.main and checkpoint is not None else None
    state = broadcast(state, group)
    if state is not None:
        restore(state, record, checkpoint, run.run_id, model, optimizer, scheduler)
        record, history = state["record"], state["record"]["history"]
        if record["status"] == "running" and record["epochs_done"] < run.epochs:
            record["resumed_at_epochs"].append(record["epochs_done"])
            parts = record["options"]
            record["options"] = ran | {"backends": parts["backends"] + [backend],
                                       "world_sizes": parts["world_sizes"] + [group.world]}
    network = model
    if group.world > 1:
        network = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if options.compile:
        network = torch.compile(network)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.bf16)

    sampler = DistributedSampler(data.train, num_replicas=group.world, rank=group.rank, shuffle=True,
                                 seed=run.seed, drop_last=False)
    loader = _loader(data.train, per_rank, options.workers, group, sampler)
    for epoch in range(record["epochs_done"], run.epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        epoch_seed = (run.seed * 1_000_003 + epoch) * 4099 + group.rank
        torch.manual_seed(epoch_seed)  # the transforms' draws with workers=0
        loader.generator.manual_seed(epoch_seed)  # the workers' seeds otherwise
        history["lr"].append(optimizer.param_groups[0]["lr"])
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, divisor, correct
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if options.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = network(x).float()
            if batch_loss:
                loss = criterion(logits, y)
                local_sum, divisor = loss * y.numel(), torch.tensor(float(y.numel()), device=device)
            else:
                local_sum = criterion_sum(logits, y)
                divisor = mean_divisor(y, getattr(criterion_sum, "weight", None),
                                       getattr(criterion_sum, "ignore_index", -100))
                loss = global_mean(local_sum, divisor)
            optimizer_step(optimizer, model, loss, settings)
            with torch.no_grad():
                sums += torch.stack([local_sum.double(), divisor.double(), (logits.argmax(1) == y).sum().double()])
        scheduler.step()
        loss_sum, divisor, correct = all_sum(sums.tolist(), group, device)
        train_loss = loss_sum / divisor
        history["train_top1"].append(100.0 * correct / len(sampler) / group.world)
        record["epochs_done"] = epoch + 1
        if not math.isfinite(train_loss):
            history["train_loss"].append(None)
            for name in VAL_METRICS:
                history[name].append(None)
            record["status"], record["diverged_at_epoch"] = "diverged", epoch + 1
            record["wall_time_s"] += time.perf_counter() - started
            break
        history["train_loss"].append(train_loss)
        for name, dataset in data.val_sets.items():
            result = evaluate(model, dataset, criterion_sum, per_rank, options, group, autocast)
            for metric, value in result.items():
                history[f"{name}_{metric}"].append(value)
        record["wall_time_s"] += time.perf_counter() - started
        if group.main and checkpoint is not None:
            if before_write is not None:
                before_write()
            # generator and torch_rng: the fields train.read_checkpoint checks; nothing is drawn from
            # them here (the sampler and the augmentation are reseeded per epoch)
            saved = {"record": record, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "generator": torch.Generator().get_state(),
                     "torch_rng": torch.get_rng_state()}
            store.write_verified(checkpoint, lambda f: torch.save(saved, f),
                                 f"; the last complete checkpoint of {run.run_id} is intact: free some space "
                                 f"and run the same command again")
        if on_epoch is not None:
            on_epoch(epoch + 1, record)
    if record["status"] == "running":
        record["status"] = "finished"
    for name in VAL_METRICS:
        values = history[name]
        record[f"final_{name}"] = values[-1] if record["status"] == "finished" and values else None
    return record, model
