"""The Triton backend against the reference and the spec's formulas.

Without CUDA the kernels run under the Triton interpreter on CPU tensors: tests/conftest.py
sets TRITON_INTERPRET=1 before anything imports triton's kernels (``@triton.jit`` decides at
import whether a kernel is interpreted). Only the torch.compile test needs a GPU.

Tolerances. The float64 truth is the spec's formulas (tests/formulas.py) evaluated on the
very logits the kernel sees (already rounded to the input dtype), so input rounding is not
an error. Gradients are compared relative to the largest term their row sums ("magnitude":
dL/dz = h - p sum(h) cancels in confident rows, and rounding errors are relative to the
terms, not to their small difference); values relative to themselves plus their
sensitivity to the rounding of lp (~eps (|z| + log K) absolutely, as in log_softmax).

* float32: 1e-5 of that scale (~170 ulps: sums over 5000 classes in chunks, the
  exp/log/pow of the kernel, lp's own rounding).
* float64: 1e-13 of that scale (~900 units of float64 roundoff; the reference itself is
  within ~3e-14 of the formulas, the kernel within ~1e-15).
* float16/bfloat16: the math is float32, then the result is rounded to the half type: by
  at most u |x| + (half the smallest subnormal), u its unit roundoff. The kernel rounds the
  gradient once, and fused backends round it again when they scale it by a non-unit
  upstream gradient in the half type (apl_kernels.fused); the reference rounds once. So
  the float32 tolerance plus one rounding per conversion: no worse than twice the
  reference's rounding. (The interpreter converts float32 to bfloat16 by truncation,
  which can be off by a whole unit: see test_interpreter_truncates_float32_to_bfloat16.)
* Gradients below the float32 range (a row whose every p underflows) are 0 in float32:
  an absolute floor of float32's smallest normal.

Inputs are kept off the two places where float32 rounding, not the kernel, decides the
result (see conditioned_logits).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import apl_kernels as ak
from apl_kernels import backends
from apl_kernels.backends import fused, triton as triton_backend
from apl_kernels.catalogue import FOCAL, make_spec
from cases import LOSS_CASES, LOSS_IDS, random_logits, random_target
from formulas import loss_and_grad

F = ak.functional
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# tests/conftest.py sets TRITON_INTERPRET=1 without a GPU, before triton is imported.
assert CUDA or triton_backend.INTERPRETED, "TRITON_INTERPRET=1 must be set before triton is imported"

# The interpreter evaluates both sides of every tl.where with NumPy (0 * inf in the unused
# side at masked classes): its warnings are not results.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

KS = (2, 10, 100, 1000, 5000)
# Rounding to a half type: unit roundoff, and half its smallest subnormal.
HALF_ROUNDING = {torch.float16: (2.0**-11, 2.0**-25), torch.bfloat16: (2.0**-8, 2.0**-134)}
# How often the kernel rounds its gradient to the type (truncation is two units).
KERNEL_ROUNDINGS = {torch.bfloat16: 2 if triton_backend.INTERPRETED else 1}
EPS = {torch.float64: 2.0**-53}  # float32 for every other dtype: the kernels compute in it
LOG_CLAMP = math.log(1e-7)


def acc_eps(dtype):
    return EPS.get(dtype, 2.0**-24)


def half_rounding(x, dtype, times, scale=1.0):
    """The most ``times`` roundings to ``dtype`` of ``x / scale``, times ``scale``, can move
    ``x`` (0 for float32/64): the kernel rounds its gradient before the upstream scales it."""
    unit, underflow = HALF_ROUNDING.get(dtype, (0.0, 0.0))
    return times * (unit * x.abs() + underflow * abs(scale))


def inner_tolerance(dtype):
    return 1e-13 if dtype == torch.float64 else 1e-5


def is_focal(name):
    return any(member in FOCAL for member in name.split("+"))


def conditioned_logits(n, k, seed, dtype, focal=False):
    """random_logits in ``dtype`` (rows moderate, confident, near-uniform), moved off two kinks.

    * p within 0.1 % of the clamp 1e-7: the clamp's derivative jumps there, and float32
      rounding of p decides the side. Such a logit is raised by 1.
    * For focal losses, max p > 0.95: u = 1 - p comes from lp, whose float32 rounding
      (~eps absolutely) is a relative error eps/u in u, and d/du u^gamma is unbounded
      at 0. The top logit is lowered to 2.5 above the second. (Rows where p == 1
      exactly are tested in test_masked_classes_and_extreme_logits.)
    """
    z = random_logits(n, k, seed).to(dtype)
    for _ in range(10):
        z64 = z.double()
        lp = torch.log_softmax(z64, dim=1)
        near_clamp = (lp - LOG_CLAMP).abs() < 1e-3
        too_sure = lp.max(dim=1).values > math.log(0.95) if focal else torch.zeros(n, dtype=torch.bool)
        if not near_clamp.any() and not too_sure.any():
            return z
        z64 = z64 + near_clamp.double()
        top2 = z64.topk(2, dim=1)
        rows = too_sure.nonzero()[:, 0]
        z64[rows, top2.indices[rows, 0]] = top2.values[rows, 1] + 2.5
        z = z64.to(dtype)
    raise AssertionError("could not move the logits off the kinks")


def run(z, y, name, params, backend, reduction="none", upstream=None, ignore_index=-100):
    """Loss and d loss / d logits; ``upstream=None`` backpropagates ``loss.sum()`` (for
    reduction "none" an expanded, stride-0 gradient of ones)."""
    x = z.detach().clone().requires_grad_()
    loss = F.apl_loss(x, y, name, reduction=reduction, backend=backend, ignore_index=ignore_index, **params)
    if upstream is None:
        loss.sum().backward()
    else:
        loss.backward(upstream)
    return loss.detach(), x.grad


def truth(z, y, name, params, ignore_index=-100):
    """Float64 values (N,), gradients (N, K), the row's gradient scale (N, 1) and the values'
    allowance for lp rounding (N,), by the spec's formulas; ignored rows are 0."""
    z64 = z.detach().double().cpu()
    y = y.cpu()
    keep = y != ignore_index
    values = torch.zeros(z64.shape[0], dtype=torch.float64)
    grads = torch.zeros_like(z64)
    scale = torch.zeros(z64.shape[0], 1, dtype=torch.float64)
    lp_rounding = torch.zeros(z64.shape[0], dtype=torch.float64)
    if keep.any():
        v, g, magnitude, sensitivity = loss_and_grad(z64[keep].numpy(), y[keep].numpy(), name, **params)
        values[keep] = torch.from_numpy(v)
        grads[keep] = torch.from_numpy(g)
        scale[keep] = torch.from_numpy(magnitude.max(axis=1, keepdims=True))
        # lp = (z - m) - log s rounds to a few eps of |z - m| + log s.
        spread = 1 + 2 * z64[keep].abs().amax(dim=1) + math.log(z64.shape[1])
        lp_rounding[keep] = torch.from_numpy(sensitivity) * 4 * acc_eps(z.dtype) * spread
    return values, grads, scale, lp_rounding


