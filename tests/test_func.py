"""torch.func transforms on every public loss form and every backend of the tensor's device:
grad, per-sample gradients (vmap(grad(...)) over samples), vjp, jacrev, functional_call.

Under vmap the fused ops run batched (the samples' rows are rows of one call: the ops' vmap rules
in apl_kernels/backends/fused.py). Forward-mode transforms (jvp, jacfwd, hessian) need a jvp rule
that the fused backends do not have: they raise, and backend="torch" supports them.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vjp, vmap

import apl_kernels as ak
from cases import FUSED, LOSS_CASES, LOSS_IDS, random_logits, random_target

F = ak.functional
BACKENDS = [("cpu", "torch")] + FUSED
BACKEND_IDS = [f"{b}-{d}" for d, b in BACKENDS]
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6)}


def small_model(dtype, device, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)).to(dtype).to(device)


def per_sample_by_loop(model, criterion, x, y):
    grads = []
    for i in range(x.shape[0]):
        model.zero_grad()
        criterion(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})
    return {k: torch.stack([g[k] for g in grads]) for k in grads[0]}


def per_sample_by_vmap(model, criterion, x, y):
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(p, xi, yi):
        return criterion(functional_call(model, p, (xi[None],)), yi[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", LOSS_CASES[::3], ids=LOSS_IDS[::3])
def test_per_sample_gradients_equal_a_loop_of_autograd(case, dtype, device, backend, seed):
    name, params = case
    model = small_model(dtype, device, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 6, generator=g).to(dtype).to(device)
    y = torch.randint(0, 5, (5,), generator=g).to(device)
    for options in ({}, {"label_smoothing": 0.1, "weight": torch.rand(5, generator=g).to(dtype).to(device) + 0.5}):
        criterion = ak.get_loss(name, backend=backend, **params, **options)
        want = per_sample_by_loop(model, criterion, x, y)
        got = per_sample_by_vmap(model, criterion, x, y)
        for key in want:
            torch.testing.assert_close(got[key], want[key], **TOLERANCE[dtype], msg=f"{key} {options}")


@pytest.mark.parametrize("device,backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_per_sample_gradients_of_several_rows_and_probability_targets(reduction, device, backend, seed):
    """Each sample may have several rows (a sequence, an image's pixels): its own reduction and a
    mean's divisor apply to its rows only; probability targets batch the same way."""
    g = torch.Generator().manual_seed(seed)
    z = random_logits(4 * 3, 7, seed).reshape(4, 3, 7).to(device)
    labels = random_target(12, 7, seed).reshape(4, 3).to(device)
    labels[1, 2] = -100  # sample 1 has two counted rows: its mean divides by 2
    soft = torch.softmax(torch.randn(4, 3, 7, generator=g, dtype=torch.float64), -1).to(device)
    for target in (labels, soft):
        def loss(zi, ti):
            value = F.nce_rce(zi, ti, reduction=reduction, backend=backend)
            return value.sum()

        got = vmap(grad(loss))(z, target)
        want = torch.stack([_grad_of(loss, z[i], target[i]) for i in range(4)])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _grad_of(loss, zi, ti):
    zi = zi.clone().requires_grad_()
    return torch.autograd.grad(loss(zi, ti), zi)[0]


@pytest.mark.parametrize("device,backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("name", ["nce+rce", "nfl+nnfl", "nce+agce"])
def test_jacrev_of_row_losses_is_the_autograd_jacobian(name, device, backend, seed):
    z = random_logits(6, 9, seed).to(device)
    y = random_target(6, 9, seed).to(device)
    jacobian = jacrev(lambda x: F.apl_loss(x, y, name, reduction="none", backend=backend))(z)
    want = torch.autograd.functional.jacobian(lambda x: F.apl_loss(x, y, name, reduction="none", backend="torch"),
                                              z.cpu())
    torch.testing.assert_close(jacobian.cpu(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", ["nce+rce", "nfl+nnfl"])
def test_vjp_equals_autograd(name, reduction, device, backend, seed):
    """vjp's pullback runs backward with create_graph=True outside any transform."""
    z = random_logits(6, 9, seed).to(device)
    y = random_target(6, 9, seed).to(device)
    value, pullback = vjp(lambda x: F.apl_loss(x, y, name, reduction=reduction, backend=backend), z)
    cotangent = torch.randn(value.shape, generator=torch.Generator().manual_seed(seed), dtype=value.dtype)
    x = z.cpu().requires_grad_()
    want = torch.autograd.grad(F.apl_loss(x, y.cpu(), name, reduction=reduction, backend="torch"), x, cotangent)[0]
    torch.testing.assert_close(pullback(cotangent.to(device))[0].cpu(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=BACKEND_IDS)
def test_grad_of_a_model_equals_autograd(device, backend, seed):
    model = small_model(torch.float64, device, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 5, (8,), generator=g).to(device)
    criterion = ak.ANLCE(5.0, 5.0, backend=backend)
    params = {k: p.detach() for k, p in model.named_parameters()}
    got = grad(lambda p: criterion(functional_call(model, p, (x,)), y))(params)
    criterion(model(x), y).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-10, atol=1e-12)


def test_a_bad_label_under_vmap_still_raises_on_cpu():
    z = torch.randn(4, 1, 5)
    y = torch.tensor([[0], [1], [9], [2]])
    for backend in ("torch", "cpp"):
        with pytest.raises(ValueError, match="target 9 at flat position 2 is outside"):
            vmap(grad(lambda zi, yi: F.nce_rce(zi, yi, backend=backend)))(z, y)


def test_forward_mode_transforms_are_refused_by_fused_backends_not_wrong():
    z = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    with pytest.raises((NotImplementedError, RuntimeError), match="jvp|forward"):
        torch.func.hessian(lambda x: F.nce_rce(x, y, backend="cpp"))(z)
    reference = torch.func.hessian(lambda x: F.nce_rce(x, y, backend="torch"))(z)
    assert reference.shape == (3, 4, 3, 4)


@pytest.mark.parametrize("device,backend", FUSED, ids=[f"{b}-{d}" for d, b in FUSED])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_derivatives_are_refused_by_fused_backends_not_zero(reduction, device, backend, seed):
    """Reverse over reverse (jacrev of grad) differentiates the first derivative: a fused backend
    must raise, never report the saved gradient as a constant (a Hessian of zeros)."""
    z = random_logits(3, 4, seed, dtype=torch.float64).to(device)
    y = torch.tensor([0, 1, 2], device=device)

    def second(backend):
        return jacrev(grad(lambda x: F.nce_rce(x, y, backend=backend, reduction=reduction).sum()))(z)

    with pytest.raises(NotImplementedError, match="first derivatives only"):
        second(backend)
    assert second("torch").abs().sum() > 0
