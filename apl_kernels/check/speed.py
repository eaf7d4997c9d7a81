"""Phase 4: speed against the reference and torch.compile, then a CNN's training throughput."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import apl_kernels as ak
from apl_kernels import reference
from apl_kernels.catalogue import make_spec
from apl_kernels.options import CallOptions
from apl_kernels.testing.cases import SPEED_SHAPES
from .common import Check, Progress, SPEED_DTYPES, SPEED_LOSSES, TRAIN_BATCH, dtype_name, short


# ---------------------------------------------------------------- 4. speed and training


def measure(check: Check, step, seconds: float) -> float:
    """Median seconds of ``step`` over batches of calls filling about ``seconds`` (one untimed
    call first: compilation, caches, the allocator)."""
    step()
    check.sync()
    started = time.perf_counter()
    step()
    check.sync()
    once = max(time.perf_counter() - started, 1e-7)
    calls = max(1, min(10000, int(seconds / 10 / once)))
    samples, end = [], time.perf_counter() + seconds
    while len(samples) < 3 or (time.perf_counter() < end and len(samples) < 10):
        started = time.perf_counter()
        for _ in range(calls):
            step()
        check.sync()
        samples.append((time.perf_counter() - started) / calls)
    return statistics.median(samples)


def peak_bytes(check: Check, step) -> int | None:
    """Memory one call allocates beyond what was allocated before it (CUDA only)."""
    if not check.cuda:
        return None
    check.sync()
    before = torch.cuda.memory_allocated(check.device)
    torch.cuda.reset_peak_memory_stats(check.device)
    step()
    check.sync()
    return torch.cuda.max_memory_allocated(check.device) - before


def reference_function(name: str):
    spec = make_spec(name)
    return lambda logits, target: reference.reference_loss(logits, target, None, spec, CallOptions())


def speed(check: Check, deadline: float) -> None:
    device = check.device
    g = torch.Generator(device=device).manual_seed(check.seed)
    combos = [(shape, dtype) for shape in SPEED_SHAPES[device.type] for dtype in SPEED_DTYPES]
    data = {(s, d): ((torch.randn(*s, generator=g, device=device) * 3).to(d),
                     torch.randint(0, s[1], (s[0],), generator=g, device=device)) for s, d in combos}
    compiled: dict = {}

    def function(impl: str, name: str, dtype):
        if impl in check.fused:
            return ak.get_loss(name, backend=impl)
        if impl == "eager":
            return reference_function(name)
        if impl == "F.cross_entropy":
            return nn.functional.cross_entropy
        if (name, dtype) not in compiled:  # compiled once per loss and dtype, outside the timings
            compiled[(name, dtype)] = torch.compile(reference_function(name), dynamic=True)
        return compiled[(name, dtype)]

    def step_of(impl: str, name: str, combo):
        logits, target = data[combo]
        if impl == "copy":
            destination = torch.empty_like(logits)
            return lambda: destination.copy_(logits)
        fn = function(impl, name, combo[1])
        return lambda: fn(logits.detach().requires_grad_(), target).backward()

    # Run in order of worth (a budget cut drops the last: compiled baselines), report by shape.
    items = [("copy", "", c) for c in combos]
    items += [(b, n, c) for b in check.timed() for c in combos for n in SPEED_LOSSES]
    items += [("F.cross_entropy", "", c) for c in combos]
    items += [(impl, n, c) for impl in ("eager", "torch.compile") for c in combos for n in SPEED_LOSSES]
    results: dict = {}
    progress = Progress("speed", len(items))
    for position, (impl, name, combo) in enumerate(items):
        if check.lost_device or time.monotonic() > deadline:
            check.speed_notes.append(f"{len(items) - position} of {len(items)} timings not run: "
                                     f"{check.lost_device or 'the time budget ran out'}")
            break
        seconds = min(2.0, max(0.05, (deadline - time.monotonic()) / (len(items) - position) / 2))
        try:
            if impl == "torch.compile" and (name, combo[1]) not in compiled and deadline - time.monotonic() < 30:
                raise TimeoutError("not run: too little time left to compile")
            step = step_of(impl, name, combo)
            results[(impl, name, combo)] = (measure(check, step, seconds), peak_bytes(check, step))
        except Exception as err:  # noqa: BLE001
            results[(impl, name, combo)] = short(err, 120)
            if impl in check.fused:
                check.fail(f"speed {impl} {name} {dtype_name(combo[1])} {combo[0]}: {short(err)}", progress)
        progress.step(f"{impl} {name} {combo[0][0]}x{combo[0][1]}")
    progress.close()
    for (n, k), dtype in combos:
        copy = results.get(("copy", "", ((n, k), dtype)))
        bytes_moved = 2 * n * k * dtype.itemsize + 8 * n  # read logits and labels, write the gradient
        for impl, name, combo in items:
            if combo != ((n, k), dtype) or (impl, name, combo) not in results:
                continue
            result, eager = results[(impl, name, combo)], results.get(("eager", name, combo))
            if isinstance(result, str):
                check.speed_rows.append([f"{n} x {k}", dtype_name(dtype), name, impl, result, "", "", "", ""])
                continue
            seconds, peak = result
            moved = 2 * n * k * dtype.itemsize if impl == "copy" else bytes_moved
            copy_rate = 2 * n * k * dtype.itemsize / copy[0] if isinstance(copy, tuple) else None
            fused_ratio = impl in check.fused and isinstance(eager, tuple)
            check.speed_rows.append([
                f"{n} x {k}", dtype_name(dtype), name or "-", impl, f"{seconds * 1e3:.3g}",
                f"{moved / seconds / 1e9:.3g}",
                f"{100 * moved / seconds / copy_rate:.0f} %" if copy_rate else "",
                f"{eager[0] / seconds:.2f}" if fused_ratio else "", "" if peak is None else f"{peak / 2**20:.1f}"])


def training(check: Check, deadline: float) -> None:
    """CNN8 (the paper's CIFAR-10 network) at batch 128, SGD as the reproduction trains it, on
    synthetic CIFAR-10-shaped data resident on the device: images per second per loss backend."""
    from apl_kernels.reproduce.models import CNN8
    from apl_kernels.reproduce.settings import training_settings

    settings = training_settings("cifar10")
    g = torch.Generator(device=check.device).manual_seed(check.seed)
    images = torch.randn(16 * TRAIN_BATCH, *CNN8.input_shape, generator=g, device=check.device)
    labels = torch.randint(0, 10, (images.shape[0],), generator=g, device=check.device)
    impls = ["torch"] + check.timed() + ["F.cross_entropy"]
    progress = Progress("training", len(impls))
    for position, impl in enumerate(impls):
        if check.lost_device or time.monotonic() > deadline:
            check.training_rows.append([impl, "not run (time budget)", "", ""])
            continue
        torch.manual_seed(check.seed)
        model = CNN8().to(check.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
        criterion = nn.CrossEntropyLoss() if impl == "F.cross_entropy" else ak.NCERCE(backend=impl)
        steps = [0]

        def step():
            start = steps[0] * TRAIN_BATCH % images.shape[0]
            steps[0] += 1
            loss = criterion(model(images[start:start + TRAIN_BATCH]), labels[start:start + TRAIN_BATCH])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()

        try:
            seconds = measure(check, step, (deadline - time.monotonic()) / (len(impls) - position) / 2)
            loss_name = "cross entropy" if impl == "F.cross_entropy" else "nce+rce"
            check.training_rows.append([impl, loss_name, f"{TRAIN_BATCH / seconds:.0f}", f"{seconds * 1e3:.1f}"])
        except Exception as err:  # noqa: BLE001
            check.training_rows.append([impl, "", short(err, 120), ""])
            if impl in check.fused:
                check.fail(f"training {impl}: {short(err)}", progress)
        progress.step(impl)
    progress.close()