def check(name, dtype, got_values, got_grads, z, y, params, reduction="none", upstream=None, ignore_index=-100):
    """Assert the kernel's loss and gradient are within the tolerances of the module docstring."""
    values, grads, scale, lp_rounding = truth(z, y, name, params, ignore_index)
    count = max(int((y != ignore_index).sum()), 1)
    tol = inner_tolerance(dtype)
    value_allowed = tol * values.abs() + lp_rounding
    upstream_factor = torch.ones(len(values), dtype=torch.float64)
    if upstream is not None:
        upstream_factor = upstream_factor * upstream.double().cpu().expand(len(values))
    factor = upstream_factor / count if reduction == "mean" else upstream_factor
    want_grad = grads * factor[:, None]
    underflow = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
    grad_allowed = tol * scale * factor.abs()[:, None] + underflow
    if reduction == "none":
        want_value = values
    else:
        want_value = values.sum() / (count if reduction == "mean" else 1)
        value_allowed = value_allowed.sum() / (count if reduction == "mean" else 1)
    value_allowed = value_allowed + half_rounding(want_value, dtype, 1)
    kernel_roundings = KERNEL_ROUNDINGS.get(dtype, 1)
    grad_allowed = grad_allowed + half_rounding(want_grad, dtype, kernel_roundings, upstream_factor[:, None])
    if upstream is not None:
        grad_allowed = grad_allowed + half_rounding(want_grad, dtype, 1)
    got_values = got_values.double().cpu()
    got_grads = got_grads.double().cpu()
    assert got_values.shape == want_value.shape and got_grads.shape == want_grad.shape
    value_ratio = (got_values - want_value).abs() / value_allowed.clamp_min(1e-300)
    grad_ratio = (got_grads - want_grad).abs() / grad_allowed.clamp_min(1e-300)
    where = f"{name} {params} {dtype} K={z.shape[1]} {reduction}"
    assert not value_ratio.isnan().any() and value_ratio.max() <= 1, (
        f"{where}: value error {float((got_values - want_value).abs().max()):.3g}, "
        f"{float(value_ratio.max()):.3g} x the allowed"
    )
    assert not grad_ratio.isnan().any() and grad_ratio.max() <= 1, (
        f"{where}: gradient error {float((got_grads - want_grad).abs().max()):.3g} at "
        f"{np.unravel_index(int(grad_ratio.argmax()), grad_ratio.shape)}, {float(grad_ratio.max()):.3g} x the allowed"
    )


