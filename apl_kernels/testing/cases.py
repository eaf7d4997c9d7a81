"""One source of test inputs and of the tolerance rule: the loss cases, random logits and targets,
the (device, backend) pairs every fused test runs on, and the parity check they all use."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

import apl_kernels as ak
from apl_kernels import reference
from apl_kernels.backends import contract
from apl_kernels.catalogue import FOCAL, available_losses, make_spec, members
from apl_kernels.options import CallOptions
from .formulas import coefficients, loss_and_grad

# Non-default parameters worth their own case (gamma > 1, gamma = 0, small q, weights, the later
# families' published settings).
PARAM_VARIANTS = [
    ("fl", {"gamma": 2.0}),
    ("nfl", {"gamma": 0.0}),
    ("nfl", {"gamma": 1.5, "official_grad": True}),
    ("gce", {"q": 0.3}),
    ("ngce", {"q": 0.1}),
    ("nce", {"scale": 3.0}),
    ("nrce", {"scale": 2.5}),
    ("sce", {"alpha": 0.5, "beta": 2.0}),
    ("nce+rce", {"alpha": 2.0, "beta": 0.5}),
    ("ngce+mae", {"q": 0.1, "alpha": 0.3}),
    ("nfl+rce", {"gamma": 0.2, "official_grad": True, "alpha": 0.7}),
    ("nnce", {"min_prob": 1e-4}),
    ("nnfl", {"gamma": 2.0, "min_prob": 1e-5}),
    ("nce+agce", {"alpha": 1.0, "beta": 4.0, "a": 6.0, "q": 1.5}),
    ("nce+aul", {"alpha": 1.0, "beta": 4.0, "a": 6.3, "q": 1.5}),
    ("nce+ael", {"alpha": 1.0, "beta": 4.0, "a": 5.0}),
    ("agce", {"a": 0.5, "q": 0.2}),
    ("nce+anorm", {"alpha": 1.0, "beta": 2.0, "a": 5.0, "p": 1.5}),
]


def loss_cases() -> list[tuple[str, dict]]:
    """Every catalogue loss with default parameters, both gradient modes where they apply."""
    cases = []
    for name in available_losses():
        cases.append((name, {}))
        if FOCAL & set(members(name)):
            cases.append((name, {"official_grad": True}))
    return cases + PARAM_VARIANTS


def case_id(case) -> str:
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())


LOSS_CASES = loss_cases()
LOSS_IDS = [case_id(c) for c in LOSS_CASES]

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Every fused backend on every device it runs on here: on a GPU machine the CUDA pairs, and on
# every machine the C++ CPU kernel and (under the interpreter, without a GPU) the Triton kernels.
FUSED = [("cpu", "cpp")] + ([("cuda", "triton"), ("cuda", "cuda")] if CUDA else []) + (
    [("cpu", "triton")] if INTERPRETED else [])
FUSED_IDS = [f"{backend}-{device}" for device, backend in FUSED]


def is_interpreted(device: str, backend: str) -> bool:
    """Whether ``backend`` runs its Triton kernels under the interpreter (CPU tensors)."""
    return backend == "triton" and device == "cpu"


def gradient_roundings(device: str, backend: str, dtype: torch.dtype, upstream) -> int:
    """How often a backend rounds its gradient to a half dtype: once as the kernel writes it, once
    more where the C++ kernel's saved gradient is scaled by an upstream gradient other than 1
    (GRAD_IN_FORWARD; the GPU kernels fold the upstream in, in float32), and twice where the Triton
    interpreter converts to bfloat16 by truncating (up to a whole unit; see
    tests/test_triton_kernel.py)."""
    roundings = 1 + (backend == "cpp" and not isinstance(upstream, str))
    return roundings + (is_interpreted(device, backend) and dtype == torch.bfloat16)


# The shapes timed on each device: bench/bench_losses.py and `python -m apl_kernels.check` (the CUDA
# ones are the README's bandwidth table's).
SPEED_SHAPES = {"cpu": [(128, 10), (4096, 10), (8192, 100), (4096, 1000), (1024, 32000)],
                "cuda": [(65536, 10), (65536, 100), (16384, 1000), (4096, 32000), (1024, 128000)]}


def random_logits(n: int, k: int, seed: int, dtype=torch.float64, spread: bool = True) -> torch.Tensor:
    """Logits with rows of every character: moderate, confident (p < 1e-7 somewhere), near-uniform."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    if spread and n >= 3:
        z[1::3] *= 8  # confident rows: some clamps are active
        z[2::3] *= 0.05  # near-uniform rows
    return z.to(dtype)


