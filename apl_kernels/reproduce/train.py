"""Training one run of the reproduction grid: the spec's settings, metrics, checkpoints, NaN handling.

One run = a dataset, a loss with its parameters, a noise kind and rate, a seed, a number of
epochs, a settings variant and changes to the settings (:class:`RunConfig`). :func:`train_run`
trains it with the dataset's published settings (settings.training_settings) and returns its
record (what the run's JSON file holds). With a ``checkpoint_path`` it saves its whole state after
every epoch (atomically, with the SHA-256 digest of its content: store.write_verified) and, if a
checkpoint of the same run exists, continues from it, so an interrupted run loses at most one
epoch; a damaged checkpoint (its digest does not match) is moved aside and the run restarts.
"""

from __future__ import annotations

import io
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import backends
from ..nn import get_loss
from . import datasets, store
from .models import build_model
from .noise import cell_name, make_noisy_labels
from .settings import Settings, training_settings

EVAL_BATCH = 1024
METRICS = ("lr", "train_loss", "train_acc_noisy", "train_acc_clean", "test_loss", "test_acc")


@dataclass(frozen=True)
class RunConfig:
    """What identifies a run; two runs with equal configs must give the same numbers."""

    dataset: str
    loss: str
    noise: str  # a kind of apl_kernels.noise.NOISE_KINDS
    rate: float | str  # for human noise, the CIFAR-N label set (noise.HUMAN_LABEL_SETS)
    seed: int
    epochs: int
    loss_params: dict = field(default_factory=dict)
    variant: str = "paper"  # the dataset's training settings: "paper" or "released"
    # Changes to those settings (Settings fields), e.g. {"weight_decay": 0.0, "l1": 5e-5} for ANL:
    # "l1" is delta of the L1 penalty delta * sum|theta| over every model parameter.
    overrides: dict = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        """A file-name-safe identifier, e.g. ``cifar10_nce+rce_sym0.4_seed1``."""
        return f"{self.dataset}_{self.loss}_{cell_name(self.noise, self.rate)}_seed{self.seed}"

    @property
    def settings(self) -> Settings:
        """The training settings this run trains with."""
        return training_settings(self.dataset, self.variant, self.overrides, self.epochs)

    def to_dict(self) -> dict:
        """The configuration as stored in the run's files (defaults of the later fields left out, so
        that runs stored before those fields existed keep their identity)."""
        config = asdict(self)
        for name, default in (("variant", "paper"), ("overrides", {})):
            if config[name] == default:
                del config[name]
        return config


@dataclass
class Options:
    """How to run (not what): none of these may change the numbers beyond rounding."""

    device: str = "cpu"
    backend: str = "auto"
    bf16: bool = False  # bfloat16 autocast of the network (CUDA only)
    channels_last: bool = False  # channels-last memory format (CUDA only)
    compile: bool = False  # torch.compile the network
    progress: bool = True  # a tqdm bar over the epochs

    def check(self) -> None:
        """Raise ``ValueError`` (one line first) unless these options can run here; loads the backend."""
        device_type = torch.device(self.device).type
        if device_type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for but CUDA is not available here; use --device cpu")
        for flag in ("bf16", "channels_last"):
            if getattr(self, flag) and device_type != "cuda":
                raise ValueError(f"--{flag.replace('_', '-')} is a CUDA option; the device is {self.device!r}")
        backends.resolve(self.backend, device_type)  # unknown, not for this device, or cannot load


class ConfigMismatch(ValueError):
    """A saved run (checkpoint or result) has the same name as a run asked for but other settings."""


def l1_norm(model: nn.Module) -> torch.Tensor:
    """``sum |theta|`` over every parameter of ``model`` (batch norm and biases included)."""
    return sum(p.abs().sum() for p in model.parameters())


def objective(loss: torch.Tensor, model: nn.Module, l1: float) -> torch.Tensor:
    """What backward differentiates: the loss plus ``l1 * sum|theta|``, as the published ANL code
    adds its L1 penalty to the loss before backward."""
    return loss + l1 * l1_norm(model) if l1 else loss


