"""Fused Triton kernels: ``backend="triton"``, the default for CUDA tensors.

Two ops with the contract of ``fused.py``: ``apl::triton_loss`` (one kernel launch: the rows'
statistics, their losses and, for ``mean``/``sum``, the reduced loss) and
``apl::triton_loss_backward`` (one launch: the gradient, times the upstream gradient). The math is
``csrc/apl_rowmath.h``'s, written here once more in Triton; docs/kernels.md ("Triton") gives the
design, the launch table and the bytes each path moves.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors:
that is how they are tested without a GPU. The interpreter runs every ``@triton.jit`` call through
Python, so the helpers below are few and work on whole tiles.
"""

import contextlib
import math
import struct
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..catalogue import BASE_INDEX, BASE_LOSSES, BASES, FAMILIES, FOCAL, PARAMETERS
from ..reference import CLAMP_MIN, RCE_A, accumulation_dtype
from . import BackendUnavailable, fused

INTERPRETED = bool(triton.knobs.runtime.interpret)  # what @triton.jit saw below

# ---------------------------------------------------------------- the catalogue as constexprs

# Base losses by name (their values are catalogue.BASE_INDEX's, the enum of apl_rowmath.h).
_NAMES = ("ce", "fl", "gce", "mae", "rce", "nce", "nfl", "ngce", "nmae", "nrce", "nnce", "nnfl", "agce", "aul", "ael")
if set(_NAMES) != set(BASE_LOSSES):
    raise ImportError(f"catalogue.BASES changed ({BASE_LOSSES}): give every base loss a Triton constant and element")
CE, FL, GCE, MAE, RCE, NCE, NFL, NGCE, NMAE, NRCE, NNCE, NNFL, AGCE, AUL, AEL = (
    tl.constexpr(BASE_INDEX[name]) for name in _NAMES)
NO_TERM = tl.constexpr(-1)  # BASE1 of a single loss

# The families of catalogue.FAMILIES (apl_rowmath.h's family_of): how a base's expectation over
# labels is formed.
LOCAL, REVERSE, NORMALIZED, NEGATIVE = (tl.constexpr(FAMILIES.index(f)) for f in
                                        ("local", "reverse", "normalized", "negative"))
_FAMILIES = tuple(FAMILIES.index(base.family) for base in BASES)


@triton.constexpr_function
def family_of(base):
    return _FAMILIES[base]


@triton.constexpr_function
def needs_pass(base, dense):
    """apl_rowmath.h's term_needs_pass: whether a term's sums run over every element of the row
    (always for dense coefficients; for a one-hot target only where they are not the label's)."""
    return dense or (_FAMILIES[base] != LOCAL.value and base != NCE.value)


_CLAMP_MIN = tl.constexpr(CLAMP_MIN)
_RCE_A = tl.constexpr(RCE_A)
_LN2 = tl.constexpr(math.log(2.0))
STATS = tl.constexpr(fused.STATS)

# Floating arguments travel as the int64 bits of a float64: Triton would pass a Python float as
# float32 (rounding a float64 loss's parameters), and typing them int64 by annotation, never
# specialized, keeps one compiled kernel whatever their values (0.0's bits would otherwise be an i32).
FLOAT_ARGS = ("w0", "w1", "gamma", "q", "a", "log_min_prob", "clamp_min_powered", "nnfl_b", "agce_top", "aul_bottom",
              "keep", "spread")
# Never specialized on their values (ignore_index is typed int64 by annotation too). Nor on the
# strides and alignment of what the sums run over: Triton would vectorize a contiguous, aligned
# row's loads (4 elements a thread, against 1 for a strided row), which changes the tile's layout
# and so the order of its sums; one binary for every layout keeps strided and contiguous copies of
# the same logits bit-identical (their loads are still coalesced).
UNSPECIALIZED = FLOAT_ARGS + ("ignore_index", "stride_row", "stride_col", "stride_target_row", "stride_target_col")
UNALIGNED = ("logits_ptr", "target_ptr", "weight_ptr")


def float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


# ---------------------------------------------------------------- per-row values as small structs


class Params(NamedTuple):
    """The call's floats in the accumulation dtype (FLOAT_ARGS): the terms' weights, the loss's
    parameters with what LossParams::derive computes from them once per call (ln m, 1e-7^q,
    B = -(1 - m)^g ln m, (a + 1)^q, (a - 1)^q), and the label smoothing's 1 - eps and eps / K."""
    w0: tl.tensor
    w1: tl.tensor
    gamma: tl.tensor
    q: tl.tensor
    a: tl.tensor
    log_min_prob: tl.tensor
    clamp_min_powered: tl.tensor
    nnfl_b: tl.tensor
    agce_top: tl.tensor
    aul_bottom: tl.tensor
    keep: tl.tensor
    spread: tl.tensor


class Label(NamedTuple):
    """A row's label (index targets): y, whether it is counted (not ignore_index) and in [0, K),
    its coefficient c[y] = (1 - eps) w[y], and its weight in a mean (w[y], 1 without weights)."""
    y: tl.tensor
    kept: tl.tensor
    in_range: tl.tensor
    coef: tl.tensor
    weight: tl.tensor


class Sums(NamedTuple):
    """A term's sums over a row (TermSums): sum omega V, sum omega V', and sum V, sum V'."""
    weighted: tl.tensor
    weighted_derivative: tl.tensor
    plain: tl.tensor
    plain_derivative: tl.tensor


class Coefs(NamedTuple):
    """A term's part of the row (RowCoefs): its value, and h = (alpha + beta omega) V' with its sum."""
    value: tl.tensor
    alpha: tl.tensor
    beta: tl.tensor
    total_h: tl.tensor


class Record(NamedTuple):
    """apl_op.h's RowRecord: what GRAD_IN_BACKWARD saves per row (STATS values, in this order)."""
    max_z: tl.tensor
    log_s: tl.tensor
    total_c: tl.tensor
    alpha0: tl.tensor
    beta0: tl.tensor
    alpha1: tl.tensor
    beta1: tl.tensor
    total_h: tl.tensor


class Gradient(NamedTuple):
    """What the gradient pass needs per row: the record's values times the row's scale, 1 - p at
    the max, and the one-hot terms without a pass folded into a constant plus a label term."""
    max_z: tl.tensor
    log_s: tl.tensor
    u_max: tl.tensor
    total_c: tl.tensor
    alpha0: tl.tensor
    beta0: tl.tensor
    alpha1: tl.tensor
    beta1: tl.tensor
    total_h: tl.tensor
    constant: tl.tensor
    at_label: tl.tensor
    zero: tl.tensor  # the row's gradient is 0 (every coefficient is: not counted)


if len(Record._fields) != fused.STATS:
    raise ImportError("Record must hold fused.STATS values")

# ---------------------------------------------------------------- element math (apl_rowmath.h)