def random_target(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, k, (n,), generator=g)


def random_probabilities(n: int, k: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Soft targets of every character: rows near one-hot, spread out, and with exact zeros."""
    g = torch.Generator().manual_seed(seed + 2)
    t = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 3, dim=1)
    t[::4, : k // 2] = 0  # zero coefficients on some labels
    return t.to(dtype)


def random_weight(k: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 3)
    return (torch.rand(k, generator=g, dtype=torch.float64) * 2 + 0.1).to(dtype)


# Target modes: index labels, labels with smoothing and class weights, and probabilities.
TARGET_MODES = ("index", "smoothed", "weighted", "probabilities")


def make_target(mode: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, dict]:
    """A target of ``mode`` and the call options it goes with."""
    if mode == "probabilities":
        return random_probabilities(n, k, seed), {"weight": random_weight(k, seed), "label_smoothing": 0.05}
    target = random_target(n, k, seed)
    if mode == "smoothed":
        return target, {"label_smoothing": 0.1}
    if mode == "weighted":
        return target, {"weight": random_weight(k, seed), "label_smoothing": 0.0}
    return target, {}


def run(logits, target, name, params, backend, reduction="none", upstream="sum", **options):
    """Loss and d loss / d logits. ``upstream``: a tensor, or "sum" (backward of ``loss.sum()``: for
    ``reduction="none"`` an expanded, stride-0 gradient of ones)."""
    x = logits.detach().clone().requires_grad_()
    weight = options.pop("weight", None)
    if weight is not None:
        weight = weight.to(logits.device)
    loss = ak.functional.apl_loss(x, target, name, reduction=reduction, backend=backend, weight=weight, **params,
                                  **options)
    if isinstance(upstream, str):
        loss.sum().backward()
    else:
        loss.backward(upstream)
    return loss.detach(), x.grad


# Unit roundoff of each dtype: one rounding to it moves a value by at most u |value|.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Accuracy of the float32 (float64) arithmetic relative to the terms a result is computed from.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def assert_parity(got: torch.Tensor, truth: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype,
                  roundings: int = 1, where: str = "", floor: torch.Tensor | float | None = None) -> None:
    """The tolerance rule: a result is as exact as its arithmetic and its dtype allow.

    ``truth`` is the reference in float64 on the same (rounded) inputs; ``magnitude`` (per row, or
    per element) the size of the terms the result is computed from (see formulas.loss_and_grad):
    where the math cancels (confident rows, sums over many classes), rounding is relative to the
    terms, not to their small difference. Each element may be off by RTOL times its row's largest
    magnitude (the float32 or float64 arithmetic: ~100 ulps), plus ``roundings`` roundings of
    the value to ``dtype`` (the kernel's output, and one more where a gradient in a half type is
    scaled by an upstream gradient in that type), plus ``floor`` (default: the dtype's smallest
    normal number, below which a value has no relative precision at all).
    """
    rows = truth.shape[0] if truth.dim() else 1
    got, truth, magnitude = (torch.as_tensor(x).detach().cpu().double().reshape(rows, -1)
                             for x in (got, truth, magnitude))
    floor = torch.finfo(dtype).tiny if floor is None else torch.as_tensor(floor).double().reshape(rows, -1)
    allowed = (RTOL[dtype] * magnitude.amax(dim=1, keepdim=True) + roundings * UNIT_ROUNDOFF[dtype] * truth.abs()
               + floor)
    error = (got - truth).abs()
    bad = ~(error <= allowed) & ~(got.isnan() & truth.isnan())
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{where} row {row}: error {error[row, col].item():.3g} > allowed {allowed[row, col].item():.3g} at "
            f"element {col} (value {got[row, col].item():.6g}, truth {truth[row, col].item():.6g}, magnitude "
            f"{magnitude[row].max().item():.3g}); {int(bad.any(dim=1).sum())} of {rows} rows"
        )


def clamp_levels(params: dict) -> tuple[float, ...]:
    """The probabilities at which a loss's clamps switch (their gradient jumps there): the
    reference's clamps (its constants ``CLAMP_MIN``, ``<BASE>_CLAMP_MIN``, so that a new base's comes in by itself) and
    min_prob."""
    fixed = tuple(value for name, value in vars(reference).items()
                  if name.endswith("CLAMP_MIN") and not name.startswith("LOG"))
    return fixed + (params.get("min_prob", 1e-7),)


def off_kinks(z: torch.Tensor, levels=(1e-7,)) -> torch.Tensor:
    """``z`` with every logit whose probability lies within 0.1 % of a clamp level moved up a little.

    At a clamp the gradient jumps (the clamp passes the gradient on one side only), and which side
    an element lands on is decided by the rounding of p in the arithmetic at hand: float32 and the
    float64 truth may disagree there, by the whole jump. Such inputs test rounding, not the kernel.
    """
    logs = torch.tensor([math.log(level) for level in levels], dtype=torch.float64)
    for _ in range(10):
        z64 = z.double()
        lp = torch.log_softmax(z64, dim=1)
        near = ((lp[..., None] - logs).abs() < 1e-3).any(-1) & torch.isfinite(lp)
        if not near.any():
            return z
        # A step well above the dtype's spacing at that logit, so that the rounded logit moves.
        step = torch.maximum(torch.full_like(z64, 0.01), 8 * z64.abs() * torch.finfo(z.dtype).eps)
        z = (z64 + near * step).to(z.dtype)
    raise AssertionError("could not move the logits off the clamps' kinks")


def _nan_to_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.isnan(), 0.0, x)


def term_magnitudes(z, target, name, params, reduction="none", upstream="sum", **options):
    """The size of the terms each value (N,), or the reduced value (1,), and each gradient element
    (N, K) is computed from (the independent formulas' magnitudes): what rounding errors are
    relative to, where the result itself cancels to something small. NaN (undefined rows) is 0."""
    target_np = target.detach().cpu().double().numpy() if target.is_floating_point() else target.cpu().numpy()
    weight = options.get("weight")
    np_options = {"weight": None if weight is None else weight.detach().cpu().double().numpy(),
                  "label_smoothing": options.get("label_smoothing", 0.0),
                  "ignore_index": options.get("ignore_index", -100)}
    z = z.detach().cpu().double()
    with np.errstate(all="ignore"):
        _, _, grad_terms, sensitivity, value_terms = loss_and_grad(z.numpy(), target_np, name, **np_options, **params)
    # A value's error: its arithmetic on terms of size value_terms, and lp's rounding (eps (|z| + log K)
    # absolutely, as log_softmax's) times its sensitivity to lp.
    spread = 1 + 2 * z.abs().amax(dim=1) + math.log(z.shape[1])
    value_terms = _nan_to_zero(torch.from_numpy(value_terms) + torch.from_numpy(sensitivity) * spread)
    grad_terms = _nan_to_zero(torch.from_numpy(grad_terms))
    divisor = 1.0
    if reduction == "mean":
        divisor = coefficients(target_np, z.shape[1], **np_options)[1].sum() or 1.0
    upstream_scale = torch.ones(z.shape[0], dtype=torch.float64)
    if not isinstance(upstream, str):
        upstream_scale = upstream_scale * upstream.detach().cpu().double().abs().expand(upstream_scale.shape)
    grad_terms = grad_terms * (upstream_scale / divisor)[:, None]
    if reduction != "none":
        value_terms = value_terms.sum().reshape(1) / divisor
    return value_terms, grad_terms


def check_parity(z, target, name, params, backend, device="cpu", reduction="none", upstream="sum", roundings=1,
                 **options):
    """``backend`` on ``device`` in z's dtype against the float64 truth (the reference on the same
    rounded inputs), with magnitudes from the independent formulas; ``roundings``: how often the
    backend rounds its gradient to z's dtype."""
    where = f"{backend} {name} {params} {z.dtype} {tuple(z.shape)} {reduction} {sorted(options)}"
    z = off_kinks(z, clamp_levels(params))
    upstream_on = upstream if isinstance(upstream, str) else upstream.to(device)
    got = run(z.to(device), target.to(device), name, params, backend, reduction, upstream_on, **options)
    truth = run(z.double(), target.double() if target.is_floating_point() else target, name, params, "torch",
                reduction, upstream if isinstance(upstream, str) else upstream.double(), **options)
    assert_result(got, truth, z, target, name, params, reduction, upstream, roundings, where, **options)