def optimizer_step(optimizer: torch.optim.Optimizer, model: nn.Module, loss: torch.Tensor, settings) -> None:
    """One step of the papers' training: the objective's gradient (the loss plus ``settings.l1``'s
    penalty), its norm clipped to ``settings.grad_clip``, the optimizer's step."""
    optimizer.zero_grad(set_to_none=True)
    objective(loss, model, settings.l1).backward()
    nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (model initialization uses torch's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, augment, criterion_sum,
             autocast) -> tuple[float, float]:
    """(mean loss, accuracy in %) of ``model`` on un-augmented ``images`` against ``labels``."""
    model.eval()
    loss_sum = torch.zeros((), device=labels.device)
    correct = torch.zeros((), dtype=torch.long, device=labels.device)
    with torch.no_grad():
        for start in range(0, labels.numel(), EVAL_BATCH):
            x = augment.normalize(images[start:start + EVAL_BATCH])
            y = labels[start:start + EVAL_BATCH]
            with autocast():
                logits = model(x).float()
            loss_sum += criterion_sum(logits, y)
            correct += (logits.argmax(1) == y).sum()
    model.train()
    return loss_sum.item() / labels.numel(), 100.0 * correct.item() / labels.numel()


def restore(state: dict, record: dict, checkpoint: Path, run_id: str, model, optimizer, scheduler) -> None:
    """Load a checkpoint's model, optimizer and scheduler; ConfigMismatch if its run was configured
    otherwise than ``record`` says (the same run id, another configuration)."""
    if state["record"]["config"] != record["config"]:
        raise ConfigMismatch(f"checkpoint {checkpoint} is of another configuration of run {run_id}; "
                             f"delete it or use another output directory")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def read_checkpoint(path: Path, config: RunConfig) -> dict | None:
    """The state saved in checkpoint ``path``, or ``None`` if there is none; a damaged one
    (truncated, empty, altered: its digest does not match; written before checkpoints had one; not
    a checkpoint) is moved aside with a warning and ``None`` returned."""
    if not path.exists():
        return None
    try:
        state = torch.load(io.BytesIO(store.read_verified(path)), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"record", "model", "optimizer", "scheduler", "generator",
                                                "torch_rng"} <= set(state):
            raise TypeError
        state["record"]["config"], state["record"]["epochs_done"], state["record"]["options"]["backends"]
    except Exception as err:  # whatever a damaged file makes reading it or torch.load raise
        reason = ("not a checkpoint of this trainer" if isinstance(err, (KeyError, TypeError))
                  else store.first_line(err).split(". ")[0])  # torch's first sentence, not its advice
        store.move_aside(path, f"not a readable checkpoint: {reason}", f"run {config.run_id} restarts from epoch 0")
        return None
    return state


