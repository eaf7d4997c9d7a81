"""The backward kernel: the gradient of each row from its record, times the upstream gradient
over the mean's divisor: one read of the logits, one write of the gradient."""

import triton
import triton.language as tl

from .rowmath import STATS, gradient
from .tiles import (
    UNALIGNED, UNSPECIALIZED, load_coefficients, load_label, load_label_logit, load_logits, load_params, load_record,
    load_tile, store_gradient, store_target_gradient,
)


@triton.jit(do_not_specialize=UNSPECIALIZED, do_not_specialize_on_alignment=UNALIGNED)
def backward_kernel(
    logits_ptr, target_ptr, weight_ptr, stats_ptr, upstream_ptr, grad_ptr,
    R, K, stride_row, stride_col, stride_target_row, stride_target_col, stride_upstream, ignore_index: tl.int64,
    w0: tl.int64, w1: tl.int64, gamma: tl.int64, q: tl.int64, a: tl.int64, log_min_prob: tl.int64,
    a_minus_one: tl.int64, nnfl_b: tl.int64, agce_top: tl.int64, aul_bottom: tl.int64, keep: tl.int64,
    spread: tl.int64,
    BASE0: tl.constexpr, BASE1: tl.constexpr, OFFICIAL: tl.constexpr, PROBS: tl.constexpr, WEIGHTED: tl.constexpr,
    DENSE: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, CHUNKED: tl.constexpr, TARGET_GRAD: tl.constexpr,
):
    """The gradient of ROWS rows from their Records, times the upstream gradient over the divisor
    (the record after the last row): one read of the logits, one write of the gradient (with
    TARGET_GRAD, of the pair of contract.gradient_output: the targets' from the same tiles)."""
    ACC: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    strides = (stride_row, stride_col, stride_target_row, stride_target_col)
    if not CHUNKED:
        z = load_logits(logits_ptr, rows, row_ok, 0, K, stride_row, stride_col, ACC, BLOCK_K)  # issued first
    bits = (w0, w1, gamma, q, a, log_min_prob, a_minus_one, nnfl_b, agce_top, aul_bottom, keep, spread)
    prm = load_params(bits, ACC)
    kf = K.to(ACC)
    label = load_label(target_ptr, weight_ptr, rows, row_ok, K, stride_target_row, ignore_index, prm.keep, PROBS,
                       WEIGHTED, ACC)
    record = load_record(stats_ptr, rows, row_ok)
    upstream = tl.load(upstream_ptr + rows * stride_upstream, mask=row_ok, other=0.0).to(ACC)
    scale = upstream / tl.load(stats_ptr + R.to(tl.int64) * STATS)  # R < 2^31 is an i32: R STATS is not
    z_y = tl.full(scale.shape, 0.0, scale.dtype)
    if not DENSE:
        z_y = load_label_logit(logits_ptr, rows, label, stride_row, stride_col, ACC)
    g = gradient(record, label, z_y, scale, kf, prm, BASE0, BASE1, DENSE, OFFICIAL)
    for start in range(0, K, BLOCK_K):  # one tile unless the row is chunked
        if CHUNKED:
            z, c = load_tile(logits_ptr, target_ptr, weight_ptr, rows, row_ok, start, K, strides, label, prm, PROBS,
                             WEIGHTED, DENSE, ACC, BLOCK_K)
        else:
            c = z
            if DENSE:
                c = load_coefficients(target_ptr, weight_ptr, rows, row_ok, 0, K, stride_target_row, stride_target_col,
                                      label, prm.keep, prm.spread, PROBS, WEIGHTED, ACC, BLOCK_K)
        store_gradient(grad_ptr, rows, row_ok, start, K, z, c, label.y, g, kf, prm, BASE0, BASE1, DENSE, OFFICIAL,
                       BLOCK_K)
        if TARGET_GRAD:
            store_target_gradient(grad_ptr, weight_ptr, R, rows, row_ok, start, K, z, c, g, kf, prm, BASE0, BASE1,
                                  OFFICIAL, WEIGHTED, BLOCK_K)