# ---------------------------------------------------------------- the element math and the launch table


@triton.jit
def _one_minus_exp_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(out_ptr + offsets, triton_backend._one_minus_exp(x), mask=offsets < n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_minus_exp_matches_expm1(dtype):
    # Both branches (series for |x| < ln 2, 1 - exp(x) below), their boundary, tiny x, -inf.
    x = -torch.cat([
        torch.logspace(-37 if dtype == torch.float32 else -300, 1.5, 1900, dtype=torch.float64),
        torch.linspace(0.69, 0.70, 100, dtype=torch.float64),
        torch.tensor([0.0, math.log(2), float("inf")], dtype=torch.float64),
    ]).to(dtype).to(DEVICE)
    out = torch.empty_like(x)
    _one_minus_exp_kernel[(1,)](x, out, len(x), BLOCK=triton.next_power_of_2(len(x)))
    x, out = x.cpu(), out.cpu()
    want = -torch.expm1(x.double())
    # Series: Horner rounding, ~2 ulp; below -ln 2: exp's error times p/(1 - p) <= 1, and GPU
    # exp is the approximate ex2 (~2 ulp): at most 4 ulp; torch.expm1 itself is within 1.
    four_units = 4 * torch.finfo(dtype).eps / 2
    error = ((out.double() - want).abs() / want.abs().clamp_min(torch.finfo(dtype).tiny))
    assert error.max() <= four_units, (error.max(), x[error.argmax()])
    assert out[-1] == 1 and out[-3] == 0


def test_launch_table():
    for k in (2, 10, 100, 1000, 4096, 5000, 32000, 128000):
        block, warps = triton_backend.launch_config(k)
        assert block & (block - 1) == 0 and 16 <= block <= triton_backend.MAX_BLOCK
        # At most 8 elements per thread (registers: the row stays in them across the passes),
        # and no more warps than it takes to give each thread 8 (one 16-byte load of a half type).
        assert warps in (1, 2, 4, 8, 16) and block <= 8 * 32 * warps
        assert warps == 1 or block >= 8 * 32 * warps
        assert (block >= k) == (k <= triton_backend.MAX_BLOCK)
    assert triton_backend.launch_config(5000)[0] < 5000  # K = 5000 below runs in chunks


@triton.jit
def _to_bfloat16_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets).to(tl.bfloat16))