def assert_result(got, truth, z, target, name, params, reduction="none", upstream="sum", roundings=1, where="",
                  grad_floor=0.0, **options):
    """``got`` = (value, gradient) of loss ``name`` at logits ``z`` (in z's dtype) within the tolerance
    rule of ``truth`` (in float64, on the same rounded inputs), with magnitudes from the independent
    formulas; ``grad_floor`` is added to the gradient's floor."""
    got_value, got_grad = got
    assert got_value.dtype == z.dtype and got_grad.dtype == z.dtype, where
    value_terms, grad_terms = term_magnitudes(z, target, name, params, reduction, upstream, **options)
    assert_parity(got_value, truth[0], torch.maximum(value_terms, truth[0].abs().reshape(value_terms.shape)),
                  z.dtype, 1, where + " value")
    # A kernel may flush a probability below float32's smallest normal to 0 (the C++ kernel's exp
    # does, as GPUs' fast exp does): its terms, |term| / p times that probability, vanish from its
    # own element and, through the row's sum H, from the others (times their p <= 1). Allow the
    # smallest normal times the largest such coefficient of the row (at least 1).
    tiny = torch.finfo(torch.float32).tiny
    p = torch.softmax(z.double(), dim=1)
    flushable = (p > 0) & (p < tiny)
    coefficient = torch.where(flushable, grad_terms / p.clamp_min(1e-300), 0).amax(dim=1, keepdim=True)
    floor = torch.finfo(z.dtype).tiny * coefficient.clamp_min(1).expand_as(grad_terms) + grad_floor
    assert_parity(got_grad, truth[1], grad_terms, z.dtype, roundings, where + " gradient", floor)