@triton.jit
def _one_minus_exp(x):
    """1 - exp(x) = -expm1(x) for x <= 0 (Triton has no expm1).

    Near x = 0, 1 - exp(x) cancels: there (|x| < ln 2) the Taylor series of expm1 in Horner form,
    x (1 + x/2 (1 + x/3 (...))), whose first dropped term |x|^(n+1)/(n+1)! is below half an ulp of
    |x| for n = 9 (float32) and n = 16 (float64). Below -ln 2, 1 - exp(x) > 1/2 has no cancellation.
    """
    if x.dtype == tl.float64:
        terms: tl.constexpr = 16
    else:
        terms: tl.constexpr = 9
    r = 1.0 + x * (1.0 / terms)
    for n in tl.static_range(terms - 1, 1, -1):
        r = 1.0 + (x * (1.0 / n)) * r
    return tl.where(x > -_LN2, -x * r, 1.0 - tl.exp(x))


@triton.jit
def _focal(p, lp, u_max, gamma, OFFICIAL: tl.constexpr):
    """f = -u^g lp and d = df/dlp = -u^g + g u^(g-1) p lp, u = 1 - p (du/dlp = -p); official_grad
    holds u^g constant. The second term is 0 (its limit) where u = 0 or p = 0; elsewhere
    u^(g-1) = u^g / u. u is 1 - p where p <= 1/2, else the row's max, whose 1 - p is u_max."""
    u = tl.where(p > 0.5, u_max, 1.0 - p)
    # u^g = 2^(g log2 u), and 0^g = 0 (1 for g = 0). Branch-free: a (uniform) branch on gamma's
    # common values would hold every element's u live across it, and spill at 16 elements a thread.
    positive = u > 0.0
    u_gamma = tl.where(positive, tl.exp2(gamma * tl.log2(tl.where(positive, u, 1.0))), tl.where(gamma == 0.0, 1.0, 0.0))
    d = -u_gamma
    if not OFFICIAL:
        defined = (u > 0.0) & (p > 0.0)
        d += tl.where(defined, gamma * (u_gamma / tl.where(defined, u, 1.0)) * p * lp, 0.0)
    return -u_gamma * lp, d


@triton.jit
def _element(BASE: tl.constexpr, p, lp, u_max, kf, prm, OFFICIAL: tl.constexpr):
    """V and V' = dV/dlp of base BASE at elements of probability p, log-probability lp (the table
    of apl_rowmath.h); u_max is 1 - p at the row's max (one expm1 per row), kf = K."""
    zero = tl.full(lp.shape, 0.0, lp.dtype)
    clamped = p >= _CLAMP_MIN  # mask[j]
    if BASE == CE:
        value = -lp
        derivative = zero - 1.0
    elif BASE == FL or BASE == NFL:
        value, derivative = _focal(p, lp, u_max, prm.gamma, OFFICIAL)
    elif BASE == GCE or BASE == NGCE:
        powered = tl.where(clamped, tl.exp(prm.q * lp), prm.clamp_min_powered)  # p̂^q
        if BASE == GCE:
            value = (1.0 - powered) / prm.q
            derivative = tl.where(clamped, -powered, 0.0)
        else:
            value = 1.0 - powered
            derivative = tl.where(clamped, -prm.q * powered, 0.0)
    elif BASE == MAE or BASE == NMAE:
        if BASE == MAE:
            norm = zero + 1.0
        else:
            norm = zero + 1.0 / (kf - 1.0)
        value = norm * tl.where(p > 0.5, u_max, 1.0 - p)
        derivative = -norm * p
    elif BASE == RCE or BASE == NRCE:
        if BASE == RCE:
            norm = zero + _RCE_A
        else:
            norm = zero + 1.0 / (kf - 1.0)
        value = norm * tl.maximum(p, _CLAMP_MIN)
        derivative = norm * tl.where(clamped, p, 0.0)
    elif BASE == NCE:
        value = lp
        derivative = zero + 1.0
    elif BASE == NNCE:
        value = tl.maximum(lp, prm.log_min_prob) - prm.log_min_prob
        derivative = tl.where(lp >= prm.log_min_prob, 1.0, 0.0) + zero
    elif BASE == NNFL:
        # f̂ = f(max(p, m)) is B where the clamp is active: V = B - f(p) there, 0 elsewhere (f at
        # the unclamped p, so that no element but the row's max is taken for p > 1/2).
        active = lp >= prm.log_min_prob
        f, d = _focal(p, lp, u_max, prm.gamma, OFFICIAL)
        value = tl.where(active, prm.nnfl_b - f, 0.0)
        derivative = tl.where(active, -d, 0.0)
    elif BASE == AGCE or BASE == AUL:
        if BASE == AGCE:
            base_value = prm.a + p  # a ± p > 0
        else:
            base_value = prm.a - p
        powered = tl.exp(prm.q * tl.log(base_value))  # (a ± p)^q
        slope = powered / base_value * p  # (a ± p)^(q-1) p
        if BASE == AGCE:
            value = (prm.agce_top - powered) / prm.q
        else:
            value = (powered - prm.aul_bottom) / prm.q
        derivative = -slope
    else:  # AEL
        e = tl.exp(-p / prm.a)
        value = e
        derivative = -e * p / prm.a
    return value, derivative


# ---------------------------------------------------------------- rows: sums, coefficients, gradient


@triton.jit
def _term_sums(BASE: tl.constexpr, DENSE: tl.constexpr, p, lp, valid, c, total_c, is_label, u_max, kf, prm,
               OFFICIAL: tl.constexpr):
    """A tile's part of a term's Sums over its elements (a term with needs_pass): with dense
    coefficients, omega = c (C - c for reverse); one-hot, the reverse terms' omega is C off the
    label (skipping it rather than subtracting p[y] ~ 1 later) and the other terms' label sums come
    from the label alone (_label_sums); normalized and negative terms add sum V, sum V'."""
    value, derivative = _element(BASE, p, lp, u_max, kf, prm, OFFICIAL)
    zero = tl.full(total_c.shape, 0.0, total_c.dtype)
    weighted = zero
    weighted_derivative = zero
    plain = zero
    plain_derivative = zero
    if DENSE:
        if family_of(BASE) == REVERSE:
            omega = tl.where(valid, total_c[:, None] - c, 0.0)
        else:
            omega = c
        # A label of coefficient 0 adds nothing, even where V is infinite (a masked class).
        weighted = tl.sum(tl.where(omega != 0.0, omega * value, 0.0), 1)
        weighted_derivative = tl.sum(omega * derivative, 1)
    elif family_of(BASE) == REVERSE:
        off_label = valid & ~is_label
        weighted = total_c * tl.sum(tl.where(off_label, value, 0.0), 1)
        weighted_derivative = total_c * tl.sum(tl.where(off_label, derivative, 0.0), 1)
    if (family_of(BASE) == NORMALIZED or family_of(BASE) == NEGATIVE) and BASE != NCE:
        plain = tl.sum(tl.where(valid, value, 0.0), 1)
        plain_derivative = tl.sum(tl.where(valid, derivative, 0.0), 1)
    return Sums(weighted, weighted_derivative, plain, plain_derivative)


@triton.jit
def _add_sums(a, b):
    return Sums(a.weighted + b.weighted, a.weighted_derivative + b.weighted_derivative, a.plain + b.plain,
                a.plain_derivative + b.plain_derivative)


