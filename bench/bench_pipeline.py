"""Input pipeline benchmark: batches of 128 augmented CIFAR-10-shaped images per second.

    python -m pytest bench/bench_pipeline.py --benchmark-enable

(The test suite runs it too, once and untimed, so that it keeps working.)

Group ``cifar10-batch`` compares, on the same CPU cores:

* ``tensor_pipeline``: apl_kernels.data.BatchAugment on a uint8 tensor of the whole training set
  (one gather for crop + flip of the batch, one multiply-add to normalize), as the trainer runs it,
  with one torch thread and with one per core;
* ``torchvision_dataloader``: a DataLoader with the published PIL transforms (RandomCrop(32, padding=4),
  RandomHorizontalFlip, ToTensor, Normalize), one worker process per core.

Each round delivers one batch, so the OPS column is batches per second and the table's ratio
column is the speed-up. ``cnn8-step`` is a whole CNN8 training step on a batch of 128 on CPU, for
reference (the pipeline is a small part of it). The dataset is generated in memory (no download).
"""

import os

import numpy as np
import pytest
import torch

from apl_kernels.nn import get_loss
from apl_kernels.reproduce import datasets
from apl_kernels.reproduce.models import CNN8
from apl_kernels.reproduce.settings import SETTINGS

IMAGES = 10_240
BATCH = 128
INFO = datasets.DATASETS["cifar10"]
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.fixture(scope="module")
def images_hwc() -> np.ndarray:
    """CIFAR-10-shaped uint8 images (N, 32, 32, 3), as torchvision holds them."""
    return np.random.default_rng(0).integers(0, 256, (IMAGES, 32, 32, 3), dtype=np.uint8)


class PILDataset(torch.utils.data.Dataset):
    """torchvision's CIFAR10.__getitem__: a PIL image per sample through the transforms."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def endless(loader):
    while True:
        yield from loader


@pytest.mark.benchmark(group="cifar10-batch")
def test_torchvision_dataloader_with_pil_transforms(benchmark, images_hwc):
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(INFO.mean, INFO.std),
    ])
    labels = np.zeros(IMAGES, dtype=np.int64)
    loader = torch.utils.data.DataLoader(PILDataset(images_hwc, labels, transform), batch_size=BATCH,
                                         shuffle=True, num_workers=CORES, persistent_workers=True)
    batches = endless(loader)
    x, _ = benchmark.pedantic(lambda: next(batches), rounds=150, warmup_rounds=20)
    assert x.shape == (BATCH, 3, 32, 32) and x.dtype == torch.float32
    benchmark.extra_info["workers"] = CORES


@pytest.fixture
def torch_threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.benchmark(group="cifar10-batch")
@pytest.mark.parametrize("torch_threads", sorted({1, CORES}), indirect=True, ids=lambda n: f"{n}-threads")
def test_tensor_pipeline(benchmark, images_hwc, torch_threads):
    images = torch.from_numpy(images_hwc).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
    augment = datasets.BatchAugment(INFO, INFO.mean, INFO.std, "cpu")
    generator = torch.Generator().manual_seed(0)
    state = {"order": torch.randperm(IMAGES, generator=generator), "start": 0}

    def next_batch():  # as the trainer: a slice of a random permutation, gathered and augmented
        if state["start"] + BATCH > IMAGES:
            state["order"], state["start"] = torch.randperm(IMAGES, generator=generator), 0
        index = state["order"][state["start"]:state["start"] + BATCH]
        state["start"] += BATCH
        return augment(images[index], generator)

    x = benchmark.pedantic(next_batch, rounds=2000, warmup_rounds=50)
    assert x.shape == (BATCH, 3, 32, 32) and x.dtype == torch.float32
    benchmark.extra_info["threads"] = torch_threads


@pytest.mark.benchmark(group="cnn8-step")
def test_cnn8_training_step_on_cpu(benchmark):
    settings = SETTINGS["cifar10"]
    torch.manual_seed(0)
    model = CNN8()
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    criterion = get_loss("nce+rce")
    x = torch.randn(BATCH, 3, 32, 32)
    y = torch.randint(0, 10, (BATCH,))

    def step():
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        return loss.item()

    assert np.isfinite(benchmark.pedantic(step, rounds=5, warmup_rounds=1))
    benchmark.extra_info["threads"] = torch.get_num_threads()
    if benchmark.stats is not None:  # None when timing is off (--benchmark-disable, the test suite)
        benchmark.extra_info["images_per_second"] = BATCH / benchmark.stats.stats.median
