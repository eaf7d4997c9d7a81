"""Phase 3: opcheck of the fused ops, torch.compile of a small model, CUDA-graph capture."""

from __future__ import annotations

import time

import torch
from torch import nn

import apl_kernels as ak
from apl_kernels import backends
from apl_kernels.backends import contract
from apl_kernels.testing.cases import sample_inputs
from .common import Check, Progress, short


# ---------------------------------------------------------------- 3. integration


def small_problem(check: Check, backend: str):
    """A small model, a fused criterion and a batch, on the device."""
    g = torch.Generator().manual_seed(check.seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10)).to(check.device)
    weight = (torch.rand(10, generator=g) + 0.5).to(check.device)
    criterion = ak.NFLRCE(1.0, 0.5, official_grad=True, weight=weight, label_smoothing=0.1, backend=backend)
    batches = [(torch.randn(64, 16, generator=g).to(check.device), torch.randint(0, 10, (64,), generator=g).to(
        check.device)) for _ in range(3)]
    return model, criterion, batches


def loss_and_grads(model, fn, x, y) -> list[torch.Tensor]:
    """The loss of ``fn(x, y)`` and the model's gradients, computed without touching ``.grad``."""
    loss = fn(x, y)
    return [loss.detach()] + list(torch.autograd.grad(loss, list(model.parameters())))


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def opcheck(check: Check, backend: str) -> str:
    op = backends.resolve(backend, check.device.type).load().op
    mode = contract.GRAD_IN_FORWARD if backend == "cpp" else contract.GRAD_IN_BACKWARD
    samples = list(sample_inputs(str(check.device), mode))
    for index, args in enumerate(samples):
        try:
            torch.library.opcheck(op, args)
        except Exception as err:
            raise AssertionError(f"sample {index} of sample_inputs: {short(err)}") from None
    return f"{op}, {len(samples)} samples"


def compiled_matches_eager(check: Check, backend: str) -> str:
    """The first call is the compiled one, as in a user's compiled training step."""
    model, criterion, batches = small_problem(check, backend)
    torch._dynamo.reset()

    def forward(x, y):
        return criterion(model(x), y)

    compiled = torch.compile(forward, fullgraph=True)
    for x, y in batches[:2]:
        try:
            got = loss_and_grads(model, compiled, x, y)
        except Exception as err:
            loss_and_grads(model, forward, x, y)  # raises here if the eager call fails too
            torch._dynamo.reset()
            try:
                loss_and_grads(model, torch.compile(forward, fullgraph=True), x, y)
                after = "compiles after one eager call"
            except Exception:  # noqa: BLE001
                after = "fails after an eager call too"
            raise AssertionError(f"fails when compiled before any eager call ({after}): {short(err)}") from None
        assert_close(got, loss_and_grads(model, forward, x, y))
    return "loss and gradients of a compiled Linear-ReLU-Linear + NFL+RCE match eager on 2 batches"


def graph_matches_eager(check: Check, backend: str) -> str:
    """Capture forward plus backward in a CUDA graph (warmed up on a side stream, as
    torch.cuda.graph's documentation does), replay it on new data, compare with eager."""
    model, criterion, batches = small_problem(check, backend)
    static_x, static_y = (t.clone() for t in batches[0])
    side = torch.cuda.Stream(check.device)
    side.wait_stream(torch.cuda.current_stream(check.device))
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            criterion(model(static_x), static_y).backward()
    torch.cuda.current_stream(check.device).wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = criterion(model(static_x), static_y)
        static_loss.backward()
    for x, y in batches[1:]:  # two replays: the second finds what the first left (counters, buffers)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        torch.cuda.synchronize(check.device)
        got = [static_loss.detach().clone()] + [p.grad.clone() for p in model.parameters()]
        assert_close(got, loss_and_grads(model, lambda a, b: criterion(model(a), b), x, y))
    return "forward plus backward captured once, replayed on 2 new batches, match eager"


def integration(check: Check) -> None:
    checks = [("opcheck", b, opcheck) for b in check.fused]
    checks += [("torch.compile(fullgraph=True)", b, compiled_matches_eager) for b in check.fused]
    if check.cuda:
        checks += [("CUDA graph", b, graph_matches_eager) for b in check.fused]
    progress = Progress("integration", len(checks))
    for what, backend, fn in checks:
        started = time.monotonic()
        if check.lost_device:
            check.integration.append([what, backend, "not run", check.lost_device])
        elif what.startswith("torch.compile") and check.interpreted(backend):
            # Under the interpreter the op is opaque to torch.compile (it cannot trace interpreted
            # kernels): the GPU run covers it.
            check.integration.append([what, backend, "not run", "the interpreter's kernels cannot be traced"])
        else:
            try:
                detail = fn(check, backend)
                check.integration.append([what, backend, "ok", f"{detail} ({time.monotonic() - started:.0f} s)"])
            except Exception as err:  # noqa: BLE001
                check.integration.append([what, backend, "FAIL", short(err)])
                check.fail(f"{what} {backend}: {short(err)}", progress)
        progress.step(f"{what} {backend}")
    progress.close()