@triton.jit
def _label_sums(BASE: tl.constexpr, sums, p_y, lp_y, total_c, u_max, kf, prm, OFFICIAL: tl.constexpr):
    """One-hot rows: a non-reverse term's sums of omega = c, which is C at the label, 0 elsewhere."""
    if family_of(BASE) != REVERSE:
        value, derivative = _element(BASE, p_y, lp_y, u_max, kf, prm, OFFICIAL)
        sums = Sums(tl.where(total_c == 0.0, 0.0, total_c * value), total_c * derivative, sums.plain,
                    sums.plain_derivative)
    return sums


@triton.jit
def _coefs(BASE: tl.constexpr, w, sums, lp_sum, total_c, kf):
    """row_coefs of apl_rowmath.h for one term of weight w. nce's D = sum lp and sum V' = K come
    from the row's statistics. A masked class makes nce's and nfl's D infinite: value and gradient
    0, their limits."""
    zero = tl.full(total_c.shape, 0.0, total_c.dtype)
    if family_of(BASE) == LOCAL or family_of(BASE) == REVERSE:
        value = w * sums.weighted
        alpha = zero
        beta = zero + w
        total_h = w * sums.weighted_derivative
    else:
        if BASE == NCE:
            d = lp_sum
            plain_derivative = zero + kf
        else:
            d = sums.plain
            plain_derivative = sums.plain_derivative
        SIGN: tl.constexpr = 1.0 if family_of(BASE) == NORMALIZED else -1.0
        inv = 1.0 / d
        n_over_d = tl.where(sums.weighted == 0.0, 0.0, sums.weighted * inv)  # N / D, 0 where N is 0
        if family_of(BASE) == NORMALIZED:
            value = w * n_over_d
        else:
            value = w * (total_c - n_over_d)
        beta = SIGN * w * inv
        alpha = -SIGN * w * n_over_d * inv
        total_h = beta * sums.weighted_derivative + alpha * plain_derivative
    return Coefs(value, alpha, beta, total_h)


@triton.jit
def _pass_term_gradient(BASE: tl.constexpr, DENSE: tl.constexpr, alpha, beta, p, lp, c, total_c, is_label, u_max,
                        kf, prm, OFFICIAL: tl.constexpr):
    """(alpha + beta omega[i]) V'[i] of a term with needs_pass (omega as in _term_sums)."""
    _, derivative = _element(BASE, p, lp, u_max, kf, prm, OFFICIAL)
    if DENSE:
        if family_of(BASE) == REVERSE:
            omega = total_c[:, None] - c
        else:
            omega = c
    elif family_of(BASE) == REVERSE:
        omega = tl.where(is_label, 0.0, total_c[:, None])
    else:
        omega = tl.where(is_label, total_c[:, None], 0.0)
    return (alpha[:, None] + beta[:, None] * omega) * derivative


@triton.jit
def _store_gradient(grad_ptr, rows, row_ok, start, K, z, c, y, g, kf, prm, BASE0: tl.constexpr,
                    BASE1: tl.constexpr, DENSE: tl.constexpr, OFFICIAL: tl.constexpr, BLOCK_K: tl.constexpr):
    """dL/dz[i] = sum_t (alpha_t + beta_t omega_t[i]) V'_t[i] - p[i] H over the tile of classes
    [start, start + BLOCK_K), into the contiguous (R, K) gradient. The store's offsets are computed
    here from the rows and classes, never taken from a load of the logits: Inductor's access
    analysis would then count the logits as written."""
    cols = start + tl.arange(0, BLOCK_K)
    lp = (z - g.max_z[:, None]) - g.log_s[:, None]
    p = tl.exp(lp)
    is_label = cols[None, :] == y[:, None]
    out = g.constant[:, None] + tl.where(is_label, g.at_label[:, None], 0.0) - p * g.total_h[:, None]
    if needs_pass(BASE0, DENSE):
        out += _pass_term_gradient(BASE0, DENSE, g.alpha0, g.beta0, p, lp, c, g.total_c, is_label, g.u_max[:, None],
                                   kf, prm, OFFICIAL)
    if BASE1 != NO_TERM:
        if needs_pass(BASE1, DENSE):
            out += _pass_term_gradient(BASE1, DENSE, g.alpha1, g.beta1, p, lp, c, g.total_c, is_label,
                                       g.u_max[:, None], kf, prm, OFFICIAL)
    out = tl.where(g.zero[:, None], 0.0, out)
    offsets = rows[:, None] * K + cols[None, :]
    tl.store(grad_ptr + offsets, out.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < K)[None, :])


@triton.jit
def _gradient(record, label, z_y, scale, kf, prm, BASE0: tl.constexpr, BASE1: tl.constexpr, DENSE: tl.constexpr,
              OFFICIAL: tl.constexpr):
    """The per-row Gradient from a Record times the row's scale (upstream gradient / divisor).
    One-hot terms without a pass act on the label only (their alpha is 0, but nce's, whose V' is 1:
    a constant), with V'[y] from the label's logit."""
    u_max = _one_minus_exp(-record.log_s)
    zero = (record.alpha0 == 0.0) & (record.beta0 == 0.0) & (record.alpha1 == 0.0) & (record.beta1 == 0.0) & (
        record.total_h == 0.0)
    constant = tl.full(scale.shape, 0.0, scale.dtype)
    at_label = tl.full(scale.shape, 0.0, scale.dtype)
    if not DENSE:
        lp_y = (z_y - record.max_z) - record.log_s
        p_y = tl.exp(lp_y)
        if not needs_pass(BASE0, DENSE):
            _, derivative = _element(BASE0, p_y, lp_y, u_max, kf, prm, OFFICIAL)
            constant += record.alpha0
            at_label += record.beta0 * record.total_c * derivative
        if BASE1 != NO_TERM:
            if not needs_pass(BASE1, DENSE):
                _, derivative = _element(BASE1, p_y, lp_y, u_max, kf, prm, OFFICIAL)
                constant += record.alpha1
                at_label += record.beta1 * record.total_c * derivative
    return Gradient(record.max_z, record.log_s, u_max, record.total_c, record.alpha0 * scale, record.beta0 * scale,
                    record.alpha1 * scale, record.beta1 * scale, record.total_h * scale, constant * scale,
                    at_label * scale, zero)


# ---------------------------------------------------------------- loads


@triton.jit
def _params(bits, ACC: tl.constexpr):
    """Params from FLOAT_ARGS's float64 bits (made int64 first: the interpreter passes small ones as
    int32)."""
    values = ()
    for i in tl.static_range(len(bits)):
        values = values + (bits[i].to(tl.int64).to(tl.float64, bitcast=True).to(ACC),)
    return Params(*values)


