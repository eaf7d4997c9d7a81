"""The forward kernel: one launch gives every row's loss and its record (GRAD_IN_BACKWARD) or
gradient (GRAD_IN_FORWARD), and for mean/sum the reduced loss, deterministically."""

import triton
import triton.language as tl

from .rowmath import (
    NO_TERM, STATS, Coefs, Record, Sums, add_sums, coefs, gradient, label_sums, needs_pass, one_minus_exp,
    target_constant, term_sums,
)
from .tiles import (
    UNALIGNED, UNSPECIALIZED, load_coefficients, load_label, load_label_logit, load_logits, load_params, load_tile,
    store_gradient, store_target_gradient,
)


@triton.jit(do_not_specialize=UNSPECIALIZED, do_not_specialize_on_alignment=UNALIGNED)
def forward_kernel(
    logits_ptr, target_ptr, weight_ptr, loss_ptr, saved_ptr, partials_ptr, counter_ptr, divisor_ptr,
    R, K, stride_row, stride_col, stride_target_row, stride_target_col, ignore_index: tl.int64,
    w0: tl.int64, w1: tl.int64, gamma: tl.int64, q: tl.int64, a: tl.int64, log_min_prob: tl.int64,
    a_minus_one: tl.int64, nnfl_b: tl.int64, agce_top: tl.int64, aul_bottom: tl.int64, keep: tl.int64,
    spread: tl.int64,
    BASE0: tl.constexpr, BASE1: tl.constexpr, OFFICIAL: tl.constexpr, PROBS: tl.constexpr, WEIGHTED: tl.constexpr,
    DENSE: tl.constexpr, REDUCTION: tl.constexpr, GRAD_MODE: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr, CHUNKED: tl.constexpr, TARGET_GRAD: tl.constexpr,
):
    """ROWS rows per program: their losses, and their Records (GRAD_IN_BACKWARD) or gradients
    (GRAD_IN_FORWARD; with TARGET_GRAD the pair of contract.gradient_output); for mean/sum the last
    program to finish reduces every program's part."""
    ACC: tl.constexpr = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    strides = (stride_row, stride_col, stride_target_row, stride_target_col)
    z = load_logits(logits_ptr, rows, row_ok, 0, K, stride_row, stride_col, ACC, BLOCK_K)  # issued first
    bits = (w0, w1, gamma, q, a, log_min_prob, a_minus_one, nnfl_b, agce_top, aul_bottom, keep, spread)
    prm = load_params(bits, ACC)
    kf = K.to(ACC)
    label = load_label(target_ptr, weight_ptr, rows, row_ok, K, stride_target_row, ignore_index, prm.keep, PROBS,
                       WEIGHTED, ACC)
    cols = tl.arange(0, BLOCK_K)

    # Pass 1: m = max z, s = sum exp(z - m), sum (z - m), C and the count of nonzero c; online over
    # chunks when the row is chunked. While m is -inf (every class so far masked) sums are taken
    # relative to 0 instead: no -inf - -inf.
    c = z  # (unused unless DENSE)
    if DENSE:
        c = load_coefficients(target_ptr, weight_ptr, rows, row_ok, 0, K, stride_target_row, stride_target_col, label,
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
            zc, cc = load_tile(logits_ptr, target_ptr, weight_ptr, rows, row_ok, start, K, strides, label, prm, PROBS,
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
    u_max = one_minus_exp(-log_s)  # 1 - p at the max, whose lp is -log s
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
                zc, cc = load_tile(logits_ptr, target_ptr, weight_ptr, rows, row_ok, start, K, strides, label, prm,
                                   PROBS, WEIGHTED, DENSE, ACC, BLOCK_K)
                valid = row_ok[:, None] & (start + cols < K)[None, :]
                is_label = (start + cols)[None, :] == label.y[:, None]
                lp = (zc - max_z[:, None]) - log_s[:, None]
                p = tl.exp(lp)
                if needs_pass(BASE0, DENSE):
                    sums0 = add_sums(sums0, term_sums(BASE0, DENSE, p, lp, valid, cc, total_c, is_label,
                                                      u_max[:, None], kf, prm, OFFICIAL, TARGET_GRAD))
                if BASE1 != NO_TERM:
                    if needs_pass(BASE1, DENSE):
                        sums1 = add_sums(sums1, term_sums(BASE1, DENSE, p, lp, valid, cc, total_c, is_label,
                                                          u_max[:, None], kf, prm, OFFICIAL, TARGET_GRAD))
        else:
            valid = row_ok[:, None] & (cols < K)[None, :]
            is_label = cols[None, :] == label.y[:, None]
            lp = (z - max_z[:, None]) - log_s[:, None]
            p = tl.exp(lp)
            if needs_pass(BASE0, DENSE):
                sums0 = term_sums(BASE0, DENSE, p, lp, valid, c, total_c, is_label, u_max[:, None], kf, prm,
                                  OFFICIAL, TARGET_GRAD)
            if BASE1 != NO_TERM:
                if needs_pass(BASE1, DENSE):
                    sums1 = term_sums(BASE1, DENSE, p, lp, valid, c, total_c, is_label, u_max[:, None], kf, prm,
                                      OFFICIAL, TARGET_GRAD)
    z_y = zero
    if not DENSE:  # one-hot rows: the label's own sums, from its logit
        z_y = load_label_logit(logits_ptr, rows, label, stride_row, stride_col, ACC)
        lp_y = (z_y - max_z) - log_s
        p_y = tl.exp(lp_y)
        sums0 = label_sums(BASE0, sums0, p_y, lp_y, total_c, u_max, kf, prm, OFFICIAL)
        if BASE1 != NO_TERM:
            sums1 = label_sums(BASE1, sums1, p_y, lp_y, total_c, u_max, kf, prm, OFFICIAL)
    coefs0 = coefs(BASE0, prm.w0, sums0, lp_sum, total_c, kf)
    coefs1 = Coefs(zero, zero, zero, zero)
    target_g = zero
    if BASE1 != NO_TERM:
        coefs1 = coefs(BASE1, prm.w1, sums1, lp_sum, total_c, kf)
    if TARGET_GRAD:  # the targets' gradient's G (apl_rowmath.h's target_coefs)
        target_g = target_constant(BASE0, prm.w0, sums0)
        if BASE1 != NO_TERM:
            target_g += target_constant(BASE1, prm.w1, sums1)

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
                    tl.where(counted, tl.where(bad, nan, coefs0.total_h + coefs1.total_h), 0.0),
                    tl.where(counted, tl.where(bad, nan, target_g), 0.0))
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
        g = gradient(record, label, z_y, scale, kf, prm, BASE0, BASE1, DENSE, OFFICIAL)
        if CHUNKED:
            for start in range(0, K, BLOCK_K):
                zc, cc = load_tile(logits_ptr, target_ptr, weight_ptr, rows, row_ok, start, K, strides, label, prm,
                                   PROBS, WEIGHTED, DENSE, ACC, BLOCK_K)
                store_gradient(saved_ptr, rows, row_ok, start, K, zc, cc, label.y, g, kf, prm, BASE0, BASE1, DENSE,
                               OFFICIAL, BLOCK_K)
                if TARGET_GRAD:
                    store_target_gradient(saved_ptr, weight_ptr, R, rows, row_ok, start, K, zc, cc, g, kf, prm, BASE0,
                                          BASE1, OFFICIAL, WEIGHTED, BLOCK_K)
        else:
            store_gradient(saved_ptr, rows, row_ok, 0, K, z, c, label.y, g, kf, prm, BASE0, BASE1, DENSE, OFFICIAL,
                           BLOCK_K)
            if TARGET_GRAD:
                store_target_gradient(saved_ptr, weight_ptr, R, rows, row_ok, 0, K, z, c, g, kf, prm, BASE0, BASE1,
                                      OFFICIAL, WEIGHTED, BLOCK_K)

    if REDUCTION != 0:
        _reduce(loss_ptr, saved_ptr, partials_ptr, counter_ptr, R, value, label.weight, REDUCTION, GRAD_MODE, ACC)
    elif GRAD_MODE == 2:
        if pid == 0:  # the gradient's divisor: 1 without a mean
            _store_divisor(saved_ptr, R, 1.0, ACC)


_REDUCE_BLOCK = tl.constexpr(1024)  # parts summed at a time by the last program
_STATS_BLOCK = tl.constexpr(triton.next_power_of_2(STATS.value))  # a record's values as an arange


@triton.jit
def _store_divisor(stats_ptr, R, divisor, ACC: tl.constexpr):
    j = tl.arange(0, _STATS_BLOCK)
    tl.store(stats_ptr + R.to(tl.int64) * STATS + j, tl.where(j == 0, divisor, 0.0).to(ACC), mask=j < STATS)


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
