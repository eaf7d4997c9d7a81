"""Speed and memory of the fused losses against their baselines (pytest-benchmark).

Run the whole suite and get the report with ``python bench/run.py`` (README,
"Benchmarks"). Each benchmark times one implementation of one loss at one
shape, dtype and mode; warm-up (and torch.compile's compilation) happen before
timing. Implementations:

* every fused backend available for the device (``cpp``; ``triton``, ``cuda``);
* ``eager``: the PyTorch reference, the way the published code computes;
* ``compile``: ``torch.compile`` of the reference (dynamic shapes, compiled once
  per loss, dtype and mode);
* ``cross_entropy``: ``torch.nn.functional.cross_entropy``, the cost floor of
  any loss over softmax;
* ``copy``: a copy of the logits' bytes into the gradient's, the memory floor.

Each result carries in ``extra_info`` the bytes a fused forward plus backward
must move (read the logits, write the gradient) and the bytes the
implementation saves for backward; on CUDA, the peak allocated memory.
"""

from __future__ import annotations

import os

import pytest
import torch

import apl_kernels as ak
from apl_kernels import reference
from apl_kernels.catalogue import make_spec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Quick mode (the test suite runs benchmarks once each, with timing disabled): every
# implementation and dtype once, at the two smallest shapes, for one loss.
QUICK = os.environ.get("APL_BENCH_QUICK") == "1"
SHAPES = {
    "cpu": [(128, 10), (4096, 10), (8192, 100), (4096, 1000), (1024, 32000)],
    "cuda": [(65536, 10), (65536, 100), (16384, 1000), (4096, 32000), (1024, 128000)],
}[DEVICE][: 2 if QUICK else None]
LOSSES = ["nfl+rce"] if QUICK else ["nce+mae", "nce+rce", "nfl+rce", "ngce+mae"]
DTYPES = [torch.float32, torch.bfloat16]
MODES = ["forward", "forward+backward"]
# (Triton kernels on CPU tensors are the interpreter's: they are tested, never timed.)
FUSED = [b for b in {"cpu": ("cpp",), "cuda": ("triton", "cuda")}[DEVICE] if b in ak.available_backends(DEVICE)]
BASELINES = ["eager", "compile"]


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def inputs(shape, dtype):
    n, k = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(n, k, generator=g, device=DEVICE) * 3).to(dtype)
    target = torch.randint(0, k, (n,), generator=g, device=DEVICE)
    return logits, target


_compiled: dict = {}


def loss_function(impl: str, name: str, dtype):
    """``f(logits, target) -> loss`` of one implementation."""
    if impl in FUSED:
        criterion = ak.get_loss(name, backend=impl)
        return criterion
    spec = make_spec(name)

    def eager(logits, target):
        return reference.reference_loss(logits, target, spec, "mean", -100)

    if impl == "eager":
        return eager
    key = (name, dtype)
    if key not in _compiled:
        _compiled[key] = torch.compile(eager, dynamic=True)
    return _compiled[key]


def step(fn, logits, target, mode):
    """One timed call: forward, forward and backward, or (the floor) a copy."""
    if mode == "copy":
        fn(logits, target)
    elif mode == "forward":
        with torch.no_grad():
            fn(logits, target)
    else:
        x = logits.detach().requires_grad_()
        fn(x, target).backward()
    synchronize()


def saved_bytes(fn, logits, target) -> int:
    """Bytes the implementation keeps for backward (saved_tensors_hooks; a storage counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = logits.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(x, target)
    loss.backward()
    return sum(storages.values())


def record(benchmark, fn, logits, target, mode, impl):
    n, k = logits.shape
    step(fn, logits, target, mode)  # warm-up: compilation, caches, the extension's first load
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.extra_info.update(
        device=DEVICE, impl=impl, n=n, k=k, dtype=str(logits.dtype).replace("torch.", ""), mode=mode,
        bytes_moved=2 * n * k * logits.element_size() + n * 8,
    )
    benchmark(step, fn, logits, target, mode)
    if DEVICE == "cuda":
        benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated()
    if mode == "forward+backward":
        benchmark.extra_info["saved_bytes"] = saved_bytes(fn, logits, target)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("impl", FUSED + BASELINES)
def test_loss(benchmark, impl, name, shape, dtype, mode):
    benchmark.group = f"{shape[0]}x{shape[1]} {str(dtype).replace('torch.', '')} {mode}"
    benchmark.extra_info["loss"] = name
    logits, target = inputs(shape, dtype)
    record(benchmark, loss_function(impl, name, dtype), logits, target, mode, impl)


def cross_entropy(logits, target):
    return torch.nn.functional.cross_entropy(logits, target)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cross_entropy_floor(benchmark, shape, dtype, mode):
    benchmark.group = f"{shape[0]}x{shape[1]} {str(dtype).replace('torch.', '')} {mode}"
    benchmark.extra_info["loss"] = "cross_entropy"
    logits, target = inputs(shape, dtype)
    record(benchmark, cross_entropy, logits, target, mode, "cross_entropy")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_copy_floor(benchmark, shape, dtype):
    """A copy moving the bytes a fused forward plus backward must move: the physical floor."""
    benchmark.group = f"{shape[0]}x{shape[1]} {str(dtype).replace('torch.', '')} copy"
    benchmark.extra_info["loss"] = "copy"
    logits, target = inputs(shape, dtype)
    destination = torch.empty_like(logits)
    record(benchmark, lambda source, _: destination.copy_(source), logits, target, "copy", "copy")