@triton.jit
def _logits(logits_ptr, rows, row_ok, start, K, stride_row, stride_col, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """Classes [start, start + BLOCK_K) of the rows, in ACC; -inf outside the rows (it adds 0 to
    every sum). Not masked by anything the labels say: the row's load never waits for theirs."""
    cols = start + tl.arange(0, BLOCK_K)
    offsets = rows[:, None] * stride_row + cols[None, :].to(tl.int64) * stride_col  # int64: R K may pass 2^31
    mask = row_ok[:, None] & (cols < K)[None, :]
    return tl.load(logits_ptr + offsets, mask=mask, other=float("-inf")).to(ACC)


@triton.jit
def _label(target_ptr, weight_ptr, rows, row_ok, K, stride_target, ignore_index, keep, PROBS: tl.constexpr,
           WEIGHTED: tl.constexpr, ACC: tl.constexpr):
    """The rows' Label (index targets; probability rows count 1 in a mean). A label outside [0, K)
    is never used as an address: its row is NaN."""
    ones = tl.full(rows.shape, 1.0, ACC)
    if PROBS:
        y = rows * 0 - 1  # matches no class
        kept = row_ok
        in_range = row_ok
        w = tl.where(row_ok, ones, 0.0)
        coef = w * 0.0
    else:
        y = tl.load(target_ptr + rows * stride_target, mask=row_ok, other=ignore_index)
        kept = row_ok & (y != ignore_index)
        in_range = (y >= 0) & (y < K)
        w = ones
        if WEIGHTED:
            w = tl.load(weight_ptr + tl.where(in_range, y, 0), mask=kept & in_range, other=1.0).to(ACC)
        w = tl.where(kept, w, 0.0)
        coef = keep * w
    return Label(y, kept, in_range, coef, w)


@triton.jit
def _coefficients(target_ptr, weight_ptr, rows, row_ok, start, K, stride_row, stride_col, label, keep, spread,
                  PROBS: tl.constexpr, WEIGHTED: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense rows' coefficients c over the tile's classes (0 outside the rows): probabilities,
    c = w ((1 - eps) t + eps / K); smoothed labels, c = eps / K w + [j == y] (1 - eps) w[y]."""
    cols = start + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    w = tl.full([BLOCK_K], 1.0, ACC)
    if WEIGHTED:
        w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    mask = row_ok[:, None] & col_ok[None, :]
    if PROBS:
        offsets = rows[:, None] * stride_row + cols[None, :].to(tl.int64) * stride_col
        t = tl.load(target_ptr + offsets, mask=mask, other=0.0).to(ACC)
        c = keep * w[None, :] * t + spread * w[None, :]
    else:
        c = tl.where(label.kept[:, None], spread * w[None, :], 0.0)
        c += tl.where(cols[None, :] == label.y[:, None], label.coef[:, None], 0.0)
    return tl.where(mask, c, 0.0)


@triton.jit
def _tile(logits_ptr, target_ptr, weight_ptr, rows, row_ok, start, K, strides, label, prm, PROBS: tl.constexpr,
          WEIGHTED: tl.constexpr, DENSE: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """A tile's logits and, for dense rows, coefficients (one-hot rows get z back as c, unused)."""
    z = _logits(logits_ptr, rows, row_ok, start, K, strides[0], strides[1], ACC, BLOCK_K)
    c = z
    if DENSE:
        c = _coefficients(target_ptr, weight_ptr, rows, row_ok, start, K, strides[2], strides[3], label, prm.keep,
                          prm.spread, PROBS, WEIGHTED, ACC, BLOCK_K)
    return z, c


@triton.jit
def _load_record(stats_ptr, rows, row_ok):
    """The rows' Records, a field at a time: (the columns of a (ROWS, STATS) tile would come out of
    its reduction in another layout, and be converted at full tile width where they are broadcast)."""
    at = stats_ptr + rows * STATS
    return Record(tl.load(at, mask=row_ok, other=0.0), tl.load(at + 1, mask=row_ok, other=0.0),
                  tl.load(at + 2, mask=row_ok, other=0.0), tl.load(at + 3, mask=row_ok, other=0.0),
                  tl.load(at + 4, mask=row_ok, other=0.0), tl.load(at + 5, mask=row_ok, other=0.0),
                  tl.load(at + 6, mask=row_ok, other=0.0), tl.load(at + 7, mask=row_ok, other=0.0))


@triton.jit
def _label_logit(logits_ptr, rows, label, stride_row, stride_col, ACC: tl.constexpr):
    y = tl.where(label.in_range, label.y, 0)
    return tl.load(logits_ptr + rows * stride_row + y * stride_col, mask=label.kept & label.in_range,
                   other=0.0).to(ACC)


# ---------------------------------------------------------------- the kernels


@triton.jit(do_not_specialize=UNSPECIALIZED, do_not_specialize_on_alignment=UNALIGNED)
def _forward_kernel(
    logits_ptr, target_ptr, weight_ptr, loss_ptr, saved_ptr, partials_ptr, counter_ptr, divisor_ptr,
    R, K, stride_row, stride_col, stride_target_row, stride_target_col, ignore_index: tl.int64,
    w0: tl.int64, w1: tl.int64, gamma: tl.int64, q: tl.int64, a: tl.int64, log_min_prob: tl.int64,
    clamp_min_powered: tl.int64, nnfl_b: tl.int64, agce_top: tl.int64, aul_bottom: tl.int64, keep: tl.int64,
    spread: tl.int64,
    BASE0: tl.constexpr, BASE1: tl.constexpr, OFFICIAL: tl.constexpr, PROBS: tl.constexpr, WEIGHTED: tl.constexpr,
    DENSE: tl.constexpr, REDUCTION: tl.constexpr, GRAD_MODE: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr, CHUNKED: tl.constexpr,
):
    """ROWS rows per program: their losses, and their Records (GRAD_IN_BACKWARD) or gradients
    (GRAD_IN_FORWARD); for mean/sum the last program to finish reduces every program's part."""
    ACC: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    strides = (stride_row, stride_col, stride_target_row, stride_target_col)
    z = _logits(logits_ptr, rows, row_ok, 0, K, stride_row, stride_col, ACC, BLOCK_K)  # issued first
    bits = (w0, w1, gamma, q, a, log_min_prob, clamp_min_powered, nnfl_b, agce_top, aul_bottom, keep, spread)
    prm = _params(bits, ACC)
    kf = K.to(ACC)
    label = _label(target_ptr, weight_ptr, rows, row_ok, K, stride_target_row, ignore_index, prm.keep, PROBS, WEIGHTED,
                   ACC)
    cols = tl.arange(0, BLOCK_K)

    # Pass 1: m = max z, s = sum exp(z - m), sum (z - m), C and the count of nonzero c; online over
    # chunks when the row is chunked. While m is -inf (every class so far masked) sums are taken
    # relative to 0 instead: no -inf - -inf.
    c = z  # (unused unless DENSE)
    if DENSE:
        c = _coefficients(target_ptr, weight_ptr, rows, row_ok, 0, K, stride_target_row, stride_target_col, label,
                          prm.keep, prm.spread, PROBS, WEIGHTED, ACC, BLOCK_K)
        total_c = tl.sum(c, 1)
        nonzero = tl.sum((c != 0.0).to(tl.int32), 1)
    else:
        total_c = label.coef
        nonzero = (label.coef != 0.0).to(tl.int32)
    max_z = tl.max(z, 1)
    ref = tl.where(max_z == float("-inf"), 0.0, max_z)
    s = tl.sum(tl.exp(z - ref[:, None]), 1)
    shifted = tl.sum(tl.where((cols < K)[None, :], z - ref[:, None], 0.0), 1)
    if CHUNKED:
        for start in range(BLOCK_K, K, BLOCK_K):
            zc, cc = _tile(logits_ptr, target_ptr, weight_ptr, rows, row_ok, start, K, strides, label, prm, PROBS,
                           WEIGHTED, DENSE, ACC, BLOCK_K)
            new_max = tl.maximum(max_z, tl.max(zc, 1))
            new_ref = tl.where(new_max == float("-inf"), 0.0, new_max)
            s = s * tl.exp(max_z - new_ref) + tl.sum(tl.exp(zc - new_ref[:, None]), 1)
            shifted += start * (ref - new_ref) + tl.sum(tl.where((start + cols < K)[None, :], zc - new_ref[:, None],
                                                                 0.0), 1)
            max_z = new_max
            ref = new_ref
            if DENSE:
                total_c += tl.sum(cc, 1)
                nonzero += tl.sum((cc != 0.0).to(tl.int32), 1)
    # A softmax is undefined when a logit is NaN or +inf or every logit is -inf: NaN row, as
    # log_softmax's (RowStats::defined); so is a row whose label is out of range.
    log_s = tl.log(s)
    defined = (tl.abs(max_z) < float("inf")) & (tl.abs(log_s) < float("inf")) & label.in_range
    max_z = ref
    u_max = _one_minus_exp(-log_s)  # 1 - p at the max, whose lp is -log s
    lp_sum = shifted - kf * log_s  # nce's D = sum lp, without a sum of z (that cancels for large m)

    # Pass 2: the sums of the terms that need one (chunked rows: from the last chunk back, the most
    # recently read, so that the second read is served from cache where it can be).
    zero = tl.full(total_c.shape, 0.0, total_c.dtype)
    sums0 = Sums(zero, zero, zero, zero)
    sums1 = Sums(zero, zero, zero, zero)
    if needs_pass(BASE0, DENSE) or (BASE1 != NO_TERM and needs_pass(BASE1, DENSE)):
        if CHUNKED:
            chunks = tl.cdiv(K, BLOCK_K)
            for i in range(0, chunks):
                start = (chunks - 1 - i) * BLOCK_K
                zc, cc = _tile(logits_ptr, target_ptr, weight_ptr, rows, row_ok, start, K, strides, label, prm, PROBS,
                               WEIGHTED, DENSE, ACC, BLOCK_K)
                valid = row_ok[:, None] & (start + cols < K)[None, :]
                is_label = (start + cols)[None, :] == label.y[:, None]
                lp = (zc - max_z[:, None]) - log_s[:, None]
                p = tl.exp(lp)
                if needs_pass(BASE0, DENSE):
                    sums0 = _add_sums(sums0, _term_sums(BASE0, DENSE, p, lp, valid, cc, total_c, is_label,
                                                        u_max[:, None], kf, prm, OFFICIAL))
                if BASE1 != NO_TERM:
                    if needs_pass(BASE1, DENSE):
                        sums1 = _add_sums(sums1, _term_sums(BASE1, DENSE, p, lp, valid, cc, total_c, is_label,
                                                            u_max[:, None], kf, prm, OFFICIAL))
        else:
            valid = row_ok[:, None] & (cols < K)[None, :]
            is_label = cols[None, :] == label.y[:, None]
            lp = (z - max_z[:, None]) - log_s[:, None]
            p = tl.exp(lp)
            if needs_pass(BASE0, DENSE):
                sums0 = _term_sums(BASE0, DENSE, p, lp, valid, c, total_c, is_label, u_max[:, None], kf, prm,
                                   OFFICIAL)
            if BASE1 != NO_TERM:
                if needs_pass(BASE1, DENSE):
                    sums1 = _term_sums(BASE1, DENSE, p, lp, valid, c, total_c, is_label, u_max[:, None], kf, prm,
                                       OFFICIAL)
    z_y = zero
    if not DENSE:  # one-hot rows: the label's own sums, from its logit
        z_y = _label_logit(logits_ptr, rows, label, stride_row, stride_col, ACC)
        lp_y = (z_y - max_z) - log_s
        p_y = tl.exp(lp_y)
        sums0 = _label_sums(BASE0, sums0, p_y, lp_y, total_c, u_max, kf, prm, OFFICIAL)
        if BASE1 != NO_TERM:
            sums1 = _label_sums(BASE1, sums1, p_y, lp_y, total_c, u_max, kf, prm, OFFICIAL)
    coefs0 = _coefs(BASE0, prm.w0, sums0, lp_sum, total_c, kf)
    coefs1 = Coefs(zero, zero, zero, zero)
    if BASE1 != NO_TERM:
        coefs1 = _coefs(BASE1, prm.w1, sums1, lp_sum, total_c, kf)

    # The row's value and Record: 0 where no label has a coefficient (ignored rows), NaN where
    # the row is undefined (its gradient too: through log s and H).
    counted = nonzero > 0
    nan = zero + float("nan")
    value = tl.where(counted, tl.where(defined, coefs0.value + coefs1.value, nan), 0.0)
    value = tl.where(row_ok, value, 0.0)
    bad = counted & ~defined
    record = Record(tl.where(counted, tl.where(defined, max_z, nan), 0.0),
                    tl.where(counted, tl.where(defined, log_s, nan), 0.0),
                    tl.where(counted, total_c, 0.0),
                    tl.where(counted, coefs0.alpha, 0.0), tl.where(counted, coefs0.beta, 0.0),
                    tl.where(counted, coefs1.alpha, 0.0), tl.where(counted, coefs1.beta, 0.0),
                    tl.where(counted, tl.where(bad, nan, coefs0.total_h + coefs1.total_h), 0.0))
    if REDUCTION == 0:
        tl.store(loss_ptr + rows, value, mask=row_ok)
    if GRAD_MODE == 2:  # GRAD_IN_BACKWARD: the Record (the divisor's row comes below)
        for j in tl.static_range(STATS):
            tl.store(saved_ptr + rows * STATS + j, record[j], mask=row_ok)
    if GRAD_MODE == 1:  # GRAD_IN_FORWARD: the gradient for an upstream gradient of 1
        scale = zero + 1.0
        if REDUCTION == 1:
            divisor = tl.load(divisor_ptr).to(ACC)
            scale = scale / tl.where(divisor == 0.0, 1.0, divisor)
        g = _gradient(record, label, z_y, scale, kf, prm, BASE0, BASE1, DENSE, OFFICIAL)
        if CHUNKED:
            for start in range(0, K, BLOCK_K):
                zc, cc = _tile(logits_ptr, target_ptr, weight_ptr, rows, row_ok, start, K, strides, label, prm, PROBS,
                               WEIGHTED, DENSE, ACC, BLOCK_K)
                _store_gradient(saved_ptr, rows, row_ok, start, K, zc, cc, label.y, g, kf, prm, BASE0, BASE1, DENSE,
                                OFFICIAL, BLOCK_K)
        else:
            _store_gradient(saved_ptr, rows, row_ok, 0, K, z, c, label.y, g, kf, prm, BASE0, BASE1, DENSE, OFFICIAL,
                            BLOCK_K)

    if REDUCTION != 0:
        _reduce(loss_ptr, saved_ptr, partials_ptr, counter_ptr, R, value, label.weight, REDUCTION, GRAD_MODE, ACC)
    elif GRAD_MODE == 2:
        if pid == 0:  # the gradient's divisor: 1 without a mean
            _store_divisor(saved_ptr, R, 1.0, ACC)


_REDUCE_BLOCK = tl.constexpr(1024)  # parts summed at a time by the last program


@triton.jit
def _store_divisor(stats_ptr, R, divisor, ACC: tl.constexpr):
    j = tl.arange(0, STATS)
    tl.store(stats_ptr + R * STATS + j, tl.where(j == 0, divisor, 0.0).to(ACC))


@triton.jit
def _reduce(loss_ptr, stats_ptr, partials_ptr, counter_ptr, R, value, weight, REDUCTION: tl.constexpr,
            GRAD_MODE: tl.constexpr, ACC: tl.constexpr):
    """The sum of every row's loss (and of their weights, the mean's divisor), deterministically,
    in the one launch: each program writes its part; the last to finish adds the parts up in
    program order, writes the loss (and the divisor after the Records) and resets the counter.

    Memory ordering. A program's part is stored (by whichever of its threads Triton picks), then
    bar.sync orders every thread's earlier accesses before what thread 0 does next, and thread 0's
    atomic increment is a release at GPU scope, which is cumulative: the part is visible at GPU
    scope (in L2) before the new count is. The program that takes the last ticket acquires at GPU
    scope, and Triton hands the ticket to its other threads through shared memory behind a
    bar.sync, so their loads of the parts come after the acquire. Those loads are .cg (cached in
    L2 only): an SM's L1 is not coherent, and a line of the parts buffer left there by an earlier
    launch must not be read. The counter is set back to 0 by the last program (the next launch on
    the stream starts after this one ends), so a persistent counter needs no clearing launch.
    The parts are summed in program order, each program's rows in a fixed tree: the same bits
    every run, whichever program finishes last."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    tl.store(partials_ptr + pid, tl.sum(value.to(tl.float64), 0))
    tl.store(partials_ptr + programs + pid, tl.sum(weight.to(tl.float64), 0))
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == programs - 1:
        total = tl.full([], 0.0, tl.float64)
        divisor = tl.full([], 0.0, tl.float64)
        for start in range(0, programs, _REDUCE_BLOCK):
            i = start + tl.arange(0, _REDUCE_BLOCK)
            mask = i < programs
            total += tl.sum(tl.load(partials_ptr + i, mask=mask, other=0.0, cache_modifier=".cg"), 0)
            divisor += tl.sum(tl.load(partials_ptr + programs + i, mask=mask, other=0.0, cache_modifier=".cg"), 0)
        if REDUCTION == 1:
            divisor = tl.where(divisor == 0.0, 1.0, divisor)  # every row ignored: the mean is 0
            total = total / divisor
        else:
            divisor = tl.full([], 1.0, tl.float64)
        tl.store(loss_ptr, total.to(ACC))
        if GRAD_MODE == 2:
            _store_divisor(stats_ptr, R, divisor, ACC)
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit(do_not_specialize=UNSPECIALIZED, do_not_specialize_on_alignment=UNALIGNED)
def _backward_kernel(
    logits_ptr, target_ptr, weight_ptr, stats_ptr, upstream_ptr, grad_ptr,
    R, K, stride_row, stride_col, stride_target_row, stride_target_col, stride_upstream, ignore_index: tl.int64,
    w0: tl.int64, w1: tl.int64, gamma: tl.int64, q: tl.int64, a: tl.int64, log_min_prob: tl.int64,
    clamp_min_powered: tl.int64, nnfl_b: tl.int64, agce_top: tl.int64, aul_bottom: tl.int64, keep: tl.int64,
    spread: tl.int64,
    BASE0: tl.constexpr, BASE1: tl.constexpr, OFFICIAL: tl.constexpr, PROBS: tl.constexpr, WEIGHTED: tl.constexpr,
    DENSE: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, CHUNKED: tl.constexpr,
):
    """The gradient of ROWS rows from their Records, times the upstream gradient over the divisor
    (the record after the last row): one read of the logits, one write of the gradient."""
    ACC: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    strides = (stride_row, stride_col, stride_target_row, stride_target_col)
    if not CHUNKED:
        z = _logits(logits_ptr, rows, row_ok, 0, K, stride_row, stride_col, ACC, BLOCK_K)  # issued first
    bits = (w0, w1, gamma, q, a, log_min_prob, clamp_min_powered, nnfl_b, agce_top, aul_bottom, keep, spread)
    prm = _params(bits, ACC)
    kf = K.to(ACC)
    label = _label(target_ptr, weight_ptr, rows, row_ok, K, stride_target_row, ignore_index, prm.keep, PROBS, WEIGHTED,
                   ACC)
    record = _load_record(stats_ptr, rows, row_ok)
    upstream = tl.load(upstream_ptr + rows * stride_upstream, mask=row_ok, other=0.0).to(ACC)
    scale = upstream / tl.load(stats_ptr + R * STATS)
    z_y = tl.full(scale.shape, 0.0, scale.dtype)
    if not DENSE:
        z_y = _label_logit(logits_ptr, rows, label, stride_row, stride_col, ACC)
    g = _gradient(record, label, z_y, scale, kf, prm, BASE0, BASE1, DENSE, OFFICIAL)
    for start in range(0, K, BLOCK_K):  # one tile unless the row is chunked
        if CHUNKED:
            z, c = _tile(logits_ptr, target_ptr, weight_ptr, rows, row_ok, start, K, strides, label, prm, PROBS,
                         WEIGHTED, DENSE, ACC, BLOCK_K)
        else:
            c = z
            if DENSE:
                c = _coefficients(target_ptr, weight_ptr, rows, row_ok, 0, K, stride_target_row, stride_target_col,
                                  label, prm.keep, prm.spread, PROBS, WEIGHTED, ACC, BLOCK_K)
        _store_gradient(grad_ptr, rows, row_ok, start, K, z, c, label.y, g, kf, prm, BASE0, BASE1, DENSE, OFFICIAL,
                        BLOCK_K)


# ---------------------------------------------------------------- the launch table

WARP = 32
MAX_WARPS = 32
# Per accumulation dtype (float32, float64): elements of the logits a thread holds (registers: a
# float64 takes two), rows of at most ON_CHIP classes (ON_CHIP_DENSE with coefficients held beside
# them) kept in registers from their one read to their last use, and the chunk that longer rows
# stream through (for dense rows, at most their limit). docs/kernels.md ("Triton", "Launch table")
# gives the reasoning and the sm_90 register counts they were chosen by.
PER_THREAD = {False: 16, True: 8}
ON_CHIP = {False: 8192, True: 2048}
ON_CHIP_DENSE = {False: 4096, True: 1024}
CHUNK = {False: 8192, True: 2048}


class Launch(NamedTuple):
    rows: int  # rows per program
    block: int  # classes per tile: the whole row, or a chunk (a power of two)
    warps: int
    chunked: bool  # the row streams through chunks of `block` classes


def launch_config(num_classes: int, dtype: torch.dtype, dense: bool = False, backward: bool = False) -> Launch:
    """Rows per program, tile, warps and path for rows of ``num_classes`` classes of ``dtype``.
    The backward reads each element once whatever the tile, so it streams every row longer than a
    chunk: holding a load's and a store's 64-bit address for each of 16 elements, a 32-warp
    program (64 registers a thread) would spill."""
    wide = dtype == torch.float64
    block = triton.next_power_of_2(num_classes)
    limit = (ON_CHIP_DENSE if dense else ON_CHIP)[wide]
    chunk = min(CHUNK[wide], limit)  # dense chunks hold their coefficients too: no larger than their limit
    chunked = block > (chunk if backward else limit)
    if chunked:
        block = chunk
    tile = WARP * PER_THREAD[wide] * 4  # small rows: four warps of them per program
    rows = max(1, tile // block)
    warps = min(MAX_WARPS, max(1, rows * block // (WARP * PER_THREAD[wide])))
    return Launch(rows, block, warps, chunked)


# ---------------------------------------------------------------- the ops' arguments

NONE, MEAN, SUM = (fused.REDUCTION_CODES[r] for r in ("none", "mean", "sum"))
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FOCAL_INDICES = frozenset(BASE_INDEX[name] for name in FOCAL)


class Call(NamedTuple):
    """A call of the ops, decoded from their lists and checked (apl_op.h's OpCall)."""
    bases: tuple
    weights: tuple
    gamma: float
    q: float
    a: float
    min_prob: float
    label_smoothing: float
    ignore_index: int
    reduction: int
    official_grad: bool
    grad_mode: int
    probabilities: bool  # (R, K) class probabilities, not (R,) labels
    dense: bool  # coefficients on every label: probabilities, or label smoothing


def _is_float(dtype: torch.dtype) -> bool:
    return dtype in _FLOAT_DTYPES


def decode_call(logits: Tensor, target: Tensor, weight: Optional[Tensor], bases, coefficients, options) -> Call:
    """The op's arguments checked with apl_op.h's decode_call's rules, errors and messages (so that
    both backends' ops raise the same exception for the same bad input), and the device."""
    if logits.dim() != 2:
        raise ValueError(f"apl: logits must be 2-D (rows, classes); got {logits.dim()} dims")
    if logits.shape[1] < 2:
        raise ValueError(f"apl: the number of classes must be >= 2; got {logits.shape[1]}")
    if not _is_float(logits.dtype):
        raise TypeError(f"apl: logits must be float16, bfloat16, float32 or float64; got {logits.dtype}")
    probabilities = target.dim() == 2
    if probabilities:
        if target.shape != logits.shape or not _is_float(target.dtype):
            raise ValueError(f"apl: probability targets must be floating with the logits' shape {list(logits.shape)}; "
                             f"got {target.dtype} of shape {list(target.shape)}")
    else:
        if target.dim() != 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(f"apl: target must be 1-D with one label per row of logits, or 2-D probabilities; got "
                             f"shape {list(target.shape)} for logits of shape {list(logits.shape)}")
        if target.dtype != torch.int64:
            raise TypeError(f"apl: labels must be int64; got {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"apl: logits are on {logits.device} but target is on {target.device}")
    if weight is not None:
        if weight.dim() != 1 or weight.shape[0] != logits.shape[1] or not _is_float(weight.dtype):
            raise ValueError(f"apl: weight must be 1-D floating with one weight per class ({logits.shape[1]}); got "
                             f"{weight.dtype} of shape {list(weight.shape)}")
        if weight.device != logits.device:
            raise ValueError(f"apl: weight is on {weight.device} but logits are on {logits.device}")
    terms = len(bases)
    if not 1 <= terms <= 2 or len(coefficients) != terms + len(PARAMETERS) + 1:
        raise ValueError(f"apl: a loss has 1 or 2 terms, and coefficients holds one weight per term, then gamma, q, a, "
                         f"min_prob and label_smoothing; got {terms} bases and {len(coefficients)} coefficients")
    if len(options) != 4:
        raise ValueError(f"apl: options must be [ignore_index, reduction, official_grad, grad_mode]; got "
                         f"{len(options)} values")
    for base, w in zip(bases, coefficients):
        if not 0 <= base < len(BASE_LOSSES):
            raise ValueError(f"apl: unknown base loss index {base}")
        if not math.isfinite(w):
            raise ValueError(f"apl: weights must be finite, got {w}")
    gamma, q, a, min_prob, label_smoothing = (float(x) for x in coefficients[terms:])
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"apl: gamma must be finite and >= 0, got {gamma}")
    if not (math.isfinite(q) and q >= 1e-30):
        raise ValueError(f"apl: q must be finite and >= 1e-30, got {q}")
    if not (math.isfinite(a) and a > 0):
        raise ValueError(f"apl: a must be finite and > 0, got {a}")
    if not 0 < min_prob < 1:
        raise ValueError(f"apl: min_prob must be in (0, 1), got {min_prob}")
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"apl: label_smoothing must be in [0, 1], got {label_smoothing}")
    if BASE_INDEX["aul"] in bases and a <= 1:
        raise ValueError(f"apl: aul needs a > 1, got {a}")
    ignore_index, reduction, official_grad, grad_mode = (int(x) for x in options)
    if reduction not in (NONE, MEAN, SUM):
        raise ValueError(f"apl: reduction code must be 0 (none), 1 (mean) or 2 (sum); got {reduction}")
    if official_grad not in (0, 1):
        raise ValueError(f"apl: official_grad (options[2]) must be 0 or 1; got {official_grad}")
    if grad_mode not in (fused.NO_GRAD, fused.GRAD_IN_FORWARD, fused.GRAD_IN_BACKWARD):
        raise ValueError(f"apl: the gradient mode (options[3]) must be 0, 1 or 2; got {grad_mode}")
    if logits.device.type != "cuda" and not (INTERPRETED and logits.device.type == "cpu"):
        raise ValueError(f"apl::triton_loss runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1 set "
                         f"before apl_kernels is imported); got a {logits.device.type} tensor")
    return Call(tuple(int(b) for b in bases), tuple(float(w) for w in coefficients[:terms]), gamma, q, a, min_prob,
                label_smoothing, ignore_index, reduction, bool(official_grad), grad_mode, probabilities,
                probabilities or label_smoothing != 0)


def _power_or_inf(x: float, y: float) -> float:
    try:
        return x**y
    except OverflowError:  # as std::pow: (a + 1)^q of a parameter no loss of this call uses
        return math.inf


def kernel_arguments(call: Call, num_classes: int) -> tuple[tuple, dict]:
    """The kernels' float arguments (FLOAT_ARGS, as bits: LossParams with what derive() computes)
    and the constexprs that choose their specialization."""
    log_min_prob = math.log(call.min_prob)
    values = (call.weights[0], call.weights[-1], call.gamma, call.q, call.a, log_min_prob, CLAMP_MIN**call.q,
              -((1 - call.min_prob) ** call.gamma) * log_min_prob, _power_or_inf(call.a + 1, call.q),
              _power_or_inf(call.a - 1, call.q) if call.a > 1 else 0.0, 1 - call.label_smoothing,
              call.label_smoothing / num_classes)
    meta = dict(BASE0=call.bases[0], BASE1=call.bases[1] if len(call.bases) == 2 else NO_TERM.value,
                OFFICIAL=call.official_grad and any(b in _FOCAL_INDICES for b in call.bases),
                PROBS=call.probabilities, DENSE=call.dense)
    return tuple(float_bits(v) for v in values), meta


def _launch_meta(launch: Launch) -> dict:
    return dict(ROWS=launch.rows, BLOCK_K=launch.block, CHUNKED=launch.chunked, num_warps=launch.warps)


# ---------------------------------------------------------------- launching


def _launch(kernel, grid: tuple, *args, **meta) -> None:
    """Every kernel launch of the ops (the tests count them here)."""
    torch.library.wrap_triton(kernel)[grid](*args, **meta)


def _on_device(tensor: Tensor):
    """Triton launches on the current device: make it the logits' (logits on cuda:1 while cuda:0
    is current). Traced calls launch nothing (a compiled graph guards its own devices)."""
    if tensor.device.type != "cuda" or fused._traced(tensor):
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


_COUNTERS: dict = {}


def _counter(logits: Tensor) -> Tensor:
    """The int32 ticket counter of the in-kernel reduction, 0 between launches: the last program of
    each launch sets it back. One per (device, stream), since kernels on two streams may run at
    once; created (zeroed) once. A traced call (torch.compile, fake tensors) or a CUDA graph's
    capture gets its own, zeroed in the graph, which must not capture a tensor of the eager world."""
    device = logits.device
    if fused._traced(logits) or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.zeros(1, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    counter = _COUNTERS.get((device, stream))
    if counter is None:
        counter = _COUNTERS[(device, stream)] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def _mean_divisor(target: Tensor, weight: Optional[Tensor], call: Call) -> Tensor:
    """GRAD_IN_FORWARD's mean divides the gradient it writes, so needs its divisor before the
    kernel: the summed weight of the counted rows, on the device (0 becomes 1 in the kernel)."""
    if call.probabilities:
        return torch.full((), float(target.shape[0]), dtype=torch.float64, device=target.device)
    kept = target != call.ignore_index
    if weight is None:
        return kept.sum(dtype=torch.float64)
    num_classes = weight.shape[0]
    in_range = (target >= 0) & (target < num_classes)
    w = torch.where(in_range, weight[target.clamp(0, num_classes - 1)].double(), 1.0)
    return torch.where(kept, w, 0.0).sum()


def _strides(logits: Tensor, target: Tensor, call: Call) -> tuple:
    return (logits.stride(0), logits.stride(1), target.stride(0), target.stride(1) if call.probabilities else 0)


# On GPUs the ops are triton_ops: torch.compile traces their bodies and sees the kernels. Under the
# interpreter a kernel cannot be traced (wrap_triton hands back the interpreted function, which would
# run on fake tensors): there they are opaque custom ops with fused.py's fakes, so that opcheck and
# aot_autograd still run them.
_define_op = torch.library.custom_op if INTERPRETED else torch.library.triton_op


@_define_op("apl::triton_loss", mutates_args=())
def triton_loss(logits: Tensor, target: Tensor, weight: Optional[Tensor], bases: list[int], coefficients: list[float],
                options: list[int]) -> tuple[Tensor, Tensor]:
    """The fused op of ``fused.py`` computed by one launch of the Triton forward kernel.

    Strided logits and targets are read in place (their strides go to the kernel); the loss is
    float32 (float64 for float64 logits)."""
    call = decode_call(logits, target, weight, bases, coefficients, options)
    rows, num_classes = logits.shape[0], int(logits.shape[1])  # the kernels specialize on K (a guard when traced)
    acc = accumulation_dtype(logits.dtype)
    loss = logits.new_empty((rows,) if call.reduction == NONE else (), dtype=acc)
    if call.grad_mode == fused.GRAD_IN_BACKWARD:
        saved = logits.new_empty((rows + 1, fused.STATS), dtype=acc)
    elif call.grad_mode == fused.GRAD_IN_FORWARD:
        saved = logits.new_empty((rows, num_classes))
    else:
        saved = logits.new_empty((0,))
    if rows == 0:  # nothing to launch: a reduced loss is 0, the divisor 1
        loss.zero_()
        if call.grad_mode == fused.GRAD_IN_BACKWARD:
            saved.copy_(torch.eye(1, fused.STATS, dtype=acc, device=logits.device))
        return loss, saved
    launch = launch_config(num_classes, logits.dtype, call.dense)
    programs = triton.cdiv(rows, launch.rows)
    floats, meta = kernel_arguments(call, num_classes)
    with _on_device(logits):
        partials = counter = divisor = None
        if call.reduction != NONE:
            partials = logits.new_empty((2 * programs,), dtype=torch.float64)
            counter = _counter(logits)
        if call.grad_mode == fused.GRAD_IN_FORWARD and call.reduction == MEAN:
            divisor = _mean_divisor(target, weight, call)
        _launch(_forward_kernel, (programs,), logits, target, weight, loss,
                saved if call.grad_mode != fused.NO_GRAD else None, partials, counter, divisor,
                rows, num_classes, *_strides(logits, target, call), call.ignore_index, *floats,
                **meta, WEIGHTED=weight is not None, REDUCTION=call.reduction, GRAD_MODE=call.grad_mode,
                **_launch_meta(launch))
    return loss, saved


@_define_op("apl::triton_loss_backward", mutates_args=())
def triton_loss_backward(logits: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor, grad_loss: Tensor,
                         bases: list[int], coefficients: list[float], options: list[int]) -> Tensor:
    """``fused.py``'s backward op: the gradient from the forward's Records (``stats``) times
    ``grad_loss`` (a scalar, or one value per row with any stride), in one launch."""
    call = decode_call(logits, target, weight, bases, coefficients, options)
    rows, num_classes = logits.shape[0], int(logits.shape[1])
    acc = accumulation_dtype(logits.dtype)
    if stats.shape != (rows + 1, fused.STATS) or stats.dtype != acc or not stats.is_contiguous():
        raise ValueError(f"apl: stats must be the forward's contiguous ({rows + 1}, {fused.STATS}) {acc} records; "
                         f"got {stats.dtype} of shape {list(stats.shape)}")
    if grad_loss.shape != ((rows,) if call.reduction == NONE else ()) or not _is_float(grad_loss.dtype):
        raise ValueError(f"apl: grad_loss must be floating with the loss's shape; got {grad_loss.dtype} of shape "
                         f"{list(grad_loss.shape)}")
    grad = logits.new_empty((rows, num_classes))
    if rows == 0:
        return grad
    launch = launch_config(num_classes, logits.dtype, call.dense, backward=True)
    floats, meta = kernel_arguments(call, num_classes)
    with _on_device(logits):
        _launch(_backward_kernel, (triton.cdiv(rows, launch.rows),), logits, target, weight, stats, grad_loss, grad,
                rows, num_classes, *_strides(logits, target, call), grad_loss.stride(0) if grad_loss.dim() else 0,
                call.ignore_index, *floats, **meta, WEIGHTED=weight is not None, **_launch_meta(launch))
    return grad


fused.register("apl::triton_loss", "apl::triton_loss_backward", fake=INTERPRETED)


def load():
    """The backend function of ``backend="triton"``, or BackendUnavailable saying why not."""
    if not INTERPRETED and not torch.cuda.is_available():
        raise BackendUnavailable(
            "no CUDA device (set TRITON_INTERPRET=1 before importing apl_kernels to run the "
            "Triton kernels on CPU tensors, slowly, as the tests do)"
        )
    return fused.backend_function(torch.ops.apl.triton_loss.default, fused.GRAD_IN_BACKWARD)