def train_run(config: RunConfig, data: datasets.Data, options: Options | None = None,
              checkpoint_path: str | Path | None = None,
              on_epoch: Callable[[int, dict], None] | None = None,
              before_write: Callable[[], None] | None = None) -> dict:
    """Train ``config`` on ``data`` (already on ``options.device``) and return the run's record.

    ``on_epoch(epoch, record)`` is called after each epoch's checkpoint is written, ``before_write()``
    before it is (it raises to stop the run: a grid's lock lost, store.LockLost).
    The record's ``status`` is ``"finished"`` or ``"diverged"`` (the training loss became NaN or
    infinite: the run stops there and keeps the epochs before it). The training loss recorded is the
    loss function's; an L1 penalty (``settings.l1``) is added to it for the gradient only.
    """
    options = options or Options()
    options.check()
    if config.dataset != data.name:
        raise ValueError(f"run {config.run_id} is for {config.dataset!r} but the data is {data.name!r}")
    settings = config.settings
    device = torch.device(options.device)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None

    clean_labels = data.train_labels.cpu().numpy()
    noisy = make_noisy_labels(config.dataset, config.noise, config.rate, clean_labels, data.num_classes,
                              config.seed, data.human_labels)
    noisy_labels = torch.from_numpy(noisy.labels).to(device)

    seed_everything(config.seed)
    model = build_model(settings.model, data.num_classes).to(device)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay, nesterov=settings.nesterov)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs,
                                                           eta_min=settings.lr_min)
    criterion = get_loss(config.loss, backend=options.backend, **config.loss_params)
    criterion_sum = get_loss(config.loss, backend=options.backend, reduction="sum", **config.loss_params)
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)
    augment = datasets.BatchAugment(data.info, data.mean, data.std, device)
    network = torch.compile(model) if options.compile else model

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.bf16)

    ran = ({k: v for k, v in asdict(options).items() if k != "progress"}
           | {"backend": backends.resolve(options.backend, device.type).name,
              "backend_requested": options.backend, "threads": torch.get_num_threads()})
    history = {name: [] for name in METRICS}
    record = {
        "run_id": config.run_id,
        "config": config.to_dict(),
        "settings": asdict(settings),
        "status": "running",
        "noise": {"realized_rate": noisy.rate, "transition": noisy.transition.round(6).tolist()},
        "history": history,
        "epochs_done": 0,
        "wall_time_s": 0.0,
        "resumed_at_epochs": [],
        "options": ran | {"backends": [ran["backend"]]},  # the backend of each part trained
        "versions": {"torch": str(torch.__version__), "python": platform.python_version()},
    }
    state = read_checkpoint(checkpoint_path, config) if checkpoint_path is not None else None
    if state is not None:
        restore(state, record, checkpoint_path, config.run_id, model, optimizer, scheduler)
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        record = state["record"]
        history = record["history"]
        if record["status"] == "running" and record["epochs_done"] < config.epochs:
            record["resumed_at_epochs"].append(record["epochs_done"])  # training goes on from there
            # with this process's options: the record's options are those of its last part
            record["options"] = ran | {"backends": record["options"]["backends"] + [ran["backend"]]}

    train_images, train_count = data.train_images, data.train_labels.numel()
    just_resumed = record["resumed_at_epochs"][-1:] == [record["epochs_done"]]
    resumed = f" (resumed from epoch {record['epochs_done']})" if just_resumed else ""
    bar = tqdm(total=config.epochs, initial=record["epochs_done"], desc=config.run_id + resumed, unit="epoch",
               leave=False, disable=not options.progress, dynamic_ncols=True)
    try:
        for epoch in range(record["epochs_done"], config.epochs):
            started = time.perf_counter()
            history["lr"].append(optimizer.param_groups[0]["lr"])
            loss_sum = torch.zeros((), device=device)
            correct_noisy = torch.zeros((), dtype=torch.long, device=device)
            correct_clean = torch.zeros((), dtype=torch.long, device=device)
            order = torch.randperm(train_count, generator=generator, device=device)
            seen = 0
            for start in range(0, train_count, settings.batch_size):
                index = order[start:start + settings.batch_size]
                if index.numel() == 1 and start > 0:
                    continue  # batch norm cannot train on a batch of one sample: skip it
                x = augment(train_images[index], generator)
                if options.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = noisy_labels[index]
                with autocast():
                    logits = network(x).float()
                loss = criterion(logits, y)
                optimizer_step(optimizer, model, loss, settings)
                with torch.no_grad():
                    predicted = logits.argmax(1)
                    seen += index.numel()
                    loss_sum += loss.detach() * index.numel()
                    correct_noisy += (predicted == y).sum()
                    correct_clean += (predicted == data.train_labels[index]).sum()
            scheduler.step()
            train_loss = loss_sum.item() / seen
            history["train_acc_noisy"].append(100.0 * correct_noisy.item() / seen)
            history["train_acc_clean"].append(100.0 * correct_clean.item() / seen)
            if not math.isfinite(train_loss):  # recorded as None: the JSON files stay strict JSON
                for name in ("train_loss", "test_loss", "test_acc"):
                    history[name].append(None)
                record["status"] = "diverged"
                record["diverged_at_epoch"] = epoch + 1
                record["epochs_done"] = epoch + 1
                record["wall_time_s"] += time.perf_counter() - started
                break
            history["train_loss"].append(train_loss)
            test_loss, test_acc = evaluate(network, data.test_images, data.test_labels, augment,
                                           criterion_sum, autocast)
            history["test_loss"].append(test_loss)
            history["test_acc"].append(test_acc)
            record["epochs_done"] = epoch + 1
            record["wall_time_s"] += time.perf_counter() - started
            if checkpoint_path is not None:  # also after the last epoch: the result is written later
                state = {"record": record, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                         "torch_rng": torch.get_rng_state()}
                kept = (f"; the last complete checkpoint of {config.run_id} (epoch {epoch}) is intact"
                        if epoch else f"; {config.run_id} had no checkpoint yet")
                if before_write is not None:
                    before_write()
                store.write_verified(checkpoint_path, lambda f: torch.save(state, f),
                                     kept + ": free some space and run the same command again")
            bar.update(1)
            bar.set_postfix(test_acc=f"{test_acc:.2f}", loss=f"{train_loss:.4f}")
            if on_epoch is not None:
                on_epoch(epoch + 1, record)
    finally:
        bar.close()

    if record["status"] == "running":
        record["status"] = "finished"
    accuracies = [a for a in history["test_acc"] if a is not None]
    record["final_test_acc"] = accuracies[-1] if record["status"] == "finished" else None
    if accuracies:
        best = int(np.argmax(accuracies))
        record["best_test_acc"], record["best_epoch"] = accuracies[best], best + 1
    else:
        record["best_test_acc"], record["best_epoch"] = None, None
    return record
