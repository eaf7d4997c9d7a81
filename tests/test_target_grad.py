"""Gradients of probability targets on every fused backend (issue #27, section 1).

Every catalogue loss is linear in the target row c, so dL/dt[k] = (1 - eps) w[k] L(z, k) (the loss
of the one-hot label k; apl_rowmath.h, "Targets' gradient"), times the upstream gradient over a
mean's divisor. The fused kernels write it in the pass that writes the logits' gradient, when the
target requires grad. Checked here: gradcheck in float64 in both inputs, parity with the reference
for every catalogue loss (magnitudes from the independent formulas, label by label), and
PyTorch's own OpInfo samples of ``nn.functional.cross_entropy`` against ``F.cross_entropy``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch.func import grad, vjp, vmap

import apl_kernels as ak
from apl_kernels.backends import contract
from apl_kernels.catalogue import make_spec
from apl_kernels.options import CallOptions
from apl_kernels.testing.formulas import loss_and_grad
from cases import (
    FUSED, FUSED_IDS, LOSS_CASES, LOSS_IDS, UNIT_ROUNDOFF, assert_parity, assert_result, clamp_levels,
    gradient_roundings, is_interpreted, off_kinks, random_logits, random_probabilities, random_weight,
)

F = ak.functional
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def upstream_of(mode: str, shape: tuple, dtype: torch.dtype, seed: int):
    """(reduction, upstream): a stride-0 gradient of ones (backward of loss.sum()), a random one
    per row, a mean's 1 and a scaled sum."""
    if mode == "random-upstream":
        g = torch.Generator().manual_seed(seed)
        return "none", torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if mode == "stride-0":
        return "none", torch.ones(()).to(dtype).expand(shape)
    if mode == "sum":
        return "sum", torch.tensor(2.5, dtype=dtype)
    return "mean", torch.tensor(1.0, dtype=dtype)


def run(z, t, name, params, backend, reduction, upstream, layout, **options):
    """Value and the gradients of logits (R, K) and probability targets (R, K), computed with the
    inputs in ``layout``: "rows" (as given), "transposed" (both read through transposed storage) or
    "spatial" ((N, K, d) views of the rows, class dimension 1, as a segmentation model gives)."""
    x, target = z.detach().clone(), t.detach().clone()
    if layout == "transposed":
        x, target = x.t().contiguous().t(), target.t().contiguous().t()
    elif layout == "spatial":
        x, target = (a.view(-1, 3, a.shape[1]).movedim(-1, 1) for a in (x, target))
    x.requires_grad_()
    target.requires_grad_()
    loss = F.apl_loss(x, target, name, reduction=reduction, backend=backend, **params, **options)
    upstream = upstream.to(loss.device)
    upstream = upstream.reshape(loss.shape) if upstream.dim() else upstream.expand(loss.shape)  # views: strides kept
    gz, gt = torch.autograd.grad(loss, (x, target), upstream)
    if layout == "spatial":
        gz, gt = (g.movedim(1, -1).reshape(z.shape) for g in (gz, gt))
    return loss.detach().reshape(-1) if reduction == "none" else loss.detach(), gz, gt


def target_magnitudes(z, name, params, weight, label_smoothing, reduction, upstream):
    """The size of the terms each element of the targets' gradient is computed from: dL/dc[k] is the
    one-label loss L(z, k) (the independent formulas' value for label k, with their value's terms
    and sensitivity to lp's rounding, as cases.term_magnitudes), times (1 - eps) |w[k]| |upstream|
    over the mean's divisor (the rows)."""
    z64 = z.detach().cpu().double()
    rows, classes = z64.shape
    spread = 1 + 2 * z64.abs().amax(dim=1) + math.log(classes)
    columns = []
    with np.errstate(all="ignore"):
        for label in range(classes):
            _, _, _, sensitivity, terms = loss_and_grad(z64.numpy(), np.full(rows, label), name, **params)
            columns.append(torch.from_numpy(terms) + torch.from_numpy(sensitivity) * spread)
    magnitude = torch.stack(columns, 1) * (1 - label_smoothing)
    if weight is not None:
        magnitude = magnitude * weight.double().abs()
    scale = upstream.detach().double().abs().reshape(-1) if reduction == "none" else upstream.double().abs()
    magnitude = magnitude * (scale[:, None] if reduction == "none" else scale)
    return torch.where(magnitude.isnan(), 0, magnitude) / (rows if reduction == "mean" else 1)


