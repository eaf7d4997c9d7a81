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

Targets are class indices, and for ``nce+rce`` also class probabilities (N, K) (``target``
``probabilities`` in the report: mixup-style soft targets read alongside the logits).

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
from apl_kernels.options import CallOptions
from apl_kernels.testing.cases import SPEED_SHAPES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Quick mode (the test suite runs benchmarks once each, with timing disabled): every
# implementation and dtype once, at the two smallest shapes, for one loss.
QUICK = os.environ.get("APL_BENCH_QUICK") == "1"
SHAPES = SPEED_SHAPES[DEVICE][: 2 if QUICK else None]
LOSSES = ["nfl+rce"] if QUICK else ["nce+mae", "nce+rce", "nfl+rce", "ngce+mae", "nce+agce", "nce+nnce"]
# (loss, target kind): class indices for every loss, and probability targets for one.
CASES = [(name, "index") for name in LOSSES] + [("nce+rce", "probabilities")]
DTYPES = [torch.float32, torch.bfloat16]
MODES = ["forward", "forward+backward"]
# (Triton kernels on CPU tensors are the interpreter's: they are tested, never timed.)
FUSED = [b for b in {"cpu": ("cpp",), "cuda": ("triton", "cuda")}[DEVICE] if b in ak.available_backends(DEVICE)]
BASELINES = ["eager", "compile"]


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def inputs(shape, dtype, target_kind="index"):
    n, k = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(n, k, generator=g, device=DEVICE) * 3).to(dtype)
    if target_kind == "probabilities":
        target = torch.softmax(torch.randn(n, k, generator=g, device=DEVICE), dim=1).to(dtype)
    else:
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
        return reference.reference_loss(logits, target, None, spec, CallOptions())

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
        # read the logits and the targets, write the gradient
        bytes_moved=2 * n * k * logits.element_size() + target.numel() * target.element_size(),
    )
    benchmark(step, fn, logits, target, mode)
    if DEVICE == "cuda":
        benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated()
    if mode == "forward+backward":
        benchmark.extra_info["saved_bytes"] = saved_bytes(fn, logits, target)


def one_shape_per_k(shapes):
    """The largest shape of each K (probability targets are timed once per K)."""
    return [s for s in shapes if not any(o[1] == s[1] and o[0] > s[0] for o in shapes)]


PARAMS = [(name, kind, shape) for name, kind in CASES
          for shape in (SHAPES if kind == "index" else one_shape_per_k(SHAPES))]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name,target_kind,shape", PARAMS,
                         ids=[f"{n}-{k}-{s[0]}x{s[1]}" for n, k, s in PARAMS])
@pytest.mark.parametrize("impl", FUSED + BASELINES)
def test_loss(benchmark, impl, name, target_kind, shape, dtype, mode):
    benchmark.group = f"{shape[0]}x{shape[1]} {str(dtype).replace('torch.', '')} {mode}"
    benchmark.extra_info["loss"] = name if target_kind == "index" else f"{name} ({target_kind})"
    logits, target = inputs(shape, dtype, target_kind)
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