@pytest.mark.skipif(CUDA, reason="GPUs convert float32 to bfloat16 rounding to nearest even")
def test_interpreter_truncates_float32_to_bfloat16():
    # Why KERNEL_ROUNDINGS counts bfloat16 twice under the interpreter (its cast_impl drops
    # the low bits): when this fails, the interpreter rounds, and the allowance can go.
    x = torch.tensor([1 + 2.0**-8 + 2.0**-10, -(3 + 2.0**-7 + 2.0**-9)])  # above the midpoints
    out = torch.empty(2, dtype=torch.bfloat16)
    _to_bfloat16_kernel[(1,)](x, out, BLOCK=2)
    assert torch.equal(x.to(torch.bfloat16), torch.tensor([1 + 2.0**-7, -(3 + 2.0**-6)], dtype=torch.bfloat16))
    assert torch.equal(out, torch.tensor([1.0, -3.0], dtype=torch.bfloat16))


# ---------------------------------------------------------------- parity: every loss, dtype, K


def combos(index):
    """The (dtype, K, mode) a loss case runs: float32 at every K, each half type at two K and
    float64 at one, rotating with the case so every K meets every dtype across the cases,
    and the modes rotating over the reductions and upstream gradients."""
    kinds = [(torch.float32, k) for k in KS] + [
        (torch.float16, KS[index % 5]), (torch.float16, KS[(index + 2) % 5]),
        (torch.bfloat16, KS[(index + 1) % 5]), (torch.bfloat16, KS[(index + 3) % 5]),
        (torch.float64, KS[(index + 4) % 5]),
    ]
    modes = ("random-upstream", "stride0-upstream", "mean", "sum")
    return [(dtype, k, modes[(index + j) % 4]) for j, (dtype, k) in enumerate(kinds)]


def run_mode(z, y, name, params, mode, seed):
    if mode == "random-upstream":
        g = torch.Generator().manual_seed(seed)
        upstream = torch.randn(len(y), generator=g, dtype=torch.float64).to(z.dtype).to(z.device)
        return run(z, y, name, params, "triton", "none", upstream) + ("none", upstream)
    if mode == "stride0-upstream":
        return run(z, y, name, params, "triton", "none") + ("none", None)
    upstream = torch.tensor(2.5, dtype=z.dtype, device=z.device) if mode == "sum" else None
    return run(z, y, name, params, "triton", mode, upstream) + (mode, upstream)


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_parity(case, seed):
    name, params = case
    index = LOSS_CASES.index(case)
    for j, (dtype, k, mode) in enumerate(combos(index)):
        z = conditioned_logits(3, k, seed + j, dtype, is_focal(name)).to(DEVICE)
        y = random_target(3, k, seed + j).to(DEVICE)
        values, grads, reduction, upstream = run_mode(z, y, name, params, mode, seed + j)
        assert values.dtype == dtype and grads.dtype == dtype
        check(name, dtype, values, grads, z, y, params, reduction, upstream)


# ---------------------------------------------------------------- call semantics


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("ignore_index", [-100, 3])
@pytest.mark.parametrize("name", ["nce+rce", "nfl+mae", "ngce"])
def test_ignore_index_and_reductions(name, ignore_index, reduction, seed):
    n, k = 9, 7
    z = conditioned_logits(n, k, seed, torch.float32, is_focal(name))
    y = random_target(n, k, seed)
    y[::3] = ignore_index  # an ignore_index inside [0, K) is ignored too
    z[0] = float("nan")  # an ignored row's logits never reach the result
    z, y = z.to(DEVICE), y.to(DEVICE)
    upstream = None if reduction == "none" else torch.tensor(-1.5, device=DEVICE)
    values, grads = run(z, y, name, {}, "triton", reduction, upstream, ignore_index)
    ignored = (y == ignore_index).cpu()
    assert torch.all(grads.cpu()[ignored] == 0)
    if reduction == "none":
        assert torch.all(values.cpu()[ignored] == 0)
    check(name, torch.float32, values, grads, z, y, {}, reduction, upstream, ignore_index)
    ref_values, _ = run(z, y, name, {}, "torch", reduction, upstream, ignore_index)
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_not_nan(reduction):
    z = torch.randn(4, 5, device=DEVICE)
    values, grads = run(z, torch.full((4,), -100, device=DEVICE), "nce+rce", {}, "triton", reduction)
    assert torch.all(values == 0) and torch.all(grads == 0)