def sample_inputs(device: str, grad_mode: int, target_grad: bool = True):
    """Arguments for opcheck of a fused op on ``device`` (pytorch/extension-cpp's pattern): dtypes,
    reductions, strides, index and probability targets, weights, label smoothing, both gradient
    modes of the focal losses, ignore_index, with the gradient computed as the kernel does
    (``grad_mode``) or not at all; with ``target_grad``, a probability target's gradient too."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        spec = make_spec("nfl+rce", alpha=1.0, beta=0.5, official_grad=dtype == torch.float32)
        for reduction in ("none", "mean", "sum"):
            z = torch.randn(6, 11, generator=g).to(dtype)
            y = torch.randint(0, 11, (6,), generator=g)
            y[2] = -100
            yield (z.to(device).requires_grad_(), y.to(device), None,
                   *contract.op_arguments(spec, CallOptions(reduction), grad_mode))
    z = torch.randn(11, 12, generator=g).t()[:, :9]
    yield (z.to(device).requires_grad_(), torch.randint(0, 9, (12,), generator=g).to(device),
           torch.rand(9, generator=g).to(device),
           *contract.op_arguments(make_spec("ngce", scale=2.0, q=0.1), CallOptions("mean", label_smoothing=0.2), grad_mode))
    t = torch.softmax(torch.randn(5, 7, generator=g), 1)
    yield (torch.randn(5, 7, generator=g).to(device).requires_grad_(), t.to(device), None,
           *contract.op_arguments(make_spec("nce+nnce"), CallOptions("sum"), grad_mode))
    # Probability targets' gradients too (target_grad), strided, weighted, smoothed, float64 targets
    # of float32 logits (the pair is float64).
    t = torch.rand(9, 6, generator=g, dtype=torch.float64).t()
    if target_grad:
        yield (torch.randn(6, 9, generator=g).to(device).requires_grad_(), t.to(device).requires_grad_(),
               torch.rand(9, generator=g).to(device),
               *contract.op_arguments(make_spec("ngce+rce"), CallOptions("none", label_smoothing=0.1), grad_mode,
                                      grad_mode != contract.NO_GRAD))
    yield (torch.randn(5, 4, generator=g).to(device), torch.randint(0, 4, (5,), generator=g).to(device), None,
           *contract.op_arguments(make_spec("nce+mae"), CallOptions("mean"), contract.NO_GRAD))

