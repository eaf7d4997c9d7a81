"""What a grid costs: counted FLOPs of the network and a training step timed on the device."""

from __future__ import annotations

import math
import time

import torch

from . import datasets
from .settings import SETTINGS
from .train import RunConfig


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
    from ..nn import get_loss
    from .models import build_model

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
