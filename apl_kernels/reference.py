"""The plain PyTorch reference: it defines what every fused backend computes.

Values are the formulas of ``../shared/spec/losses.md``; gradients come from
autograd (``official_grad`` detaches the focal modulating factors, as the
published code does). Everything is computed in float32 (float64 for float64
inputs) and the loss is returned in the input dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .catalogue import LossSpec

CLAMP_MIN = 1e-7  # p̂ = clamp(p, CLAMP_MIN, 1), as the published code clamps
RCE_A = -math.log(1e-4)  # RCE's -log(clamp(one_hot, 1e-4, 1)) off the label


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _OneMinusExp(torch.autograd.Function):
    """``1 - exp(lp)`` (= 1 - p) without cancellation when p is close to 1.

    Its derivative ``-exp(lp)`` is computed from ``lp``: torch's expm1 takes it
    from the result (``result + 1``), which is 0 once p < 1e-16 in float64.
    """

    @staticmethod
    def forward(lp: Tensor) -> Tensor:
        return -torch.expm1(lp)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (lp,) = ctx.saved_tensors
        return -grad * lp.exp()


def _one_minus_p(lp: Tensor) -> Tensor:
    return _OneMinusExp.apply(lp)


def _focal_factor(lp: Tensor, gamma: float, official_grad: bool) -> Tensor:
    """(1 - p)^gamma, with or without its derivative.

    d/du u^gamma = gamma u^(gamma-1) is infinite at u = 0 (p == 1 in floating
    point) for gamma < 1, while the loss's derivative has the finite limit 0
    there (u^(gamma-1) multiplies lp ~ -u). So at u = 0 the factor is a
    constant; elsewhere u is clamped away from 0 only so that the unused
    branch of the ``where`` stays finite in the backward pass.
    """
    u = _one_minus_p(lp)
    if official_grad:
        return u.detach().pow(gamma)
    return torch.where(u > 0, u.clamp_min(torch.finfo(u.dtype).tiny).pow(gamma), u.detach().pow(gamma))


def _gather(x: Tensor, y: Tensor) -> Tensor:
    return x.gather(1, y[:, None])[:, 0]


def _base_ce(lp, p, y, spec):
    return -_gather(lp, y)


def _base_fl(lp, p, y, spec):
    lp_y = _gather(lp, y)
    return -_focal_factor(lp_y, spec.gamma, spec.official_grad) * lp_y


def _base_gce(lp, p, y, spec):
    return (1 - _gather(p, y).clamp(CLAMP_MIN, 1).pow(spec.q)) / spec.q


def _base_mae(lp, p, y, spec):
    return _one_minus_p(_gather(lp, y))


def _sum_off_label(x: Tensor, y: Tensor) -> Tensor:
    off_label = torch.ones_like(x, dtype=torch.bool).scatter_(1, y[:, None], False)
    return (x * off_label).sum(1)


def _base_rce(lp, p, y, spec):
    return RCE_A * _sum_off_label(p.clamp(CLAMP_MIN, 1), y)


def _base_nce(lp, p, y, spec):
    return _gather(lp, y) / lp.sum(1)


def _base_nfl(lp, p, y, spec):
    factor = _focal_factor(lp, spec.gamma, spec.official_grad)
    # f = -(1-p)^gamma lp. At a masked class (lp = -inf, p = 0) the factor's
    # derivative is 0, but autograd would form 0 * inf there: route the
    # factor's gradient through a finite copy of lp (same value, same
    # derivative everywhere else).
    lp_finite = torch.where(torch.isfinite(lp), lp, 0).detach()
    f = -(factor.detach() * lp + (factor - factor.detach()) * lp_finite)
    return _gather(f, y) / f.sum(1)


def _base_ngce(lp, p, y, spec):
    powered = p.clamp(CLAMP_MIN, 1).pow(spec.q)
    return (1 - _gather(powered, y)) / (p.shape[1] - powered.sum(1))


def _base_nmae(lp, p, y, spec):
    return _base_mae(lp, p, y, spec) / (p.shape[1] - 1)


def _base_nrce(lp, p, y, spec):
    return _sum_off_label(p.clamp(CLAMP_MIN, 1), y) / (p.shape[1] - 1)


BASE_FUNCTIONS = {
    "ce": _base_ce, "fl": _base_fl, "gce": _base_gce, "mae": _base_mae, "rce": _base_rce,
    "nce": _base_nce, "nfl": _base_nfl, "ngce": _base_ngce, "nmae": _base_nmae, "nrce": _base_nrce,
}


def loss_rows(logits: Tensor, target: Tensor, spec: LossSpec) -> Tensor:
    """Per-row loss of ``(R, K)`` logits and ``(R,)`` labels in [0, K), in the accumulation dtype."""
    z = logits.to(accumulation_dtype(logits.dtype))
    lp = torch.log_softmax(z, dim=1)
    p = torch.softmax(z, dim=1)
    total = None
    for base, weight in spec.terms:
        term = weight * BASE_FUNCTIONS[base](lp, p, target, spec)
        total = term if total is None else total + term
    return total


def reduce_rows(rows: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """Apply ``reduction`` to per-row losses; ignored rows count as 0 and not in the mean."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    # An all-ignored batch gives 0 / 1 = 0 with zero gradient, not NaN.
    return total / valid.sum().clamp_min(1)


def reference_loss(logits: Tensor, target: Tensor, spec: LossSpec, reduction: str, ignore_index: int) -> Tensor:
    """The torch backend: ``(R, K)`` logits, ``(R,)`` int64 labels (validated by the caller)."""
    valid = target != ignore_index
    # Ignored rows see zero logits and label 0, so that neither their value
    # nor their gradient can be NaN; their loss is then set to 0.
    safe_logits = torch.where(valid[:, None], logits, 0)
    safe_target = torch.where(valid, target, 0)
    rows = loss_rows(safe_logits, safe_target, spec)
    rows = torch.where(valid, rows, 0)
    return reduce_rows(rows, valid, reduction).to(logits.dtype)