@pytest.mark.parametrize("name", ["nce+rce", "nfl+mae", "ngce", "sce"])
def test_non_contiguous_and_transposed_inputs(name, seed):
    k, n = 37, 6
    y = random_target(n, k, seed).to(DEVICE)
    z = conditioned_logits(n, k, seed, torch.float32, is_focal(name)).to(DEVICE)
    layouts = {
        "transposed": torch.empty(k, n, device=DEVICE).t(),  # row stride 1, class stride N
        "every other row of a transpose": torch.empty(k, 2 * n, device=DEVICE).t()[::2],
        "every other class": torch.empty(n, 2 * k, device=DEVICE)[:, ::2],
    }
    want_values, want_grads = run(z, y, name, {}, "triton")
    check(name, torch.float32, want_values, want_grads, z, y, {})
    for layout, strided in layouts.items():
        strided.copy_(z)
        assert not strided.is_contiguous(), layout
        values, grads = run(strided, y, name, {}, "triton")
        # The same kernel reads the same numbers: bit-identical.
        assert torch.equal(values, want_values) and torch.equal(grads, want_grads), layout


def test_op_reads_strided_logits_in_place():
    # The op itself takes the strides: a transposed input reaches the kernel as it is.
    z = torch.randn(16, 4, device=DEVICE).t()
    spec = make_spec("nce+rce")
    op_args = fused.op_arguments(spec, "none", -100, True)
    y = torch.randint(0, 16, (4,), device=DEVICE)
    call = triton_backend.decode_call(*op_args)
    args, _ = triton_backend.launch_arguments(z, y, call, torch.empty(4), torch.empty(4, 16), None)
    assert args[0] is z and (args[6], args[7]) == (1, 4)
    loss, grad = torch.ops.apl.triton_loss(z, y, *op_args)
    want_loss, want_grad = torch.ops.apl.triton_loss(z.contiguous(), y, *op_args)
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    assert grad.is_contiguous()


