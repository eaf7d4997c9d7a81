"""What the Triton kernels read and write, a tile at a time (ROWS rows by BLOCK_K classes): the
call's floats, logits, labels, coefficients and records, and the gradient."""

import triton
import triton.language as tl

from .rowmath import (
    FLOAT_ARGS, NO_TERM, STATS, Label, Params, Record, needs_pass, pass_term_gradient, target_element, target_sign,
    zero_coefficient_term,
)

# Never specialized on their values (floats travel as int64 bits, see ops.float_bits; ignore_index
# is typed int64 by annotation too). Nor on the strides and alignment of what the sums run over:
# Triton would vectorize a contiguous, aligned row's loads (4 elements a thread, against 1 for a
# strided row), which changes the tile's layout and so the order of its sums; one binary for every
# layout keeps strided and contiguous copies of the same logits bit-identical (their loads are
# still coalesced).
UNSPECIALIZED = FLOAT_ARGS + ("ignore_index", "stride_row", "stride_col", "stride_target_row", "stride_target_col")
UNALIGNED = ("logits_ptr", "target_ptr", "weight_ptr")

# ---------------------------------------------------------------- loads


@triton.jit
def load_params(bits, ACC: tl.constexpr):
    """Params from FLOAT_ARGS's float64 bits (made int64 first: the interpreter passes small ones as
    int32)."""
    values = ()
    for i in tl.static_range(len(bits)):
        values = values + (bits[i].to(tl.int64).to(tl.float64, bitcast=True).to(ACC),)
    return Params(*values)


@triton.jit
def load_logits(logits_ptr, rows, row_ok, start, K, stride_row, stride_col, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """Classes [start, start + BLOCK_K) of the rows, in ACC; -inf outside the rows (it adds 0 to
    every sum). Not masked by anything the labels say: the row's load never waits for theirs."""
    cols = start + tl.arange(0, BLOCK_K)
    offsets = rows[:, None] * stride_row + cols[None, :].to(tl.int64) * stride_col  # int64: R K may pass 2^31
    mask = row_ok[:, None] & (cols < K)[None, :]
    return tl.load(logits_ptr + offsets, mask=mask, other=float("-inf")).to(ACC)


@triton.jit
def load_label(target_ptr, weight_ptr, rows, row_ok, K, stride_target, ignore_index, keep, PROBS: tl.constexpr,
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
def load_coefficients(target_ptr, weight_ptr, rows, row_ok, start, K, stride_row, stride_col, label, keep, spread,
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
def load_tile(logits_ptr, target_ptr, weight_ptr, rows, row_ok, start, K, strides, label, prm, PROBS: tl.constexpr,
              WEIGHTED: tl.constexpr, DENSE: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """A tile's logits and, for dense rows, coefficients (one-hot rows get z back as c, unused)."""
    z = load_logits(logits_ptr, rows, row_ok, start, K, strides[0], strides[1], ACC, BLOCK_K)
    c = z
    if DENSE:
        c = load_coefficients(target_ptr, weight_ptr, rows, row_ok, start, K, strides[2], strides[3], label, prm.keep,
                              prm.spread, PROBS, WEIGHTED, ACC, BLOCK_K)
    return z, c


@triton.jit
def load_record(stats_ptr, rows, row_ok):
    """The rows' Records, a field at a time: (the columns of a (ROWS, STATS) tile would come out of
    its reduction in another layout, and be converted at full tile width where they are broadcast)."""
    at = stats_ptr + rows * STATS
    return Record(tl.load(at, mask=row_ok, other=0.0), tl.load(at + 1, mask=row_ok, other=0.0),
                  tl.load(at + 2, mask=row_ok, other=0.0), tl.load(at + 3, mask=row_ok, other=0.0),
                  tl.load(at + 4, mask=row_ok, other=0.0), tl.load(at + 5, mask=row_ok, other=0.0),
                  tl.load(at + 6, mask=row_ok, other=0.0), tl.load(at + 7, mask=row_ok, other=0.0),
                  tl.load(at + 8, mask=row_ok, other=0.0))


@triton.jit
def load_label_logit(logits_ptr, rows, label, stride_row, stride_col, ACC: tl.constexpr):
    y = tl.where(label.in_range, label.y, 0)
    return tl.load(logits_ptr + rows * stride_row + y * stride_col, mask=label.kept & label.in_range,
                   other=0.0).to(ACC)



@triton.jit
def store_gradient(grad_ptr, rows, row_ok, start, K, z, c, y, g, kf, prm, BASE0: tl.constexpr,
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
        out += pass_term_gradient(BASE0, DENSE, g.alpha0, g.beta0, p, lp, c, g.total_c, is_label, g.u_max[:, None],
                                  kf, prm, OFFICIAL)
    if BASE1 != NO_TERM:
        if needs_pass(BASE1, DENSE):
            out += pass_term_gradient(BASE1, DENSE, g.alpha1, g.beta1, p, lp, c, g.total_c, is_label,
                                      g.u_max[:, None], kf, prm, OFFICIAL)
    out = tl.where(g.zero[:, None], 0.0, out)
    offsets = rows[:, None] * K + cols[None, :]
    tl.store(grad_ptr + offsets, out.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < K)[None, :])


@triton.jit
def store_target_gradient(grad_ptr, weight_ptr, R, rows, row_ok, start, K, z, c, g, kf, prm, BASE0: tl.constexpr,
                          BASE1: tl.constexpr, OFFICIAL: tl.constexpr, WEIGHTED: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """The probability targets' gradient over the tile, into the second (R, K) of the pair
    (contract.gradient_output): dL/dt[k] = (1 - eps) w[k] (G + sum_t delta_t T_t[k]), delta_t = beta_t
    (-beta_t for reverse), T = V (V - W for split), G and beta already times the row's scale
    (apl_rowmath.h, "Targets' gradient")."""
    cols = start + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    lp = (z - g.max_z[:, None]) - g.log_s[:, None]
    p = tl.exp(lp)
    value = zero_coefficient_term(target_element(BASE0, p, lp, g.u_max[:, None], kf, prm, OFFICIAL), c)
    out = g.target_g[:, None] + target_sign(BASE0) * g.beta0[:, None] * value
    if BASE1 != NO_TERM:
        value = zero_coefficient_term(target_element(BASE1, p, lp, g.u_max[:, None], kf, prm, OFFICIAL), c)
        out += target_sign(BASE1) * g.beta1[:, None] * value
    factor = tl.full([BLOCK_K], 1.0, out.dtype) * prm.keep
    if WEIGHTED:
        factor = factor * tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(out.dtype)
    out = tl.where(g.zero[:, None], 0.0, out * factor[None, :])
    offsets = R.to(tl.int64) * K + rows[:, None] * K + cols[None, :]
    tl.store(grad_ptr + offsets, out.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
