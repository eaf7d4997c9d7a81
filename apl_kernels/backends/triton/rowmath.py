"""The row math of the Triton kernels: ``csrc/apl_rowmath.h`` in Triton (docs/kernels.md).

The catalogue's bases and families as constexprs, the per-row values as small structs, each base's
element ``V, V'`` (:func:`element`), and what a row makes of them: its terms' sums, its value and
gradient coefficients, and the gradient of an element. The interpreter runs every ``@triton.jit``
call through Python, so the helpers are few and work on whole tiles.
"""

import math
from typing import NamedTuple

import triton
import triton.language as tl

from ...catalogue import BASE_INDEX, BASES, FAMILIES
from ...reference import ANORM_CLAMP_MIN, CLAMP_MIN, RCE_A
from .. import contract

# ---------------------------------------------------------------- the catalogue as constexprs

# Every base loss of the catalogue as a constexpr named after it (CE, FL, ...: catalogue.BASE_INDEX,
# the enum of apl_catalogue.h), made from the catalogue: element refuses at compile time a base
# that it has no case for.
globals().update({base.name.upper(): tl.constexpr(BASE_INDEX[base.name]) for base in BASES})
NO_TERM = tl.constexpr(-1)  # BASE1 of a single loss

# The families of catalogue.FAMILIES (apl_rowmath.h's family_of): how a base's expectation over
# labels is formed.
LOCAL, REVERSE, NORMALIZED, NEGATIVE, SPLIT = (tl.constexpr(FAMILIES.index(f)) for f in
                                               ("local", "reverse", "normalized", "negative", "split"))
_FAMILIES = tuple(FAMILIES.index(base.family) for base in BASES)


@triton.constexpr_function
def family_of(base):
    return _FAMILIES[base]


@triton.constexpr_function
def needs_pass(base, dense):
    """apl_rowmath.h's term_needs_pass: whether a term's sums run over every element of the row
    (always for dense coefficients; for a one-hot target only where they are not the label's)."""
    return dense or (_FAMILIES[base] != LOCAL.value and base != NCE.value)


@triton.constexpr_function
def target_sign(base):
    """The sign of beta in a term's delta of the targets' gradient: -1 for reverse, else 1."""
    return -1.0 if _FAMILIES[base] == REVERSE.value else 1.0


_CLAMP_MIN = tl.constexpr(CLAMP_MIN)
_LOG_CLAMP_MIN = tl.constexpr(math.log(CLAMP_MIN))
_RCE_A = tl.constexpr(RCE_A)
_ANORM_CLAMP_MIN = tl.constexpr(ANORM_CLAMP_MIN)
_LOG_ANORM_CLAMP_MIN = tl.constexpr(math.log(ANORM_CLAMP_MIN))
_LN2 = tl.constexpr(math.log(2.0))
STATS = tl.constexpr(contract.STATS)

# ---------------------------------------------------------------- per-row values as small structs


class Params(NamedTuple):
    """The call's floats in the accumulation dtype (FLOAT_ARGS): the terms' weights, the loss's
    parameters with what LossParams::derive computes from them once per call (a - 1, ln m,
    B = -(1 - m)^g ln m, (a + 1)^q, (a - 1)^q), and the label smoothing's 1 - eps and eps / K."""
    w0: tl.tensor
    w1: tl.tensor
    gamma: tl.tensor
    q: tl.tensor
    a: tl.tensor
    log_min_prob: tl.tensor
    a_minus_one: tl.tensor
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
    target_g: tl.tensor


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
    target_g: tl.tensor  # the targets' gradient's G (times the scale)


# The kernels' float arguments (ops.kernel_arguments), as Params holds them.
FLOAT_ARGS = Params._fields

if Record._fields != contract.RECORD:
    raise ImportError("Record must hold contract.RECORD's values")

# ---------------------------------------------------------------- element math (apl_rowmath.h)