@pytest.mark.parametrize("name", ["nce+mae", "nfl+rce", "ngce+nce"])
def test_spatial_input_equals_flattened(name, seed):
    n, k, d1, d2 = 2, 5, 3, 2
    z = conditioned_logits(n * d1 * d2, k, seed, torch.float32, is_focal(name))
    z = z.reshape(n, d1, d2, k).movedim(-1, 1).to(DEVICE)  # (N, K, d1, d2), classes strided
    y = random_target(n * d1 * d2, k, seed).reshape(n, d1, d2).to(DEVICE)
    for reduction in ("none", "mean"):
        values, grads = run(z, y, name, {}, "triton", reduction)
        assert values.shape == (y.shape if reduction == "none" else ())
        flat_z = z.movedim(1, -1).reshape(-1, k)
        flat_values, flat_grads = run(flat_z.contiguous(), y.reshape(-1), name, {}, "triton", reduction)
        assert torch.equal(values.reshape(-1), flat_values.reshape(-1))
        assert torch.equal(grads.movedim(1, -1).reshape(-1, k), flat_grads)
        check(name, torch.float32, flat_values, flat_grads, flat_z, y.reshape(-1), {}, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upstream_gradients(dtype, seed):
    name, n, k = "nce+rce", 6, 10
    z = conditioned_logits(n, k, seed, dtype).to(DEVICE)
    y = random_target(n, k, seed).to(DEVICE)
    # A non-contiguous upstream gradient (every other element of a longer vector).
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(2 * n, generator=g).to(dtype).to(DEVICE)[::2]
    values, grads = run(z, y, name, {}, "triton", "none", upstream)
    check(name, dtype, values, grads, z, y, {}, "none", upstream)
    # The stride-0 gradient of loss.sum(), and an upstream of 1 for a reduced loss.
    for reduction in ("none", "sum", "mean"):
        values, grads = run(z, y, name, {}, "triton", reduction)
        check(name, dtype, values, grads, z, y, {}, reduction)


def test_forward_without_grad_matches():
    z = random_logits(5, 12, 0, dtype=torch.float32).to(DEVICE)
    y = random_target(5, 12, 0).to(DEVICE)
    with torch.no_grad():
        plain = F.nfl_rce(z, y, reduction="none", backend="triton")
    with_grad, _ = run(z, y, "nfl+rce", {}, "triton")
    torch.testing.assert_close(plain, with_grad, rtol=1e-6, atol=0)
    spec = make_spec("nfl+rce")
    loss, grad = torch.ops.apl.triton_loss(z, y, *fused.op_arguments(spec, "none", -100, False))
    assert grad.numel() == 0
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- masked classes, extreme and bad rows

EDGE_NAMES = ["ce", "fl", "gce", "mae", "rce", "nce", "nfl", "ngce", "nmae", "nrce", "sce",
              "nce+rce", "nfl+mae", "gce+nce", "ngce+nce", "nfl+nce"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", EDGE_NAMES)
def test_masked_classes_and_extreme_logits(name, dtype, seed):
    k = 8
    z = random_logits(7, k, seed, dtype=torch.float32)
    z[:, 3] = float("-inf")  # a masked class, never the label
    z[1, 0], z[2, 1] = 1e4, -1e4
    z[4] = torch.tensor([30.0, -30.0, 0, float("-inf"), 0, 0, 0, 0])  # p[y] == 1 in float32
    z[5] = torch.tensor([-1e4, 1e4, -1e4, float("-inf"), 1e4, -1e4, 0, 0])
    z[6, :3] = float("-inf")
    z = z.to(dtype).to(DEVICE)
    y = torch.tensor([0, 0, 2, 4, 0, 1, 5], device=DEVICE)
    for params in ({}, {"official_grad": True}) if is_focal(name) else ({},):
        values, grads = run(z, y, name, params, "triton")
        ref_values, ref_grads = run(z, y, name, params, "torch")
        # No NaN or inf where the reference has none; the masked class gets no gradient.
        assert torch.equal(torch.isfinite(values), torch.isfinite(ref_values))
        assert torch.equal(torch.isfinite(grads), torch.isfinite(ref_grads))
        assert torch.isfinite(values).all() and torch.isfinite(grads).all()
        assert torch.all(grads[:, 3] == 0)
        # Against the reference in the same float32 arithmetic: p == 1 and p == 0 come out
        # exactly in both, which the float64 truth would not share (u^gamma at u ~ 1e-13).
        # Both are float32 results rounded to the dtype: they may differ by both roundings.
        scale = ref_grads.double().abs().max()
        error = (grads.double() - ref_grads.double()).abs()
        roundings = KERNEL_ROUNDINGS.get(dtype, 1) + 1
        assert (error <= 1e-5 * scale + half_rounding(ref_grads.double(), dtype, roundings)).all()
        error = (values.double() - ref_values.double()).abs()
        assert (error <= 1e-5 * (1 + ref_values.double().abs()) + half_rounding(ref_values.double(), dtype, 2)).all()


def test_nan_and_infinite_logits_give_nan_rows():
    z = torch.randn(5, 6, device=DEVICE)
    z[1, 2] = float("nan")
    z[2, 4] = float("inf")
    z[3] = float("-inf")  # no class left: softmax is undefined
    y = torch.tensor([0, 1, 2, 3, 4], device=DEVICE)
    for name in ("nce+rce", "ngce", "nrce", "nfl+mae"):
        values, grads = run(z, y, name, {}, "triton")
        bad = torch.tensor([False, True, True, True, False])
        assert torch.isnan(values.cpu()[bad]).all() and torch.isfinite(values.cpu()[~bad]).all()
        assert torch.isnan(grads.cpu()[bad]).all() and torch.isfinite(grads.cpu()[~bad]).all()


@pytest.mark.parametrize("bad_label", [-1, 6, 10**12])
def test_out_of_range_target_gives_nan_row(bad_label):
    # The kernel does not trust the labels (checking them on the host would synchronize
    # with the GPU): a label outside [0, K) that is not ignore_index makes its row NaN, and
    # nothing outside the row is read.
    z = torch.randn(4, 6, device=DEVICE)
    y = torch.tensor([1, bad_label, 5, -100], device=DEVICE)
    spec = make_spec("nce+rce")
    values, grads = torch.ops.apl.triton_loss(z, y, *fused.op_arguments(spec, "none", -100, True))
    assert torch.isnan(values[1]) and torch.isnan(grads[1]).all()
    assert torch.isfinite(values[[0, 2]]).all() and torch.isfinite(grads[[0, 2, 3]]).all()
    assert values[3] == 0 and torch.all(grads[3] == 0)
    mean, mean_grads = torch.ops.apl.triton_loss(z, y, *fused.op_arguments(spec, "mean", -100, True))
    assert torch.isnan(mean) and torch.isnan(mean_grads[1]).all()
    if CUDA:
        assert torch.isnan(F.nce_rce(z, y, reduction="none", backend="triton")[1])
    else:  # the public functions check CPU labels, where that costs no synchronization
        with pytest.raises(ValueError, match="outside"):
            F.nce_rce(z, y, backend="triton")


# ---------------------------------------------------------------- the op called directly


def test_op_rejects_bad_arguments():
    op = torch.ops.apl.triton_loss
    z = torch.randn(4, 5, device=DEVICE)
    y = torch.zeros(4, dtype=torch.long, device=DEVICE)
    good = ([0], [1.0, 0.5, 0.7], [-100, 1, 0, 1])  # ce; weight, gamma, q; ignore_index, mean, flags
    op(z, y, *good)
    cases = [
        ((z[0], y), good, "shape \\(R, K\\)"),
        ((z.long(), y), good, "float16, bfloat16, float32 or float64"),
        ((z[:, :1], y), good, "classes must be >= 2"),
        ((z, y.int()), good, "int64"),
        ((z, y[:3]), good, "shape \\(4,\\)"),
        ((z, y), ([0, 1, 2], [1.0, 1.0, 1.0, 0.5, 0.7], good[2]), "1 or 2 bases"),
        ((z, y), ([0], [1.0, 0.5], good[2]), "one weight per base, then gamma"),
        ((z, y), ([10], good[1], good[2]), "base indices"),
        ((z, y), (good[0], good[1], [-100, 3, 0, 1]), "reduction code"),
        ((z, y), (good[0], good[1], [-100, 1, 0]), "options must be"),
        ((z, y), (good[0], [1.0, -1.0, 0.7], good[2]), "gamma >= 0"),
        ((z, y), (good[0], [1.0, 0.5, float("inf")], good[2]), "gamma >= 0 and q > 0"),
        ((z, y), (good[0], [float("nan"), 0.5, 0.7], good[2]), "weights must be finite"),
        ((z, y), (good[0], good[1], [-100, 1, 0, 2]), "must be 0 or 1"),
    ]
    for tensors, args, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            op(*tensors, *args)
    if CUDA:
        with pytest.raises(ValueError, match="runs on CUDA tensors"):
            op(z.cpu(), y.cpu(), *good)


# ---------------------------------------------------------------- GPU-only, and the GPU compile check


@pytest.mark.skipif(not CUDA, reason="torch.compile cannot trace the interpreted kernels (fake tensors "
                    "have no data): this test needs a CUDA device")
def test_torch_compile_matches_eager(seed):
    z = conditioned_logits(64, 100, seed, torch.float32, focal=True).to(DEVICE)
    y = random_target(64, 100, seed).to(DEVICE)
    criterion = torch.compile(ak.NFLRCE(backend="triton"), fullgraph=True)
    x = z.clone().requires_grad_()
    loss = criterion(x, y)
    loss.backward()
    eager_loss, eager_grad = run(z, y, "nfl+rce", {}, "triton", "mean")
    torch.testing.assert_close(loss.detach(), eager_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, eager_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_picks_triton_for_cuda_tensors():
    assert backends.resolve("auto", "cuda").name == "triton"


# One configuration per line of the kernel's constexpr space that matters: every base as
# first or second term, every dtype, one block and chunked rows, both gradient modes,
# every reduction, with and without the gradient.
COMPILE_CONFIGS = [
    ("ce", {}, "float32", 10, 1, True),
    ("nfl+rce", {"official_grad": True}, "bfloat16", 1000, 1, True),
    ("ngce+nce", {}, "float16", 5000, 0, True),
    ("fl+nrce", {}, "float64", 100, 2, True),
    ("gce+mae", {}, "float32", 32000, 1, False),
    ("nce+nmae", {}, "bfloat16", 128000, 2, True),
    ("nfl+nce", {}, "float32", 4096, 0, True),
]

COMPILE_SCRIPT = """
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from apl_kernels.backends import fused, triton as tb
from apl_kernels.catalogue import make_spec
TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
         torch.int64: "i64"}
for name, params, dtype, k, reduction, compute_grad in json.loads(sys.argv[1]):
    spec = make_spec(name, **params)
    logits = torch.empty(2, k, dtype=getattr(torch, dtype))
    target = torch.zeros(2, dtype=torch.long)
    acc = torch.float64 if dtype == "float64" else torch.float32
    call = tb.decode_call(*fused.op_arguments(spec, ("none", "mean", "sum")[reduction], -100, compute_grad))
    args, meta = tb.launch_arguments(logits, target, call, torch.empty(2, dtype=acc), torch.empty_like(logits),
                                     torch.zeros((), dtype=torch.long))
    num_warps = meta.pop("num_warps")
    names = tb._apl_loss_kernel.arg_names
    unspecialized = set(tb._apl_loss_kernel.do_not_specialize)
    signature, constexprs, attrs = {}, dict(meta), {}
    # As Triton's launcher specializes: pointers and ints divisible by 16 get that hint, ints equal to 1 are constants.
    for i, (arg_name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            signature[arg_name] = "*" + TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif value == 1 and i not in unspecialized:
            signature[arg_name] = "constexpr"
            constexprs[arg_name] = 1
        else:
            signature[arg_name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and i not in unspecialized:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for arg_name in meta:
        signature[arg_name] = "constexpr"
    compiled = triton.compile(ASTSource(tb._apl_loss_kernel, signature, constexprs, attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"], name
    print(name, dtype, k, "ok")
# What torch.compile traces first: the op on fake CUDA tensors (the kernel is not launched).
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode():
    z = torch.empty(64, 1000, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(64, dtype=torch.long, device="cuda")
    for reduction, shape in ((0, (64,)), (1, ())):
        loss, grad = torch.ops.apl.triton_loss(z, y, [6, 4], [1.0, 1.0, 0.5, 0.7], [-100, reduction, 1, 1])
        assert loss.shape == shape and loss.dtype == torch.float32, (loss.shape, loss.dtype)
        assert grad.shape == z.shape and grad.dtype == z.dtype and grad.device.type == "cuda"
print("fake ok")
"""


@pytest.mark.skipif(CUDA, reason="on a GPU every other test compiles and runs the kernels")
@pytest.mark.skipif(
    not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    and shutil.which("ptxas") is None,
    reason="no ptxas to compile for a GPU",
)
def test_kernels_compile_for_sm90():
    # The interpreter runs the kernels' Python, not Triton's compiler: compile them for an
    # H100 (sm_90) in a process without TRITON_INTERPRET, down to a cubin; and run the op
    # on fake CUDA tensors, as torch.compile traces it.
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(ak.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(COMPILE_SCRIPT), json.dumps(COMPILE_CONFIGS)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count(" ok") == len(COMPILE_CONFIGS) + 1 and "fake ok" in result.stdout, result.stdout
