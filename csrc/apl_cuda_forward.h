// The CUDA forward kernel's work on a row and a block: the row's passes, value and record (or
// gradient), and the block's part of a reduced loss. Written over a Group as apl_cuda_rows.h is.

#pragma once

#include "apl_cuda_backward.h"  // gradient_pass: GRAD_IN_FORWARD writes the gradient in forward

namespace apl {
namespace gpu {

// ------------------------------------------------------------------ forward

// The one-hot sums at the label, omega = c = label_c there (0 elsewhere): of the terms that take no
// pass, and added to a split term's sums off the label.
template <typename S>
APL_HD void label_terms(const LossParams& params, S z_label, const RowStats<S>& row, S label_c, int64_t K,
                        TermSums<S>* sums) {
  const S lp = (z_label - row.max_z) - row.log_s;
  const S p = Math<S>::exp(lp);
APL_UNROLL
  for (int t = 0; t < kMaxTerms; ++t) {
    if (t >= params.num_terms || family_of(params.base[t]) == kReverse) continue;
    const Element<S> at = element<S, S>(params.base[t], p, lp, row, params, K);
    sums[t].weighted += label_c == S(0) ? S(0) : label_c * at.value;
    sums[t].weighted_derivative += label_c * at.derivative;
  }
}

// The sums pass (apl_cpu.cpp's term_pass, both terms at once) over a row read from `src`.
template <class Group, typename scalar_t, typename S = at::opmath_type<scalar_t>>
APL_HD void sum_terms(const Group& g, const Args<scalar_t>& a, int64_t r, const RowSpan<scalar_t>& span,
                      const scalar_t* src, int64_t stride, bool vector, const S* c_cached, const RowStats<S>& row,
                      S total_c, S label_c, int y, TermSums<S>* sums) {
  Sums<S, 4 * kMaxTerms> part[Group::kOwned];
  for (int i = 0; i < g.count(); ++i) {
    for (int u = g.lane(i); u < span.units(); u += g.size()) {
      const Pack<scalar_t> pack = load_unit(src, stride, vector, span, u);
APL_UNROLL
      for (int e = 0; e < span.V; ++e) {
        const int j = span.element(u, e);
        if (j >= span.K) continue;
        const S lp = (static_cast<S>(pack.v[e]) - row.max_z) - row.log_s;
        const S p = Math<S>::exp(lp);
        const S c = !a.dense ? S(0) : c_cached ? c_cached[j] : coefficient(a, r, j, y, label_c);
APL_UNROLL
        for (int t = 0; t < kMaxTerms; ++t) {
          if (t >= a.params.num_terms || !term_needs_pass(a.params.base[t], a.dense)) continue;
          const int base = a.params.base[t];
          const int family = family_of(base);
          const Element<S> el = a.dense ? dense_element<S, S>(base, p, lp, c, total_c, row, a.params, span.K)
                                        : off_label_element<S, S>(base, p, lp, row, a.params, span.K);
          S* s = part[i].v + 4 * t;  // weighted, weighted_derivative, plain, plain_derivative
          if (a.dense) {
            // A label of coefficient 0 adds nothing, even where V is infinite (a masked class).
            const S w = omega<S, S>(base, c, total_c);
            s[0] += w != S(0) ? w * el.value : S(0);
            s[1] += w * el.derivative;
          } else if (sums_off_label(base) && j != y) {
            s[0] += total_c * el.value;
            s[1] += total_c * el.derivative;
          }
          // (reverse: sum V is the targets' gradient's S; split: sum W is, target_coefs)
          if (family == kNormalized || family == kNegative || (a.target_grad && family == kReverse)) {
            s[2] += el.value;
            s[3] += el.derivative;
          } else if (a.target_grad && family == kSplit) {
            s[2] += off_label_element<S, S>(base, p, lp, row, a.params, span.K).value;
          }
        }
      }
    }
  }
  const Sums<S, 4 * kMaxTerms> total = g.reduce(part);
APL_UNROLL
  for (int t = 0; t < kMaxTerms; ++t) {
    sums[t] = {total.v[4 * t], total.v[4 * t + 1], total.v[4 * t + 2], total.v[4 * t + 3]};
  }
}

template <typename S>
APL_HD RowRecord<S> make_record(int state, const RowStats<S>& row, S total_c, const RowCoefs<S>& k,
                                S target_g = S(0)) {
  if (state == kZero) return {S(0), infinity<S>(), S(0), S(0), S(0), S(0), S(0), S(0)};  // log s = inf: zero
  if (state == kUndefined) {
    const S nan = quiet_nan<S>();
    return {nan, nan, nan, nan, nan, nan, nan, nan, nan};
  }
  return {row.max_z, row.log_s, total_c, k.alpha[0], k.beta[0], k.alpha[1], k.beta[1], k.total_h, target_g};
}

// The record after the last row: the divisor the backward divides the gradient by.
template <typename S>
APL_HD RowRecord<S> divisor_record(S divisor) {
  return {divisor, S(0), S(0), S(0), S(0), S(0), S(0), S(0)};
}

// Writes row r's loss (reduction none) and record (unless NO_GRAD).
template <typename scalar_t, typename S = at::opmath_type<scalar_t>>
APL_HD void write_row(const Args<scalar_t>& a, int64_t r, S value, const RowRecord<S>& record) {
  if (a.row_loss) a.row_loss[r] = value;
  if (a.records) a.records[r] = record;
}

// The group's row g.row() (0 when past the last row): pass 1 reads the row once (online max and
// sums, and the sums of c), keeping it in the block's shared `memory` (and c) when a.cache; the
// sums pass, when a term needs one, reads it again from there, or else from memory. Writes the
// row's loss and record; returns its loss. (g.row() and the shared-memory rows are asked again
// where they are needed: the device recomputes the row from the thread's indices rather than
// hold it, and what derives from it, in registers through the passes.)
template <class Group, typename scalar_t, typename S = at::opmath_type<scalar_t>>
APL_HD S forward_row(const Group& g, const Args<scalar_t>& a, unsigned char* memory) {
  const int64_t r = g.row();
  if (r >= a.rows) return S(0);
  const scalar_t* z = a.logits + r * a.row_stride;
  const RowSpan<scalar_t> span{static_cast<int>(a.K)};
  const bool vector = vector_row(a, z);
  // The label is not waited for: nothing of pass 1 but one comparison depends on it.
  const int64_t label = a.labels ? a.labels[r * a.label_stride] : -1;
  const bool ignored = a.labels && label == a.ignore_index;
  const bool in_range = !a.labels || (label >= 0 && label < a.K);
  const int y = a.labels && in_range ? static_cast<int>(label) : -1;  // never an index outside the row
  scalar_t* cache = logits_cache(a, memory, r);
  S* c_cache = coefficient_cache(a, memory, r);
  Online<S> online[Group::kOwned];
  Sums<S, 3> extra[Group::kOwned];  // z[y]; sum of c (labels: of the spread); number of c != 0
  for (int i = 0; i < g.count(); ++i) {
    for (int u = g.lane(i); u < span.units(); u += g.size()) {
      const Pack<scalar_t> pack = load_unit(z, a.col_stride, vector, span, u);
      if (cache) store_unit(cache, true, span, u, pack);  // shared memory rows are aligned
APL_UNROLL
      for (int e = 0; e < span.V; ++e) {
        const int j = span.element(u, e);
        if (j >= span.K) continue;
        const S x = static_cast<S>(pack.v[e]);
        online[i].add(x);
        if (j == y) extra[i].v[0] = x;
        if (a.dense) {
          const S c = a.labels ? spread(a, j) : coefficient(a, r, j, y, S(0));
          extra[i].v[1] += c;
          extra[i].v[2] += c != S(0) ? S(1) : S(0);
          if (c_cache) c_cache[j] = c;
        }
      }
    }
  }
  const Online<S> stats = g.reduce(online);
  const Sums<S, 3> sums_c = g.reduce(extra);
  RowStats<S> row;
  row.max_z = stats.max;
  row.set_sum_exp(stats.sum_exp);
  row.sum_shifted = stats.shifted;
  const S label_weight = a.labels && in_range && !ignored ? class_weight(a, y) : S(0);
  const S label_c = a.keep * label_weight;
  const S total_c = a.labels ? label_c + (a.dense ? sums_c.v[1] : S(0)) : sums_c.v[1];
  const bool any_c = a.labels ? label_c != S(0) || (a.dense && sums_c.v[1] != S(0)) : sums_c.v[2] != S(0);
  const int state = ignored || (in_range && !any_c) ? kZero : !in_range || !row.defined() ? kUndefined : kCounted;
  if (state != kCounted) {  // done now: nothing of the row is kept through the sums pass
    const S value = state == kZero ? S(0) : quiet_nan<S>();
    if (g.leader()) write_row(a, r, value, make_record(state, row, total_c, RowCoefs<S>()));
    return value;
  }
  TermSums<S> sums[kMaxTerms];
  if (a.needs_pass) {  // one call: the sums pass is the largest code of the kernel
    const int64_t again = g.row();
    scalar_t* cached = logits_cache(a, memory, again);
    sum_terms(g, a, again, span, cached ? cached : a.logits + again * a.row_stride, cached ? 1 : a.col_stride,
              cached || vector, coefficient_cache(a, memory, again), row, total_c, label_c, y, sums);
  }
  if (!a.dense) label_terms(a.params, sums_c.v[0], row, label_c, a.K, sums);
  const RowCoefs<S> k = row_coefs<S>(a.params, sums, row, total_c, a.K);
  const S target_g = a.target_grad ? target_coefs<S>(a.params, sums, row, a.K).constant : S(0);
  if (g.leader()) write_row(a, g.row(), k.value, make_record(kCounted, row, total_c, k, target_g));
  return k.value;
}

// What a mean divides by from row r with a label: w[y] where it is counted (never an index
// outside the row).
template <typename scalar_t, typename S = at::opmath_type<scalar_t>>
APL_HD S divisor_part(const Args<scalar_t>& a, int64_t r) {
  if (r >= a.rows) return S(0);
  const int64_t y = a.labels[r * a.label_stride];
  return y != a.ignore_index && y >= 0 && y < a.K ? class_weight(a, y) : S(0);
}

// After a block's rows (reduction mean or sum; `mine`: the values of the lanes this executor
// plays, a row's loss at its group's lane 0, zeros elsewhere). Thread t of the block adds the
// mean's divisor part of the block's row t, reading its label again (from cache), rather than
// each row carrying its class weight through its passes (one register too many). Deterministic
// without a second launch: each block stores its fixed-order sum in its own slot of `partials`
// and takes a ticket; the block that takes the last ticket sums every slot in a fixed order (lane
// l adds slots l, l + 512, ... in turn, then a fixed tree), so the result does not depend on which
// block finishes last. The ordering that makes the slots visible to it is arrive()'s: see
// DeviceGroup in apl_cuda.cu.
template <class Block, typename scalar_t, typename S = at::opmath_type<scalar_t>>
APL_HD void finish_reduction(const Block& b, const Args<scalar_t>& a, const S* mine) {
  Sums<S, 2> part[Block::kOwned];
  const int64_t rows_per_block = kBlockThreads / a.group;
  for (int i = 0; i < b.count(); ++i) {
    part[i].v[0] = mine[i];
    if (a.known_divisor == S(0) && b.lane(i) < rows_per_block) {
      part[i].v[1] = divisor_part(a, b.block() * rows_per_block + b.lane(i));
    }
  }
  if (!b.arrive(a.partials, b.reduce(part), a.counter, a.blocks)) return;
  for (int i = 0; i < b.count(); ++i) {
    part[i] = Sums<S, 2>();
    for (int64_t slot = b.lane(i); slot < a.blocks; slot += b.size()) {
      part[i] = combine(part[i], b.load_partial(a.partials + slot));
    }
  }
  const Sums<S, 2> total = b.reduce(part);
  if (!b.leader()) return;
  const S divisor = a.known_divisor > S(0) ? a.known_divisor
                    : total.v[1] != S(0)   ? total.v[1]
                                           : S(1);  // every row ignored: the mean is 0
  *a.loss = a.reduction == kMean ? total.v[0] / divisor : total.v[0];
  if (a.records) a.records[a.rows] = divisor_record(divisor);
}

// Reduction none: the record after the last row says "divide by 1" (block 0's lane 0 writes it).
template <typename scalar_t, typename S = at::opmath_type<scalar_t>>
APL_HD void finish_unreduced(const Args<scalar_t>& a) {
  if (a.records) a.records[a.rows] = divisor_record(S(1));
}

}  // namespace gpu
}  // namespace apl
