"""Fused Triton kernels: ``backend="triton"``, the default for CUDA tensors.

One program computes one row of logits: its loss value and ``d loss / d logits``
for an upstream gradient of 1 (already divided by the number of non-ignored rows
for ``mean``), in at most three passes over the row:

1. the row's max ``m``, ``s = sum exp(z - m)`` and ``sum (z - m)``, online over
   chunks of ``BLOCK`` classes;
2. only for the losses that need them, the row sums of ``p`` (``rce``/``nrce``),
   of ``p̂^q`` (``ngce``) and of the focal term (``nfl``);
3. the one combined gradient of all terms of the loss, written once.

When the row fits one block (K <= 4096) it is loaded once and stays in registers
for all passes. The math is that of ``csrc/apl_rowmath.h`` (derivations there and
in ``../shared/spec/losses.md``); comments below say where it differs in form.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels
run on CPU tensors: that is how they are tested without a GPU.
"""

import math
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..catalogue import BASE_LOSSES, FOCAL
from ..reference import CLAMP_MIN, RCE_A
from . import BackendUnavailable, fused

# Base losses in the order of catalogue.BASE_LOSSES: the constexpr enum of the kernels.
CE, FL, GCE, MAE, RCE, NCE, NFL, NGCE, NMAE, NRCE = range(10)
if BASE_LOSSES != ("ce", "fl", "gce", "mae", "rce", "nce", "nfl", "ngce", "nmae", "nrce"):
    raise ImportError("catalogue.BASE_LOSSES changed: update the enum of apl_kernels.triton_backend")
NO_BASE = -1

# Row sums beyond m, s and sum(z - m), by the bases that need them (as in apl_rowmath.h).
NEED_OFF_LABEL, NEED_POWERED, NEED_FOCAL = 1, 2, 4
BASE_NEEDS = {RCE: NEED_OFF_LABEL, NRCE: NEED_OFF_LABEL, NGCE: NEED_POWERED, NFL: NEED_FOCAL}

_CLAMP_MIN = tl.constexpr(CLAMP_MIN)
_LOG_CLAMP_MIN = tl.constexpr(math.log(CLAMP_MIN))
_RCE_A = tl.constexpr(RCE_A)
_TINY = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32
_LN2 = tl.constexpr(0.6931471805599453)

MAX_BLOCK = 4096

INTERPRETED = bool(triton.knobs.runtime.interpret)  # what @triton.jit saw below