def check_target_parity(z, t, name, params, backend, device, reduction, upstream, layout, weight, label_smoothing):
    where = f"{backend} {name} {params} {z.dtype} {tuple(z.shape)} {reduction} {layout} eps={label_smoothing}"
    z = off_kinks(z, clamp_levels(params))
    options = dict(weight=weight, label_smoothing=label_smoothing)
    got = run(z.to(device), t.to(device), name, params, backend, reduction, upstream, layout,
              **{**options, "weight": None if weight is None else weight.to(device)})
    truth = run(z.double(), t.double(), name, params, "torch", reduction, upstream.double(), "rows",
                **{**options, "weight": None if weight is None else weight.double()})
    assert got[2].dtype == t.dtype, where
    roundings = gradient_roundings(device, backend, z.dtype, upstream)
    # The value and the logits' gradient, by the suite's rule (the rows' upstream as a tensor).
    flat = upstream.double().reshape(-1) if upstream.dim() else upstream.double()
    assert_result(got[:2], truth[:2], z, t, name, params, reduction, flat, roundings, where, **options)
    magnitude = target_magnitudes(z, name, params, weight, label_smoothing, reduction, upstream)
    assert_parity(got[2], truth[2], magnitude, z.dtype, roundings, where + " target gradient")


def combos(index: int, device: str, backend: str, seed: int):
    """(dtype, rows, classes, upstream mode, layout, weighted, smoothing) of a loss case: every dtype,
    the upstream modes, layouts and options rotating with the case; fewer under the interpreter."""
    modes = ("random-upstream", "stride-0", "mean", "sum")
    layouts = ("rows", "transposed", "spatial")
    shapes = ((6, 3), (9, 10), (12, 37)) if not is_interpreted(device, backend) else ((6, 5),)
    out = []
    for j, dtype in enumerate(DTYPES):
        for i, (rows, classes) in enumerate(shapes):
            r = index + j + i + seed
            out.append((dtype, rows, classes, modes[r % 4], layouts[(r // 4) % 3], r % 2 == 0,
                        (0.0, 0.1)[(r // 2) % 2]))
    return out


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_target_gradient_parity_with_reference(case, device, backend, seed):
    """Every catalogue loss (and its parameter variants): the targets' gradient, with the value and
    the logits' gradient of the same call, against the reference, in every dtype, layout, upstream
    gradient and reduction, with and without class weights and label smoothing."""
    name, params = case
    for j, (dtype, rows, classes, mode, layout, weighted, eps) in enumerate(
            combos(LOSS_CASES.index(case), device, backend, seed)):
        s = seed + 7 * j
        z = random_logits(rows, classes, s, dtype=dtype)
        t = random_probabilities(rows, classes, s, dtype=dtype)
        weight = random_weight(classes, s, dtype=dtype) if weighted else None
        reduction, upstream = upstream_of(mode, (rows // 3, 3) if layout == "spatial" else (rows,), dtype, s)
        check_target_parity(z, t, name, params, backend, device, reduction, upstream, layout, weight, eps)


@pytest.mark.parametrize("device,backend", [p for p in FUSED if p[1] == "triton"],
                         ids=[i for p, i in zip(FUSED, FUSED_IDS) if p[1] == "triton"])
@pytest.mark.parametrize("chunked", [False, True], ids=["on-chip", "chunked"])
def test_triton_targets_gradient_in_both_modes_and_chunks(chunked, device, backend, monkeypatch, seed):
    """Triton's rows streamed through chunks (small tiles under the interpreter) against the
    reference, and the pair that GRAD_IN_FORWARD saves (times 1, over the divisor) equal to the one
    that backward writes, for every family (the split family's S = sum W summed over the chunks)."""
    from test_triton_kernel import gradient_in_forward_and_backward, triton_backend as triton_ops, use_small_tiles
    if chunked:
        if not is_interpreted(device, backend):
            pytest.skip("small tiles are for the interpreter")
        use_small_tiles(monkeypatch)
    k = 50 if chunked else 20
    for j, (name, reduction, dtype) in enumerate([("nce+rce", "mean", torch.float64), ("nfl+nnfl", "none", torch.float32),
                                                  ("ngce+mae", "sum", torch.float64),
                                                  ("nce+anorm", "mean", torch.float32)]):
        z = random_logits(4, k, seed + j, dtype=dtype)
        t = random_probabilities(4, k, seed + j, dtype=dtype)
        weight = random_weight(k, seed + j, dtype=dtype)
        assert triton_ops.launch_config(k, dtype, True).chunked == chunked
        upstream = torch.tensor(1.0, dtype=dtype) if reduction != "none" else torch.ones(4, dtype=dtype)
        check_target_parity(z, t, name, {}, backend, device, reduction, upstream, "rows", weight, 0.1)
        args = contract.op_arguments(make_spec(name), CallOptions(reduction, label_smoothing=0.1),
                                     contract.GRAD_IN_BACKWARD, target_grad=True)
        (_, saved), (_, pair) = gradient_in_forward_and_backward(z.to(device), t.to(device), weight.to(device), args)
        assert saved.shape == pair.shape == (2, 4, k)
        torch.testing.assert_close(saved, pair, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-12)


# Every family and pairs; no official_grad (by design not the exact derivative).
GRADCHECK = [("nce+rce", {}), ("nfl+mae", {"gamma": 1.5}), ("ngce+nrce", {"q": 0.3}), ("sce", {}), ("nce+nnce", {}),
             ("nnfl", {"gamma": 2.0}), ("agce", {"a": 0.5, "q": 0.2}), ("anorm", {}),
             ("nce+anorm", {"alpha": 1.0, "beta": 2.0, "a": 5.0, "p": 1.5})]


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("name,params", GRADCHECK, ids=[n for n, _ in GRADCHECK])
def test_gradcheck_logits_and_targets(name, params, device, backend, seed):
    """torch.autograd.gradcheck in float64 with respect to the logits and the probability targets,
    for every reduction, with class weights and label smoothing, on 2-D and (N, K, d) inputs."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.rand(4, generator=g, dtype=torch.float64) + 0.2).to(device)
    for j, reduction in enumerate(("none", "mean", "sum")):
        shape = (3, 4) if j != 2 else (2, 4, 2)
        z = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(device).requires_grad_()
        t = torch.rand(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
        options = dict(weight=weight if j != 1 else None, label_smoothing=0.1 * j, reduction=reduction)

        def loss(z, t):
            return F.apl_loss(z, t, name, backend=backend, **params, **options)

        assert torch.autograd.gradcheck(loss, (z, t), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
def test_targets_gradient_only_when_asked(device, backend, seed):
    """A target that requires grad gets its gradient (and the logits theirs) also where the logits do
    not require grad; class weights that require grad are still refused, not given None."""
    z = random_logits(4, 5, seed).to(device)
    t = random_probabilities(4, 5, seed).to(device).requires_grad_()
    F.nce_rce(z, t, backend=backend).backward()
    reference = t.grad.clone()
    t.grad = None
    F.nce_rce(z, t, backend="torch").backward()
    torch.testing.assert_close(reference, t.grad, rtol=1e-12, atol=1e-15)
    weight = (torch.rand(5, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    with pytest.raises(ValueError, match="no gradient of the class weights"):
        F.nce_rce(z, t, weight=weight, backend=backend)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_func_gradients_of_targets(reduction, device, backend, seed):
    """torch.func as for the logits' gradient: per-sample gradients of both inputs (vmap of grad over
    samples of several rows, the ops' vmap rules with the pair) and vjp, equal to the reference's."""
    z = random_logits(12, 5, seed).view(3, 4, 5).to(device)
    t = random_probabilities(12, 5, seed).view(3, 4, 5).to(device)
    weight = random_weight(5, seed).to(device)

    def loss(backend):
        def f(zi, ti):
            out = F.nce_rce(zi, ti, weight=weight, label_smoothing=0.1, reduction=reduction, backend=backend)
            return out.sum() if reduction == "none" else out
        return f

    got = vmap(grad(loss(backend), argnums=(0, 1)))(z, t)
    want = vmap(grad(loss("torch"), argnums=(0, 1)))(z, t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    cotangent = torch.randn((4,) if reduction == "none" else (), dtype=torch.float64).to(device)
    results = []
    for b in (backend, "torch"):
        _, pullback = vjp(lambda zi, ti: F.nce_rce(zi, ti, weight=weight, reduction=reduction, backend=b), z[0], t[0])
        results.append(pullback(cotangent))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device,backend", [p for p in FUSED if not is_interpreted(*p)],
                         ids=[i for p, i in zip(FUSED, FUSED_IDS) if not is_interpreted(*p)])
def test_torch_compile_gradients_of_targets(device, backend, seed):
    """A compiled step (fullgraph) whose soft targets come from a trainable teacher: both models'
    gradients equal eager's."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(seed)
    student, teacher = (torch.nn.Linear(6, 5).to(device) for _ in range(2))
    x = torch.randn(16, 6, generator=g).to(device)

    def step(inputs):
        soft = torch.softmax(teacher(inputs), 1)
        return F.nce_rce(student(inputs), soft, label_smoothing=0.1, backend=backend)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        student.zero_grad()
        teacher.zero_grad()
        loss = fn(x)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in (*student.parameters(), *teacher.parameters())])
    for compiled, eager in zip(*reversed(results)):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def check_masked_class(name, params, backend, device, seed):
    """-inf logits at a class whose probability (so whose coefficient) is 0, and at one whose class
    weight is 0: the targets' gradient there is the reference's, finite (a coefficient of 0 adds
    0 * V = 0 to the loss even where V is infinite), never the NaN of 0 * inf."""
    for dtype in (torch.float64, torch.float32):
        z = random_logits(5, 7, seed, dtype=dtype)
        z[:, 3] = float("-inf")
        z[2, 5] = float("-inf")
        t = random_probabilities(5, 7, seed, dtype=dtype)
        t[:, 3] = 0
        t = t / t.sum(1, keepdim=True)
        weight = random_weight(7, seed, dtype=dtype)
        weight[5] = 0
        where = f"{backend} {name} {params} {dtype}"
        for reduction, upstream in (("mean", torch.tensor(1.0, dtype=dtype)),
                                    ("none", torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=dtype))):
            got = run(z.to(device), t.to(device), name, params, backend, reduction, upstream, "rows",
                      weight=weight.to(device))
            want = run(z.double(), t.double(), name, params, "torch", reduction, upstream.double(), "rows",
                       weight=weight.double())
            for g, w in zip(got, want):
                assert torch.isfinite(w).all() and torch.isfinite(g.cpu()).all(), where
                scale = max(w.abs().max().item(), 1.0)
                tolerance = 1e-9 if dtype == torch.float64 else 1e-4
                torch.testing.assert_close(g.cpu().double(), w, rtol=tolerance, atol=tolerance * scale, msg=where)


@pytest.mark.parametrize("device,backend", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_masked_class_targets_gradient(case, device, backend, seed):
    check_masked_class(*case, backend, device, seed)


def test_one_hot_rows_and_zero_coefficients():
    """Where a target row puts 0 on a class, the gradient there is still L(z, k) (F.cross_entropy's
    -log_softmax for ce), not 0: checked on the reference and the C++ kernel."""
    z = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.3, 0.7]], dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(TF.cross_entropy(z, t, reduction="sum"), t)
    for backend in ("torch", "cpp"):
        (got,) = torch.autograd.grad(F.ce(z, t, reduction="sum", backend=backend), t)
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------- PyTorch's OpInfo samples

def cross_entropy_samples(dtype: torch.dtype):
    """The sample inputs of the ``nn.functional.cross_entropy`` OpInfo of PyTorch's op_db."""
    pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (pip install expecttest)")
    from torch.testing._internal.common_methods_invocations import op_db
    (opinfo,) = [op for op in op_db if op.name == "nn.functional.cross_entropy"]
    return list(opinfo.sample_inputs("cpu", dtype, requires_grad=True)), opinfo.supported_dtypes("cpu")


OPINFO_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def tolerances(dtype: torch.dtype) -> dict:
    """torch.testing.assert_close's default rtol and atol for ``dtype``."""
    from torch.testing._comparison import default_tolerances
    rtol, atol = default_tolerances(dtype)
    return dict(rtol=rtol, atol=atol)


@pytest.mark.parametrize("device,backend", [p for p in FUSED if p[0] == "cpu"],
                         ids=[i for p, i in zip(FUSED, FUSED_IDS) if p[0] == "cpu"])
def test_pytorch_opinfo_cross_entropy_samples(device, backend, seed):
    """Every OpInfo sample of ``nn.functional.cross_entropy`` (84: 21 per dtype; 40 with probability
    targets that require grad) through ``apl_kernels.functional.ce``: the value and the gradients of
    the input and of a probability target match ``F.cross_entropy`` (in float64 on the same
    inputs; the dtype's default tolerances of torch.testing), for a random upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    count = with_target_grad = 0
    for dtype in OPINFO_DTYPES:
        samples, supported = cross_entropy_samples(dtype)
        assert dtype in supported
        for sample in samples:
            target, kwargs = sample.args[0], dict(sample.kwargs)
            inputs = [sample.input] + ([target] if target.requires_grad else [])
            mine = ak.functional.ce(sample.input, target, backend=backend, **kwargs)
            wide = [x.detach().double().requires_grad_() for x in inputs]
            weight = kwargs.pop("weight", None)
            truth = TF.cross_entropy(wide[0], wide[1] if len(wide) == 2 else target,
                                     weight=None if weight is None else weight.double(), **kwargs)
            assert mine.shape == truth.shape and mine.dtype == dtype, (sample, mine.shape, truth.shape)
            # Against the float64 truth itself (rounding it to the dtype first would add a rounding),
            # with the dtype's default tolerances, for the same (rounded) upstream gradient.
            close = dict(check_dtype=False, **tolerances(dtype))
            torch.testing.assert_close(mine.double(), truth, msg=lambda m: f"value of {sample}: {m}", **close)
            upstream = torch.randn(truth.shape, generator=g, dtype=torch.float64).to(dtype)
            got = torch.autograd.grad(mine, inputs, upstream)
            want = torch.autograd.grad(truth, wide, upstream.double())
            for a, b, what in zip(got, want, ("input", "target")):
                assert a.dtype == dtype
                torch.testing.assert_close(a.double(), b, msg=lambda m: f"{what} gradient of {sample}: {m}", **close)
            count += 1
            with_target_grad += target.requires_grad
    assert (count, with_target_grad) == (84, 40)
