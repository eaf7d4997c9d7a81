"""The plain PyTorch reference: it defines what every fused backend computes.

Values are the formulas of docs/losses.md; gradients come from autograd (``official_grad``
detaches the focal modulating factors, as the published code does). Everything is computed in
float32 (float64 for float64 inputs).

Every loss is defined per label; a row's target is a distribution of coefficients ``c`` over the
K labels (:func:`target_coefficients`: a one-hot label times its class weight, smoothed, or a
row of probability targets) and the row's loss is the expectation ``sum_y c[y] L(z, y)``. Each
base function below computes that expectation directly from per-element terms and row sums, in
the form the fused kernels use (docs/losses.md, "Targets as distributions").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends.contract import mean_divisor
from .catalogue import LossSpec
from .options import CallOptions, accumulation_dtype

CLAMP_MIN = 1e-7  # p̂ = clamp(p, CLAMP_MIN, 1), as the published code clamps
LOG_CLAMP_MIN = math.log(CLAMP_MIN)
RCE_A = -math.log(1e-4)  # RCE's -log(clamp(one_hot, 1e-4, 1)) off the label
ANORM_CLAMP_MIN = 1e-5  # anorm's p̂ = clamp(p, 1e-5, 1), as the official ANL code clamps


class _OneMinusExp(torch.autograd.Function):
    """``1 - exp(x) = -expm1(x)`` for x <= ln 2 (= 1 - p for x = lp) without cancellation when x is
    close to 0.

    Its derivative ``-exp(x)`` is computed from ``x``: torch's expm1 takes it from the result
    (``result + 1``), which is 0 once p < 1e-16 in float64.
    """

    generate_vmap_rule = True  # torch ops only: torch.func can batch it

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return -torch.expm1(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return -grad * x.exp()


def _one_minus_power(t: Tensor, q: float) -> Tensor:
    """``(1 - exp(q t)) / q`` for q t <= ln 2 without cancellation: ``-expm1(q t) / q``, and ``-t``
    where |q t| < 1e-30, whose error there, |q t| / 2 relative, is far below an ulp; q t itself
    may have underflowed there (q = 1e-30, t = 1e-18 gives 1e-48: 0 in float32), or lost digits as a
    subnormal. Its derivative is -exp(q t) dt (through _OneMinusExp), -dt where |q t| < 1e-30."""
    x = q * t
    return torch.where(x.abs() < 1e-30, -t, _OneMinusExp.apply(x) / q)


def _focal(lp: Tensor, gamma: float, official_grad: bool) -> Tensor:
    """The focal term ``f = -(1 - exp(lp))^gamma lp`` of every element.

    d/du u^gamma = gamma u^(gamma-1) is infinite at u = 0 (p == 1 in floating point) for gamma < 1,
    while f's derivative has the finite limit 0 there (u^(gamma-1) multiplies lp ~ -u): at u = 0
    the factor is held constant; elsewhere u is clamped away from 0 only so that the unused branch
    of the ``where`` stays finite in backward. At a masked class (lp = -inf, p = 0) the factor's
    derivative is 0, but autograd would form 0 * inf there: the factor's gradient goes through a
    finite copy of lp (same value, same derivative everywhere else).
    """
    u = _OneMinusExp.apply(lp)
    if official_grad:
        factor = u.detach().pow(gamma)
    else:
        factor = torch.where(u > 0, u.clamp_min(torch.finfo(u.dtype).tiny).pow(gamma), u.detach().pow(gamma))
    lp_finite = torch.where(torch.isfinite(lp), lp, 0).detach()
    return -(factor.detach() * lp + (factor - factor.detach()) * lp_finite)


def expectation(c: Tensor, x: Tensor) -> Tensor:
    """``sum_j c[j] x[j]`` per row, where a label of coefficient 0 adds 0 even if x is infinite there.
    Its derivative in c[j] is x[j] wherever x[j] is finite, coefficient 0 included (as
    ``F.cross_entropy``'s in a probability target), 0 where c[j] = 0 and x[j] is infinite."""
    return (c * torch.where((c != 0) | x.isfinite(), x, 0)).sum(1)


class Row:
    """One batch of rows: the softmax's terms and the target coefficients every base loss reads."""

    def __init__(self, z: Tensor, c: Tensor, spec: LossSpec) -> None:
        self.lp = torch.log_softmax(z, dim=1)
        self.p = torch.softmax(z, dim=1)
        self.c = c
        self.total_c = c.sum(1)  # C = sum_j c[j]
        self.K = z.shape[1]
        self.spec = spec

    def clamped(self) -> Tensor:
        return self.p.clamp(CLAMP_MIN, 1)

    def focal(self, lp: Tensor) -> Tensor:
        return _focal(lp, self.spec.param("gamma"), self.spec.official_grad)

    def clamped_lp(self) -> Tensor:
        """max(lp, ln m): ln clamp(p, m, 1) without rounding p (clamp_min passes the gradient at m)."""
        return self.lp.clamp_min(math.log(self.spec.param("min_prob")))


def _ce(r: Row) -> Tensor:
    return -expectation(r.c, r.lp)


def _fl(r: Row) -> Tensor:
    return expectation(r.c, r.focal(r.lp))


def gce_elements(r: Row) -> Tensor:
    """GCE's ``(1 - p̂^q) / q`` of every element, as ``-expm1(q ln p̂) / q``: 1 - p̂^q cancels to 0
    for small q (q = 1e-8: p̂^q = 1 - 1e-8 |ln p̂| is 1 in float32), this form is exact to a few
    ulps for every q, and tends to -ln p̂ as q -> 0. Its derivative (autograd, through
    _OneMinusExp, whose derivative -exp(x) is taken from x) is -p̂^q where p >= 1e-7, 0 where the
    clamp holds ln p̂ at ln 1e-7 (torch's clamp passes the gradient at the bound, as here)."""
    log_clamped = torch.where(r.p < CLAMP_MIN, LOG_CLAMP_MIN, r.lp)  # a NaN p stays NaN
    return _one_minus_power(log_clamped, r.spec.param("q"))


def _gce(r: Row) -> Tensor:
    return expectation(r.c, gce_elements(r))


def _mae(r: Row) -> Tensor:
    return expectation(r.c, _OneMinusExp.apply(r.lp))


def _rce(r: Row) -> Tensor:
    # sum_y c[y] A sum_{j != y} p̂[j] = A sum_j (C - c[j]) p̂[j]: for a one-hot row C - c[y] is
    # exactly 0, so the label's own p̂ ~ 1 is never added and subtracted.
    return RCE_A * ((r.total_c[:, None] - r.c) * r.clamped()).sum(1)


def _nce(r: Row) -> Tensor:
    return expectation(r.c, r.lp) / r.lp.sum(1)


def _nfl(r: Row) -> Tensor:
    f = r.focal(r.lp)
    return expectation(r.c, f) / f.sum(1)


def _ngce(r: Row) -> Tensor:
    # (1 - p̂[y]^q) / (K - sum_j p̂[j]^q) = V[y] / sum_j V[j] with GCE's V = (1 - p̂^q) / q: the
    # numerator and every term of the denominator without cancellation (K - sum p̂^q is 0 in
    # float32 at q = 1e-8), and all of a size ~|ln p̂| rather than q |ln p̂| (so no underflow at q = 1e-30).
    v = gce_elements(r)
    return expectation(r.c, v) / v.sum(1)


def _nmae(r: Row) -> Tensor:
    return _mae(r) / (r.K - 1)


def _nrce(r: Row) -> Tensor:
    return _rce(r) / (RCE_A * (r.K - 1))


def _nnce(r: Row) -> Tensor:
    s = -math.log(r.spec.param("min_prob")) + r.clamped_lp()
    return r.total_c - expectation(r.c, s) / s.sum(1)


def _nnfl(r: Row) -> Tensor:
    m, gamma = r.spec.param("min_prob"), r.spec.param("gamma")
    g = -(1 - m) ** gamma * math.log(m) - r.focal(r.clamped_lp())  # B - f̂
    return r.total_c - expectation(r.c, g) / g.sum(1)


def _agce(r: Row) -> Tensor:
    """((a + 1)^q - (a + p)^q) / q = T (1 - r^q) / q = T · -expm1(q ln r) / q, with T = (a + 1)^q and
    r = (a + p) / (a + 1) = 1 - w, w = (1 - p) / (a + 1). The published form cancels where r^q is
    close to 1 (large a, small q, p close to 1: a = 1e8, q = 1 gives 0 for 0.92). ln r is
    log1p(-w) for w <= 1/2 (1 - p from -expm1(lp), so w has no cancellation), else ln((a + p) / (a + 1))
    (r < 1/2: no cancellation either; log1p(-w) would lose r's digits to 1 - w there).
    (1 - r^q) / q is _one_minus_power. Derivative: d ln r / dp = 1 / (a + p), so dV/dp = -T r^q / (a + p) = -(a + p)^(q-1): autograd
    on this form gives the published derivative (each branch's unused side is fed a safe value)."""
    a, q = r.spec.param("a"), r.spec.param("q")
    w = _OneMinusExp.apply(r.lp) / (a + 1)
    near = w <= 0.5
    log_ratio = torch.where(near, torch.log1p(-torch.where(near, w, 0)),
                            torch.log(torch.where(near, 1, (a + r.p) / (a + 1))))
    return expectation(r.c, (a + 1) ** q * _one_minus_power(log_ratio, q))


def _aul(r: Row) -> Tensor:
    """((a - p)^q - (a - 1)^q) / q with B = (a - 1)^q and x = q ln((a - p) / (a - 1)) = q log1p(u / d),
    u = 1 - p, d = a - 1 (computed once, in float64: a - p in float32 loses d for a close to 1):
    B expm1(x) / q where x <= ln 2 (_one_minus_power; there (a - p)^q is within a factor 2 of B and the published form
    cancels: a = 1e6 gives 0.104 for 0.231, a = 1e30 gives 0 or -1.6e21), else ((a - p)^q - B) / q
    with (a - p)^q = exp(q ln(d + u)) >= 2 B (no cancellation; and B may underflow where expm1(x)
    overflows). Derivative, either branch: dx/du = q / (d + u), so dV/du = (a - p)^q / (d + u) and
    dV/dp = -(a - p)^(q-1), the published derivative."""
    return expectation(r.c, _aul_elements(_OneMinusExp.apply(r.lp), r.spec.param("a"), r.spec.param("q")))


def _aul_elements(u: Tensor, a: float, q: float) -> Tensor:
    """aul's ((a - p)^q - (a - 1)^q) / q of every element from u = 1 - p (_aul's forms)."""
    d = a - 1
    t = torch.log1p(u / d)
    small = q * t <= math.log(2)
    bottom = d**q
    powered = torch.exp(q * torch.log(d + u))
    return torch.where(small, -bottom * _one_minus_power(torch.where(small, t, 0), q), (powered - bottom) / q)


def _ael(r: Row) -> Tensor:
    return expectation(r.c, torch.exp(-r.p / r.spec.param("a")))


def _anorm(r: Row) -> Tensor:
    """sum_y c[y] (|a - p̂[y]|^q + sum_{k != y} p̂[k]^q - (a - 1)^q) / q (q carries its p) is
    sum (c V + (C - c) W), the split family: V = ((a - p̂)^q - (a - 1)^q) / q is aul's at p̂ (a > 1)
    and W = p̂^q / q. C - c is exactly 0 at a one-hot label, so W[y] ~ 1 / q is never added and then
    cancelled by V[y]. Where the clamp holds (p < 1e-5) ln p̂ and 1 - p̂ are constants: no gradient."""
    a, q = r.spec.param("a"), r.spec.param("q")
    kept = ~(r.p < ANORM_CLAMP_MIN)  # a NaN p is kept: it stays NaN
    at_label = _aul_elements(torch.where(kept, _OneMinusExp.apply(r.lp), 1 - ANORM_CLAMP_MIN), a, q)
    others = torch.exp(q * torch.where(kept, r.lp, math.log(ANORM_CLAMP_MIN))) / q
    return expectation(r.c, at_label) + ((r.total_c[:, None] - r.c) * others).sum(1)


BASE_FUNCTIONS = {
    "ce": _ce, "fl": _fl, "gce": _gce, "mae": _mae, "rce": _rce, "nce": _nce, "nfl": _nfl, "ngce": _ngce,
    "nmae": _nmae, "nrce": _nrce, "nnce": _nnce, "nnfl": _nnfl, "agce": _agce, "aul": _aul, "ael": _ael,
    "anorm": _anorm,
}


def target_coefficients(target: Tensor, num_classes: int, weight: Tensor | None, label_smoothing: float,
                        ignore_index: int, dtype: torch.dtype) -> Tensor:
    """Each row's coefficients ``c`` (R, K) over the labels, by ``F.cross_entropy``'s rules.

    Index targets (R,): ``c = (1 - eps) w[y] onehot(y) + eps / K w`` (w = 1 without class
    weights); an ignored row has ``c = 0``. Probability targets (R, K): ``c = w ((1 - eps) t + eps / K)``.
    """
    w = None if weight is None else weight.to(dtype)
    if target.is_floating_point():
        c = target.to(dtype)
        if label_smoothing:
            c = (1 - label_smoothing) * c + label_smoothing / num_classes
        if w is not None:
            c = c * w
        return c
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    row_weight = valid.to(dtype) if w is None else torch.where(valid, w[safe], 0)
    c = torch.zeros(target.shape[0], num_classes, dtype=dtype, device=target.device).scatter(
        1, safe[:, None], ((1 - label_smoothing) * row_weight)[:, None])  # out of place: vmap batches it
    if label_smoothing:
        spread = label_smoothing / num_classes * (torch.ones(num_classes, dtype=dtype, device=target.device)
                                                  if w is None else w)
        c = c + valid[:, None] * spread
    return c


def reduce_rows(rows: Tensor, divisor: Tensor, reduction: str) -> Tensor:
    """Apply ``reduction`` to per-row losses; a ``mean`` divides by ``divisor``
    (contract.mean_divisor)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / divisor


def reference_loss(logits: Tensor, target: Tensor, weight: Tensor | None, spec: LossSpec,
                   options: CallOptions) -> Tensor:
    """The torch backend on rows: ``(R, K)`` logits, ``(R,)`` int64 labels or ``(R, K)`` probabilities
    (validated by the caller); the loss in the accumulation dtype."""
    acc = accumulation_dtype(logits.dtype)
    c = target_coefficients(target, logits.shape[1], weight, options.label_smoothing, options.ignore_index, acc)
    # Rows without any coefficient (ignored ones) see zero logits, so that neither their value
    # nor their gradient can be NaN; their loss is then set to 0.
    counted = (c != 0).any(1)
    z = torch.where(counted[:, None], logits.to(acc), 0)
    row = Row(z, c, spec)
    rows = sum(weight * BASE_FUNCTIONS[base](row) for base, weight in spec.terms)
    rows = torch.where(counted, rows, 0)
    return reduce_rows(rows, mean_divisor(target, weight, options.ignore_index, acc), options.reduction)
