"""What a grid costs: counted FLOPs of the network and a training step timed on the device."""

from __future__ import annotations

import math
import statistics
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


def measure_step_seconds(dataset: str, device: str, backend: str, steps: int = 3, model_name: str | None = None,
                         min_seconds: float = 0.0) -> float:
    """Seconds per training step (batch of the spec, CE) of the dataset's network on ``device``:
    the median of ``steps`` steps (more while they took less than ``min_seconds`` in all) after one
    that warms up."""
    from ..nn import get_loss
    from .models import build_model

    info, settings = datasets.DATASETS[dataset], SETTINGS[dataset]
    model = build_model(model_name or settings.model, info.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    criterion = get_loss("ce", backend=backend)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(settings.batch_size, *info.image_shape, device=device, generator=generator)
    y = torch.randint(0, info.num_classes, (settings.batch_size,), device=device, generator=generator)
    times: list[float] = []
    while len(times) <= steps or (sum(times[1:]) < min_seconds and len(times) <= 100):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])  # the first step warms up


def choose_threads(dataset: str, backend: str, model_name: str | None = None) -> tuple[int, str]:
    """The CPU thread count that trains the dataset's network fastest here, by measurement: 1, 2,
    4, ... up to torch's default, stopping at the first that is not faster. Returns it and a line
    saying what was measured."""
    default = torch.get_num_threads()
    candidates = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n < default] + [default]
    measured: dict[int, float] = {}
    try:
        for threads in candidates:
            torch.set_num_threads(threads)
            measured[threads] = measure_step_seconds(dataset, "cpu", backend, 2, model_name, min_seconds=0.2)
            if len(measured) > 1 and measured[threads] >= 0.95 * min(list(measured.values())[:-1]):
                break
    finally:
        torch.set_num_threads(default)
    best = min(measured, key=measured.get)
    model = model_name or SETTINGS[dataset].model
    timings = ", ".join(f"{n}: {t * 1e3:.1f} ms" for n, t in measured.items())
    return best, (f"CPU threads: {best}, the fastest for {model} at batch {SETTINGS[dataset].batch_size} "
                  f"(measured per training step with threads {timings}; --threads N to choose)")


def estimate_cost(runs: list[RunConfig], device: str, backend: str) -> str:
    """A few lines: training FLOPs of ``runs`` and their time at a step time measured on ``device``."""
    if not runs:
        return "nothing to train"
    from .models import build_model

    lines = []
    for model_name in dict.fromkeys(run.settings.model for run in runs):
        group = [run for run in runs if run.settings.model == model_name]
        dataset = group[0].dataset
        info, batch = datasets.DATASETS[dataset], group[0].settings.batch_size
        macs = forward_macs(build_model(model_name, info.num_classes), info.image_shape)
        epochs = sum(run.epochs for run in group)
        # Training is about 3 forward passes (forward, backward to inputs, backward to weights);
        # the test set is one forward pass per epoch.
        flops = 2 * macs * epochs * (3 * info.train_size + info.test_size)
        step = measure_step_seconds(dataset, device, backend, model_name=model_name)
        steps_per_epoch = math.ceil(info.train_size / batch)
        seconds = epochs * step * (steps_per_epoch + info.test_size / batch / 3)
        lines.append(
            f"{len(group)} runs, {epochs} epochs in all, on the full {info.title} "
            f"({info.train_size} training images): {model_name} does {macs / 1e6:.1f} MMAC per "
            f"image, so about {flops / 1e15:,.1f} PFLOP of training.\n"
            f"Measured here: {step * 1e3:.0f} ms per training step of {batch} on {device}, "
            f"so about {seconds / 3600:.1f} hours on this device (an estimate: {steps_per_epoch} steps "
            f"and a test pass per epoch at that speed; nothing else measured).")
    return "\n".join(lines)