@triton.jit
def one_minus_exp(x):
    """1 - exp(x) = -expm1(x) for x <= ln 2 (Triton has no expm1).

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
def log1p(w):
    """ln(1 + w) for w > -1 (Triton has no log1p).

    ln(1 + w) = 2 atanh(s), s = w / (2 + w): for |w| < 1/4 (|s| < 1/7) the series
    2 s (1 + s^2/3 + s^4/5 + ...) in Horner form of s^2, whose first dropped term, relative
    s^(2n)/(2n+1) for n terms, is below half an ulp for n = 4 (float32) and n = 9 (float64).
    Elsewhere ln(1 + w), where 1 + w rounds by at most half an ulp of 1 + w and |ln(1 + w)| > 0.22:
    a few ulps."""
    if w.dtype == tl.float64:
        terms: tl.constexpr = 9
    else:
        terms: tl.constexpr = 4
    s = w / (2.0 + w)
    s2 = s * s
    one = tl.full(w.shape, 1.0, w.dtype)  # 1 / (2n + 1) in w's dtype (a Python float would be float32)
    r = one / (2 * terms - 1)
    for n in tl.static_range(terms - 2, -1, -1):
        r = one / (2 * n + 1) + s2 * r
    return tl.where(tl.abs(w) < 0.25, 2.0 * s * r, tl.log(1.0 + w))


@triton.jit
def one_minus_power(t, q):
    """(1 - exp(q t)) / q for q t <= ln 2 without cancellation (apl_rowmath.h's one_minus_power):
    -expm1(q t) / q, and -t where |q t| < 1e-30, where q t may have underflowed."""
    x = q * t
    return tl.where(tl.abs(x) < 1e-30, -t, one_minus_exp(x) / q)


@triton.jit
def focal(p, lp, u_max, gamma, OFFICIAL: tl.constexpr):
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
def aul(u, dp, prm):
    """aul's V = ((a - p)^q - (a - 1)^q) / q from u = 1 - p, and V' = -(a - p)^(q-1) dp (dp = dp/dlp):
    B expm1(x) / q, x = q log1p(u / d) <= ln 2, else ((a - p)^q - B) / q (apl_rowmath.h's aul_term)."""
    a_minus_p = prm.a_minus_one + u
    t = log1p(u / prm.a_minus_one)
    powered = tl.exp(prm.q * tl.log(a_minus_p))  # (a - p)^q
    small = prm.q * t <= _LN2
    value = tl.where(small, -prm.aul_bottom * one_minus_power(tl.where(small, t, 0.0), prm.q),
                     (powered - prm.aul_bottom) / prm.q)
    return value, -(powered / a_minus_p) * dp


@triton.jit
def element(BASE: tl.constexpr, p, lp, u_max, kf, prm, OFFICIAL: tl.constexpr):
    """V and V' = dV/dlp of base BASE at elements of probability p, log-probability lp (the table
    of apl_rowmath.h); u_max is 1 - p at the row's max (one expm1 per row), kf = K."""
    zero = tl.full(lp.shape, 0.0, lp.dtype)
    # Constants made in the element's dtype: a Python float meeting a float64 tensor is rounded to
    # float32 first (1e-7 would clamp at 1.0000000117e-7, A be off by 1e-8 relative).
    clamp_min = tl.full(lp.shape, _CLAMP_MIN, lp.dtype)
    clamped = p >= clamp_min  # mask[j]
    if BASE == CE:
        value = -lp
        derivative = zero - 1.0
    elif BASE == FL or BASE == NFL:
        value, derivative = focal(p, lp, u_max, prm.gamma, OFFICIAL)
    elif BASE == GCE or BASE == NGCE:
        # x = q ln p̂: V = (1 - p̂^q) / q = -expm1(x) / q, V' = -p̂^q mask (ngce's V is gce's).
        t = tl.where(clamped, lp, tl.full(lp.shape, _LOG_CLAMP_MIN, lp.dtype))
        value = one_minus_power(t, prm.q)
        derivative = tl.where(clamped, -tl.exp(prm.q * t), 0.0)
    elif BASE == MAE or BASE == NMAE:
        if BASE == MAE:
            norm = zero + 1.0
        else:
            norm = zero + 1.0 / (kf - 1.0)
        value = norm * tl.where(p > 0.5, u_max, 1.0 - p)
        derivative = -norm * p
    elif BASE == RCE or BASE == NRCE:
        if BASE == RCE:
            norm = tl.full(lp.shape, _RCE_A, lp.dtype)
        else:
            norm = zero + 1.0 / (kf - 1.0)
        value = norm * tl.maximum(p, clamp_min)
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
        f, d = focal(p, lp, u_max, prm.gamma, OFFICIAL)
        value = tl.where(active, prm.nnfl_b - f, 0.0)
        derivative = tl.where(active, -d, 0.0)
    elif BASE == AGCE:  # apl_rowmath.h's forms ("Numerical range"): T -expm1(q ln r) / q
        a_plus_one = prm.a + 1.0
        a_plus_p = prm.a + p
        w = tl.where(p > 0.5, u_max, 1.0 - p) / a_plus_one  # r = (a + p) / (a + 1) = 1 - w
        near = w <= 0.5
        log_ratio = tl.where(near, log1p(-tl.where(near, w, 0.0)), tl.log(a_plus_p / a_plus_one))
        value = prm.agce_top * one_minus_power(log_ratio, prm.q)
        derivative = -(prm.agce_top / a_plus_p) * p * tl.exp(prm.q * log_ratio)  # T / (a + p) first
    elif BASE == AUL:
        value, derivative = aul(tl.where(p > 0.5, u_max, 1.0 - p), p, prm)
    elif BASE == AEL:
        e = tl.exp(-p / prm.a)
        value = e
        derivative = -e * (p / prm.a)  # e p may underflow where e p / a does not
    elif BASE == ANORM:  # aul's V at p̂ = clamp(p, 1e-5, 1): 1 - p̂ and dp̂/dlp (W: off_label_element)
        floor = tl.full(lp.shape, _ANORM_CLAMP_MIN, lp.dtype)
        kept = p >= floor
        value, derivative = aul(tl.where(kept, tl.where(p > 0.5, u_max, 1.0 - p), 1.0 - floor),
                                tl.where(kept, p, 0.0), prm)
    else:
        tl.static_assert(False, "a base loss of catalogue.BASES has no V, V' in element")
    return value, derivative


@triton.jit
def off_label_element(BASE: tl.constexpr, p, lp, u_max, kf, prm, OFFICIAL: tl.constexpr):
    """W and W' of a split base, its element at the classes other than the label (apl_rowmath.h's
    off_label_element); any other base's V, V'."""
    if family_of(BASE) == SPLIT:
        if BASE == ANORM:  # W = p̂^q / q = exp(x) / q, x = q ln p̂ <= 0; W' = p̂^q mask
            kept = p >= tl.full(lp.shape, _ANORM_CLAMP_MIN, lp.dtype)
            e = tl.exp(prm.q * tl.where(kept, lp, tl.full(lp.shape, _LOG_ANORM_CLAMP_MIN, lp.dtype)))
            value = e / prm.q
            derivative = tl.where(kept, e, 0.0)
        else:
            tl.static_assert(False, "a split base loss of catalogue.BASES has no W, W' in off_label_element")
    else:
        value, derivative = element(BASE, p, lp, u_max, kf, prm, OFFICIAL)
    return value, derivative


@triton.jit
def target_element(BASE: tl.constexpr, p, lp, u_max, kf, prm, OFFICIAL: tl.constexpr):
    """T, a term's per-class part of the targets' gradient that its delta multiplies (apl_rowmath.h's
    target_element): V, and V - W for a split base."""
    value, _ = element(BASE, p, lp, u_max, kf, prm, OFFICIAL)
    if family_of(BASE) == SPLIT:
        off_value, _ = off_label_element(BASE, p, lp, u_max, kf, prm, OFFICIAL)
        value = value - off_value
    return value


@triton.jit
def zero_coefficient_term(value, c):
    """T as dL/dc[k] reads it (apl_rowmath.h's zero_coefficient_term): 0 at a class of coefficient 0
    where T is infinite (a masked class)."""
    return tl.where((c == 0.0) & (value - value != 0.0), 0.0, value)


@triton.jit
def term_element(BASE: tl.constexpr, DENSE: tl.constexpr, p, lp, valid, c, total_c, is_label, u_max, kf, prm,
                 OFFICIAL: tl.constexpr):
    """The element a term sums and differentiates: with dense coefficients, a split term's
    c V + (C - c) W (apl_rowmath.h's dense_element; its omega is 1); one-hot, a split term's V at the
    label and W elsewhere; any other term's V, V'."""
    if family_of(BASE) == SPLIT:
        at_value, at_derivative = element(BASE, p, lp, u_max, kf, prm, OFFICIAL)
        off_value, off_derivative = off_label_element(BASE, p, lp, u_max, kf, prm, OFFICIAL)
        if DENSE:
            rest = tl.where(valid, total_c[:, None] - c, 0.0)
            value = tl.where(c != 0.0, c * at_value, 0.0) + tl.where(rest != 0.0, rest * off_value, 0.0)
            derivative = c * at_derivative + rest * off_derivative
        else:
            value = tl.where(is_label, at_value, off_value)
            derivative = tl.where(is_label, at_derivative, off_derivative)
    else:
        value, derivative = element(BASE, p, lp, u_max, kf, prm, OFFICIAL)
    return value, derivative


# ---------------------------------------------------------------- rows: sums, coefficients, gradient


@triton.jit
def term_sums(BASE: tl.constexpr, DENSE: tl.constexpr, p, lp, valid, c, total_c, is_label, u_max, kf, prm,
              OFFICIAL: tl.constexpr, TARGET_GRAD: tl.constexpr = False):
    """A tile's part of a term's Sums over its elements (a term with needs_pass): with dense
    coefficients, omega = c (C - c for reverse, 1 for split); one-hot, the reverse and split terms'
    omega is C off the label (skipping it rather than subtracting p[y] ~ 1 later) and the other
    terms' label sums come from the label alone (label_sums, which a split term's adds to these);
    normalized and negative terms add sum V, sum V', and reverse terms sum V, split terms sum W for
    the targets' gradient (TARGET_GRAD: their S)."""
    value, derivative = term_element(BASE, DENSE, p, lp, valid, c, total_c, is_label, u_max, kf, prm, OFFICIAL)
    zero = tl.full(total_c.shape, 0.0, total_c.dtype)
    weighted = zero
    weighted_derivative = zero
    plain = zero
    plain_derivative = zero
    if DENSE:
        if family_of(BASE) == REVERSE:
            omega = tl.where(valid, total_c[:, None] - c, 0.0)
        elif family_of(BASE) == SPLIT:
            omega = tl.where(valid, 1.0, 0.0)
        else:
            omega = c
        # A label of coefficient 0 adds nothing, even where V is infinite (a masked class).
        weighted = tl.sum(tl.where(omega != 0.0, omega * value, 0.0), 1)
        weighted_derivative = tl.sum(omega * derivative, 1)
    elif family_of(BASE) == REVERSE or family_of(BASE) == SPLIT:
        off_label = valid & ~is_label
        weighted = total_c * tl.sum(tl.where(off_label, value, 0.0), 1)
        weighted_derivative = total_c * tl.sum(tl.where(off_label, derivative, 0.0), 1)
    if ((family_of(BASE) == NORMALIZED or family_of(BASE) == NEGATIVE) and BASE != NCE) or (
            TARGET_GRAD and family_of(BASE) == REVERSE):
        plain = tl.sum(tl.where(valid, value, 0.0), 1)
        plain_derivative = tl.sum(tl.where(valid, derivative, 0.0), 1)
    if TARGET_GRAD and family_of(BASE) == SPLIT:  # term_element's W again: the compiler computes it once
        off_value, _ = off_label_element(BASE, p, lp, u_max, kf, prm, OFFICIAL)
        plain = tl.sum(tl.where(valid, off_value, 0.0), 1)
    return Sums(weighted, weighted_derivative, plain, plain_derivative)


@triton.jit
def add_sums(a, b):
    return Sums(a.weighted + b.weighted, a.weighted_derivative + b.weighted_derivative, a.plain + b.plain,
                a.plain_derivative + b.plain_derivative)


@triton.jit
def label_sums(BASE: tl.constexpr, sums, p_y, lp_y, total_c, u_max, kf, prm, OFFICIAL: tl.constexpr):
    """One-hot rows: a non-reverse term's sums of omega = c, which is C at the label, 0 elsewhere
    (added to a split term's sums off the label; the others' are 0 there)."""
    if family_of(BASE) != REVERSE:
        value, derivative = element(BASE, p_y, lp_y, u_max, kf, prm, OFFICIAL)
        sums = Sums(sums.weighted + tl.where(total_c == 0.0, 0.0, total_c * value),
                    sums.weighted_derivative + total_c * derivative, sums.plain, sums.plain_derivative)
    return sums


@triton.jit
def coefs(BASE: tl.constexpr, w, sums, lp_sum, total_c, kf):
    """row_coefs of apl_rowmath.h for one term of weight w. nce's D = sum lp and sum V' = K come
    from the row's statistics. A masked class makes nce's and nfl's D infinite: value and gradient
    0, their limits."""
    zero = tl.full(total_c.shape, 0.0, total_c.dtype)
    if family_of(BASE) == LOCAL or family_of(BASE) == REVERSE or family_of(BASE) == SPLIT:
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
def target_constant(BASE: tl.constexpr, w, sums):
    """A term's part of the targets' gradient's G (apl_rowmath.h's target_coefs): w S for reverse
    (S = sum V, in `plain`) and split (S = sum W), w for negative, else 0. Its delta is beta (-beta
    for reverse), times target_element."""
    # (zeros_like, not 0 * sums.plain: a normalized term's D is infinite at a masked class.)
    if family_of(BASE) == REVERSE or family_of(BASE) == SPLIT:
        return w * sums.plain
    elif family_of(BASE) == NEGATIVE:
        return w + tl.zeros_like(sums.plain)
    else:
        return tl.zeros_like(sums.plain)


@triton.jit
def pass_term_gradient(BASE: tl.constexpr, DENSE: tl.constexpr, alpha, beta, p, lp, c, total_c, is_label, u_max,
                       kf, prm, OFFICIAL: tl.constexpr):
    """(alpha + beta omega[i]) V'[i] of a term with needs_pass (omega and V' as in term_sums)."""
    everywhere = is_label | ~is_label  # as `valid`: the gradient's store masks the padding
    _, derivative = term_element(BASE, DENSE, p, lp, everywhere, c, total_c, is_label, u_max, kf, prm, OFFICIAL)
    if DENSE:
        if family_of(BASE) == REVERSE:
            omega = total_c[:, None] - c
        elif family_of(BASE) == SPLIT:
            omega = tl.full(c.shape, 1.0, c.dtype)
        else:
            omega = c
    elif family_of(BASE) == REVERSE:
        omega = tl.where(is_label, 0.0, total_c[:, None])
    elif family_of(BASE) == SPLIT:
        omega = tl.full(derivative.shape, 0.0, derivative.dtype) + total_c[:, None]
    else:
        omega = tl.where(is_label, total_c[:, None], 0.0)
    return (alpha[:, None] + beta[:, None] * omega) * derivative


@triton.jit
def gradient(record, label, z_y, scale, kf, prm, BASE0: tl.constexpr, BASE1: tl.constexpr, DENSE: tl.constexpr,
             OFFICIAL: tl.constexpr):
    """The per-row Gradient from a Record times the row's scale (upstream gradient / divisor).
    One-hot terms without a pass act on the label only (their alpha is 0, but nce's, whose V' is 1:
    a constant), with V'[y] from the label's logit."""
    u_max = one_minus_exp(-record.log_s)
    zero = (record.alpha0 == 0.0) & (record.beta0 == 0.0) & (record.alpha1 == 0.0) & (record.beta1 == 0.0) & (
        record.total_h == 0.0)
    constant = tl.full(scale.shape, 0.0, scale.dtype)
    at_label = tl.full(scale.shape, 0.0, scale.dtype)
    if not DENSE:
        lp_y = (z_y - record.max_z) - record.log_s
        p_y = tl.exp(lp_y)
        if not needs_pass(BASE0, DENSE):
            _, derivative = element(BASE0, p_y, lp_y, u_max, kf, prm, OFFICIAL)
            constant += record.alpha0
            at_label += record.beta0 * record.total_c * derivative
        if BASE1 != NO_TERM:
            if not needs_pass(BASE1, DENSE):
                _, derivative = element(BASE1, p_y, lp_y, u_max, kf, prm, OFFICIAL)
                constant += record.alpha1
                at_label += record.beta1 * record.total_c * derivative
    return Gradient(record.max_z, record.log_s, u_max, record.total_c, record.alpha0 * scale, record.beta0 * scale,
                    record.alpha1 * scale, record.beta1 * scale, record.total_h * scale, constant * scale,
                    at_label * scale, zero, record.target_g * scale)