def launch_config(num_classes: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``num_classes`` classes.

    The kernel is memory bound: each element is read once (twice or three times
    from cache when the row is chunked) and needs a few dozen flops. What matters
    is bytes in flight, so every thread gets 8 consecutive elements (one or two
    16-byte loads) and the warps grow with the block; 4096 classes (16 warps) keep
    a whole row in registers without spilling, and larger rows stream in chunks of
    that size. A fixed table instead of ``triton.autotune``: no benchmarking on the
    first call of every new K, the same kernel every run, nothing to go stale when
    the batch shape changes.
    """
    block = min(max(16, triton.next_power_of_2(num_classes)), MAX_BLOCK)
    return block, min(16, max(1, block // 256))


# ---------------------------------------------------------------- element math
# (Few, larger helpers: the interpreter re-patches triton.language on every call of a
# @triton.jit function, so each call costs milliseconds in the CPU tests.)


@triton.jit
def _one_minus_exp(lp):
    """1 - exp(lp) = -expm1(lp) for lp <= 0 (Triton has no expm1).

    Near lp = 0, 1 - exp(lp) cancels: there (|lp| < ln 2) the Taylor series of
    expm1 in Horner form, x (1 + x/2 (1 + x/3 (...))), whose first dropped term
    |lp|^(n+1)/(n+1)! is below half an ulp of |lp| for n = 9 (float32) and n = 16
    (float64). Below -ln 2, p < 1/2 and 1 - p has no cancellation.
    """
    if lp.dtype == tl.float64:
        terms: tl.constexpr = 16
    else:
        terms: tl.constexpr = 9
    r = 1.0 + lp * (1.0 / terms)
    for n in tl.static_range(terms - 1, 1, -1):
        r = 1.0 + (lp * (1.0 / n)) * r
    return tl.where(lp > -_LN2, -lp * r, 1.0 - tl.exp(lp))


@triton.jit
def _focal(u, lp, p, gamma, OFFICIAL: tl.constexpr):
    """f = -u^gamma lp and d = df/dlp = -u^gamma + gamma u^(gamma-1) p lp (u = 1 - p, du/dlp = -p).

    u^gamma = exp2(gamma log2 u) for u > 0; at u = 0 (p == 1 in floating point) it is
    0, or 1 for gamma = 0. official_grad holds u^gamma constant: d = -u^gamma. The
    second term of d is 0 (its limit) where u = 0 (u^(gamma-1) is infinite there but
    lp ~ -u) and where p = 0 (a masked class, lp = -inf); elsewhere
    u^(gamma-1) = u^gamma / u.
    """
    u_gamma = tl.exp2(gamma * tl.log2(tl.maximum(u, _TINY)))
    u_gamma = tl.where(u > 0, u_gamma, tl.where(gamma == 0, 1.0, 0.0))
    d = -u_gamma
    if not OFFICIAL:
        d += tl.where((u > 0) & (p > 0), gamma * (u_gamma / u) * p * lp, 0.0)
    return -u_gamma * lp, d


# ---------------------------------------------------------------- chunks of a row


@triton.jit
def _load_chunk(row_ptr, start, K, stride_col, read, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Classes [start, start + BLOCK) of a row in ACC; -inf past K (they add 0 to every sum).

    Rows that are not read (ignored, or label out of range) see zeros, so that
    their math stays finite until it is replaced.
    """
    idx = start + tl.arange(0, BLOCK)
    inside = idx < K
    z = tl.load(row_ptr + idx.to(tl.int64) * stride_col, mask=inside & read, other=0.0).to(ACC)
    return tl.where(inside, z, float("-inf")), idx, inside


@triton.jit
def _chunk_sums(z, idx, inside, y, m, log_s, clamp, clamp_q, gamma, q, NEEDS: tl.constexpr, OFFICIAL: tl.constexpr):
    """A chunk's part of the row sums NEEDS asks for (zeros for the others), with
    p̂ = max(p, 1e-7), mask = [p >= 1e-7], P = p̂^q = exp(q lp) where mask, else
    clamp_q = 1e-7^q (from lp: no rounding of p, no log), and f, d of _focal.

    The off-label sums skip the label's element instead of subtracting it later:
    p[y] ~ 1 next to a small off-label sum would cancel in float32.
    """
    lp = (z - m) - log_s
    p = tl.exp(lp)
    zero = tl.full((), 0.0, z.dtype)
    off_clamped = zero
    off_masked = zero
    powered = zero
    powered_masked = zero
    focal = zero
    focal_derivative = zero
    if NEEDS & 1:  # NEED_OFF_LABEL: sum_{j != y} p̂[j], sum_{j != y} p[j] mask[j]
        off = inside & (idx != y)
        off_clamped = tl.sum(tl.where(off, tl.maximum(p, clamp), 0.0), 0)
        off_masked = tl.sum(tl.where(off & (p >= clamp), p, 0.0), 0)
    if NEEDS & 2:  # NEED_POWERED: T = sum P[j], sum P[j] mask[j]
        pw = tl.where(p >= clamp, tl.exp(q * lp), 0.0)
        powered_masked = tl.sum(pw, 0)
        powered = powered_masked + tl.sum(tl.where(inside & (p < clamp), clamp_q, 0.0), 0)
    if NEEDS & 4:  # NEED_FOCAL: F = sum f[j], D = sum d[j]
        f, d = _focal(_one_minus_exp(lp), lp, p, gamma, OFFICIAL)
        focal = tl.sum(tl.where(inside, f, 0.0), 0)
        focal_derivative = tl.sum(tl.where(inside, d, 0.0), 0)
    return off_clamped, off_masked, powered, powered_masked, focal, focal_derivative


@triton.jit
def _store_grad_chunk(
    grad_row_ptr, z, idx, inside, y, m, log_s, clamp, gamma, q,
    c_label, c_constant, c_clamped, c_powered, c_focal, c_total,
    NEEDS: tl.constexpr, OFFICIAL: tl.constexpr,
):
    """dL/dz[i] = h[i] - p[i] H with h[i] = c_label [i == y] + c_constant
    + c_clamped p[i] mask[i] [i != y] + c_powered P[i] mask[i] + c_focal d[i] and H = c_total.

    (c_clamped skips the label rather than being cancelled there by c_label: with p[y] ~ 1,
    A p[y] - A p[y] would leave float32 rounding of A in a gradient of size A p[y] p[j].)
    """
    lp = (z - m) - log_s
    p = tl.exp(lp)
    g = c_constant - p * c_total
    if NEEDS & 1:
        g += tl.where((p >= clamp) & (idx != y), c_clamped * p, 0.0)
    if NEEDS & 2:
        g += tl.where(p >= clamp, c_powered * tl.exp(q * lp), 0.0)
    if NEEDS & 4:
        _, d = _focal(_one_minus_exp(lp), lp, p, gamma, OFFICIAL)
        g += c_focal * d
    g += tl.where(idx == y, c_label, 0.0)
    tl.store(grad_row_ptr + idx, g.to(grad_row_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------- per-row coefficients


@triton.jit
def _term(
    BASE: tl.constexpr, w, kf, q, lp_y, p_y, u_y, mask_y, powered_y, f_y, d_y,
    lp_sum, off_clamped, off_masked, powered, powered_masked, focal, focal_derivative,
):
    """Value and gradient coefficients of w * BASE for one row (see _store_grad_chunk).

    With h[j] = dL/dlp[j] (derivations in csrc/apl_rowmath.h), P = p̂^q, f and d of _focal:
      ce   h[y] = -1
      fl   h[y] = d[y]
      gce  h[y] = -P[y] mask[y]
      mae  h[y] = -p[y]                                  (nmae: / (K-1))
      rce  h[j] = A p[j] mask[j] for j != y              (nrce: 1/(K-1) for A)
      nce  h[j] = [j == y]/S - lp[y]/S^2,  S = sum lp
      nfl  h[j] = [j == y] d[y]/F - f[y] d[j]/F^2,  F = sum f
      ngce h[j] = -[j == y] q P[y] mask[y]/(K-T) + (1 - P[y]) q P[j] mask[j]/(K-T)^2,  T = sum P
    and H = sum_j h[j] from the row sums. A masked class (z = -inf) makes S and F
    infinite: nce and nfl then give value 0 and gradient 0, their limits.
    """
    zero = w * 0.0
    value = zero
    label = zero
    constant = zero
    clamped = zero
    pw = zero
    foc = zero
    total = zero
    if BASE == 0:  # ce
        value = -lp_y
        label = zero - 1.0
        total = label
    elif BASE == 1:  # fl
        value = f_y
        label = d_y
        total = label
    elif BASE == 2:  # gce
        value = (1.0 - powered_y) / q
        label = tl.where(mask_y, -powered_y, 0.0)
        total = label
    elif BASE == 3 or BASE == 8:  # mae, nmae
        if BASE == 3:
            norm = zero + 1.0
        else:
            norm = 1.0 / (kf - 1.0)
        value = norm * u_y
        label = -norm * p_y
        total = label
    elif BASE == 4 or BASE == 9:  # rce, nrce
        if BASE == 4:
            a = zero + _RCE_A
        else:
            a = 1.0 / (kf - 1.0)
        value = a * off_clamped
        clamped = a
        total = a * off_masked
    elif BASE == 5:  # nce
        inv = 1.0 / lp_sum
        constant = -lp_y * inv * inv
        value = lp_y * inv
        label = inv
        total = inv + kf * constant
    elif BASE == 6:  # nfl
        inv = 1.0 / focal
        foc = -f_y * inv * inv
        value = f_y * inv
        label = d_y * inv
        total = label + foc * focal_derivative
    elif BASE == 7:  # ngce
        inv = 1.0 / (kf - powered)
        label = tl.where(mask_y, -q * powered_y * inv, 0.0)
        pw = (1.0 - powered_y) * q * inv * inv
        value = (1.0 - powered_y) * inv
        total = label + pw * powered_masked
    return w * value, w * label, w * constant, w * clamped, w * pw, w * foc, w * total


# ---------------------------------------------------------------- the kernel


@triton.jit(do_not_specialize=["w0_bits", "w1_bits", "gamma_bits", "q_bits"])
def _apl_loss_kernel(
    logits_ptr, target_ptr, count_ptr, loss_ptr, grad_ptr,
    K, stride_row, stride_col, stride_target, ignore_index,
    w0_bits, w1_bits, gamma_bits, q_bits,
    BASE0: tl.constexpr, BASE1: tl.constexpr, NEEDS: tl.constexpr, OFFICIAL: tl.constexpr,
    MEAN: tl.constexpr, COMPUTE_GRAD: tl.constexpr, F64: tl.constexpr,
    BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row  # int64 offsets: R * stride may pass 2^31
    y = tl.load(target_ptr + row * stride_target)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < K)
    read = valid & in_range
    y = tl.where(in_range, y, 0)  # never read outside the row
    # Float parameters come as the int64 bits of a float64: Triton passes Python floats
    # as float32, which would round gamma, q and the weights of float64 inputs.
    w0 = w0_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    w1 = w1_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    gamma = gamma_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    q = q_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    clamp = tl.full((), _CLAMP_MIN, ACC)  # exact in float64 too
    clamp_q = tl.exp(q * tl.full((), _LOG_CLAMP_MIN, ACC))  # (1e-7)^q
    kf = K.to(ACC)

    # Pass 1: m = max z, s = sum exp(z - m), sum_zm = sum (z - m). While m is -inf (all
    # classes so far masked) the sums are taken relative to 0 instead: no -inf - -inf.
    if ONE_CHUNK:
        z, idx, inside = _load_chunk(row_ptr, 0, K, stride_col, read, ACC, BLOCK)
        m = tl.max(z, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(tl.exp(z - m), 0)
        sum_zm = tl.sum(tl.where(inside, z - m, 0.0), 0)
    else:
        m = tl.full((), float("-inf"), ACC)
        s = tl.full((), 0.0, ACC)
        sum_zm = tl.full((), 0.0, ACC)
        for start in range(0, K, BLOCK):
            z, idx, inside = _load_chunk(row_ptr, start, K, stride_col, read, ACC, BLOCK)
            m_new = tl.maximum(m, tl.max(z, 0))
            ref_old = tl.where(m == float("-inf"), 0.0, m)
            ref_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            # Move s and sum_zm of the `start` classes so far to the new reference.
            s = s * tl.exp(m - ref_new) + tl.sum(tl.exp(z - ref_new), 0)
            sum_zm += start * (ref_old - ref_new) + tl.sum(tl.where(inside, z - ref_new, 0.0), 0)
            m = m_new
        m = tl.where(m == float("-inf"), 0.0, m)
    # lp = (z - m) - log s as torch's log_softmax: forming lse = m + log s first would round
    # lp to ulp(m), and S = sum lp = sum_zm - K log s needs no sum of z (which cancels for large m).
    log_s = tl.log(s)
    lp_sum = sum_zm - kf * log_s
    # NaN/inf logits make s NaN, a row of -inf makes log s = -inf: the loss is undefined.
    finite = tl.abs(m + log_s) < float("inf")
    nan_row = valid & ~(in_range & finite)

    off_clamped = tl.full((), 0.0, ACC)
    off_masked = tl.full((), 0.0, ACC)
    powered = tl.full((), 0.0, ACC)
    powered_masked = tl.full((), 0.0, ACC)
    focal = tl.full((), 0.0, ACC)
    focal_derivative = tl.full((), 0.0, ACC)
    if NEEDS != 0:  # Pass 2
        if ONE_CHUNK:
            off_clamped, off_masked, powered, powered_masked, focal, focal_derivative = _chunk_sums(
                z, idx, inside, y, m, log_s, clamp, clamp_q, gamma, q, NEEDS, OFFICIAL)
        else:
            for start in range(0, K, BLOCK):
                zc, idc, insc = _load_chunk(row_ptr, start, K, stride_col, read, ACC, BLOCK)
                a, b, c, d, e, f = _chunk_sums(zc, idc, insc, y, m, log_s, clamp, clamp_q, gamma, q, NEEDS, OFFICIAL)
                off_clamped += a
                off_masked += b
                powered += c
                powered_masked += d
                focal += e
                focal_derivative += f

    # The label's terms, from the same lp the sums used.
    z_y = tl.load(row_ptr + y * stride_col, mask=read, other=0.0).to(ACC)
    lp_y = (z_y - m) - log_s
    p_y = tl.exp(lp_y)
    u_y = _one_minus_exp(lp_y)
    mask_y = p_y >= clamp
    powered_y = tl.where(mask_y, tl.exp(q * lp_y), clamp_q)
    f_y = tl.full((), 0.0, ACC)
    d_y = tl.full((), 0.0, ACC)
    if BASE0 == 1 or BASE0 == 6 or BASE1 == 1 or BASE1 == 6:  # fl, nfl
        f_y, d_y = _focal(u_y, lp_y, p_y, gamma, OFFICIAL)
    value, c_label, c_constant, c_clamped, c_powered, c_focal, c_total = _term(
        BASE0, w0, kf, q, lp_y, p_y, u_y, mask_y, powered_y, f_y, d_y,
        lp_sum, off_clamped, off_masked, powered, powered_masked, focal, focal_derivative)
    if BASE1 >= 0:
        v2, l2, k2, c2, p2, f2, t2 = _term(
            BASE1, w1, kf, q, lp_y, p_y, u_y, mask_y, powered_y, f_y, d_y,
            lp_sum, off_clamped, off_masked, powered, powered_masked, focal, focal_derivative)
        value += v2
        c_label += l2
        c_constant += k2
        c_clamped += c2
        c_powered += p2
        c_focal += f2
        c_total += t2
    value = tl.where(read, value, 0.0)
    tl.store(loss_ptr + row, tl.where(nan_row, float("nan"), value))

    if COMPUTE_GRAD:  # Pass 3
        # Fold the mean's 1/count, the ignored rows' 0 and the undefined rows' NaN into
        # the row's coefficients (a NaN c_total reaches every element through p * c_total).
        scale = tl.where(read, 1.0, 0.0).to(ACC)
        if MEAN:
            scale = scale / tl.maximum(tl.load(count_ptr), 1).to(ACC)
        c_label *= scale
        c_constant *= scale
        c_clamped *= scale
        c_powered *= scale
        c_focal *= scale
        c_total = tl.where(nan_row, float("nan"), c_total * scale)
        grad_row_ptr = grad_ptr + row * K
        if ONE_CHUNK:
            _store_grad_chunk(grad_row_ptr, z, idx, inside, y, m, log_s, clamp, gamma, q,
                              c_label, c_constant, c_clamped, c_powered, c_focal, c_total, NEEDS, OFFICIAL)
        else:
            for start in range(0, K, BLOCK):
                zc, idc, insc = _load_chunk(row_ptr, start, K, stride_col, read, ACC, BLOCK)
                _store_grad_chunk(grad_row_ptr, zc, idc, insc, y, m, log_s, clamp, gamma, q,
                                  c_label, c_constant, c_clamped, c_powered, c_focal, c_total, NEEDS, OFFICIAL)


# ---------------------------------------------------------------- the op

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _check_tensors(logits: Tensor, target: Tensor) -> None:
    """Metadata checks for direct calls of the op (no data is read: no host synchronization)."""
    if logits.dim() != 2:
        raise ValueError(f"apl::triton_loss: logits must have shape (R, K), got {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"apl::triton_loss: logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.shape[1] < 2:
        raise ValueError(f"apl::triton_loss: the number of classes must be >= 2, got {logits.shape[1]}")
    if target.dtype != torch.int64 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"apl::triton_loss: target must be int64 of shape ({logits.shape[0]},), "
            f"got {target.dtype} of shape {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"apl::triton_loss: logits are on {logits.device} but target is on {target.device}")
    if logits.device.type != "cuda" and not (INTERPRETED and logits.device.type == "cpu"):
        raise ValueError(
            f"apl::triton_loss runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1 set before "
            f"apl_kernels.triton_backend is imported); got a {logits.device.type} tensor"
        )


def decode_call(bases: list[int], coefficients: list[float], options: list[int]) -> dict:
    """The op's three lists (apl_kernels.fused) as named values, checked."""
    if not 1 <= len(bases) <= 2 or len(coefficients) != len(bases) + 2:
        raise ValueError(
            f"apl::triton_loss: expected 1 or 2 bases, and coefficients holding one weight per base, then gamma "
            f"and q; got {bases} and {coefficients}"
        )
    if any(not 0 <= b < len(BASE_LOSSES) for b in bases):
        raise ValueError(f"apl::triton_loss: base indices must be in [0, {len(BASE_LOSSES)}), got {bases}")
    if len(options) != 4:
        raise ValueError(
            f"apl::triton_loss: options must be [ignore_index, reduction, official_grad, compute_grad], got {options}"
        )
    call = dict(
        bases=list(bases), weights=list(coefficients[: len(bases)]), gamma=coefficients[-2], q=coefficients[-1],
        ignore_index=options[fused.IGNORE_INDEX], reduction=options[fused.REDUCTION],
        official_grad=bool(options[fused.OFFICIAL_GRAD]), compute_grad=bool(options[fused.COMPUTE_GRAD]),
    )
    if call["reduction"] not in (0, 1, 2):
        raise ValueError(
            f"apl::triton_loss: reduction code must be 0 (none), 1 (mean) or 2 (sum), got {call['reduction']}"
        )
    if not all(math.isfinite(w) for w in call["weights"]):
        raise ValueError(f"apl::triton_loss: weights must be finite, got {call['weights']}")
    if not (math.isfinite(call["gamma"]) and call["gamma"] >= 0 and math.isfinite(call["q"]) and call["q"] > 0):
        raise ValueError(
            f"apl::triton_loss: need finite gamma >= 0 and q > 0, got gamma={call['gamma']}, q={call['q']}"
        )
    if any(options[i] not in (0, 1) for i in (fused.OFFICIAL_GRAD, fused.COMPUTE_GRAD)):
        raise ValueError(f"apl::triton_loss: official_grad and compute_grad must be 0 or 1, got {options}")
    return call


def launch_arguments(logits: Tensor, target: Tensor, call: dict, row_loss: Tensor, grad: Tensor,
                     count: Tensor | None) -> tuple[tuple, dict]:
    """The kernel's positional arguments and its constexprs (with num_warps) for one decoded call."""
    num_classes = int(logits.shape[1])  # the kernel specializes on K (a guard when traced)
    bases, weights = call["bases"], call["weights"]
    needs = 0
    for b in bases:
        needs |= BASE_NEEDS.get(b, 0)
    block, num_warps = launch_config(num_classes)
    args = (
        logits, target, target if count is None else count, row_loss, grad,
        num_classes, logits.stride(0), logits.stride(1), target.stride(0), call["ignore_index"],
        _float_bits(weights[0]), _float_bits(weights[-1]), _float_bits(call["gamma"]), _float_bits(call["q"]),
    )
    meta = dict(
        BASE0=bases[0], BASE1=bases[1] if len(bases) == 2 else NO_BASE, NEEDS=needs,
        OFFICIAL=call["official_grad"] and any(BASE_LOSSES[b] in FOCAL for b in bases),
        MEAN=call["reduction"] == fused.REDUCTION_CODES["mean"], COMPUTE_GRAD=call["compute_grad"],
        F64=logits.dtype == torch.float64, BLOCK=block, ONE_CHUNK=num_classes <= block, num_warps=num_warps,
    )
    return args, meta


@torch.library.triton_op("apl::triton_loss", mutates_args=())
def triton_loss(
    logits: Tensor, target: Tensor, bases: list[int], coefficients: list[float], options: list[int],
) -> tuple[Tensor, Tensor]:
    """The fused op of ``apl_kernels.fused`` (its contract there) computed by Triton kernels.

    Strided logits are read in place (row and class strides go to the kernel); the loss
    is float32 (float64 for float64 logits) and the gradient has the logits' dtype.
    """
    _check_tensors(logits, target)
    call = decode_call(bases, coefficients, options)
    rows, num_classes = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    row_loss = torch.empty(rows, dtype=acc, device=logits.device)
    grad = torch.empty((rows, num_classes) if call["compute_grad"] else (0,), dtype=logits.dtype,
                       device=logits.device)
    mean = call["reduction"] == fused.REDUCTION_CODES["mean"]
    count = (target != call["ignore_index"]).sum() if mean else None  # stays on the device: no sync
    args, meta = launch_arguments(logits, target, call, row_loss, grad, count)
    if rows > 0:
        torch.library.wrap_triton(_apl_loss_kernel)[(rows,)](*args, **meta)
    if call["reduction"] == fused.REDUCTION_CODES["none"]:
        return row_loss, grad
    total = row_loss.sum()
    if mean:
        total = total / count.clamp_min(1)  # an all-ignored batch: 0 / 1 = 0, not NaN
    return total, grad


fused.register("apl::triton_loss", fake=False)


def load():
    """The backend function of ``backend="triton"``, or BackendUnavailable saying why not."""
    if not INTERPRETED and not torch.cuda.is_available():
        raise BackendUnavailable(
            "no CUDA device (set TRITON_INTERPRET=1 before importing apl_kernels to run the "
            "Triton kernels on CPU tensors, slowly, as the tests do)"
        )
    return fused.backend_function(torch.ops.apl.triton_loss.default)
