// The CUDA kernels' gradient of a row (GRAD_IN_FORWARD writes it in the forward kernel) and the
// backward kernel's row: its gradient from its record. Written over a Group as apl_cuda_rows.h is.

#pragma once

#include "apl_cuda_rows.h"

namespace apl {
namespace gpu {

// ------------------------------------------------------------------ gradient

// The gradient's per-row coefficients (apl_cpu.cpp's pass 4), grad = sum_t coef_t V'_t - p H:
// dense rows coef_t = alpha_t + beta_t omega_t; one-hot rows, away from the label, off_label[t]
// (alpha_t, plus beta_t C for reverse and split terms) for the terms with a pass (`stored`) plus nce's alpha
// (`constant`) where nce has none, and at the label label_coef[t] = alpha_t + beta_t C (reverse:
// alpha_t) for every term.
template <typename S>
struct GradCoefs {
  S total_h, total_c;
  S constant = 0;
  S alpha[kMaxTerms], beta[kMaxTerms];  // dense rows
  S off_label[kMaxTerms], label_coef[kMaxTerms];  // one-hot rows
  bool stored[kMaxTerms];

  APL_HD GradCoefs(const LossParams& params, const RowCoefs<S>& k, S c, bool dense)
      : total_h(k.total_h), total_c(c) {
APL_UNROLL
    for (int t = 0; t < kMaxTerms; ++t) {
      const bool used = t < params.num_terms;
      const bool reverse = used && family_of(params.base[t]) == kReverse;
      const bool off = used && sums_off_label(params.base[t]);
      stored[t] = used && term_needs_pass(params.base[t], dense);
      alpha[t] = k.alpha[t];
      beta[t] = k.beta[t];
      off_label[t] = k.alpha[t] + (off ? k.beta[t] * total_c : S(0));
      label_coef[t] = k.alpha[t] + (reverse ? S(0) : k.beta[t] * total_c);
      if (used && !stored[t] && params.base[t] == kNCE) constant += off_label[t];
    }
  }
};

// d loss / d z at an element of probability p, log-probability lp and coefficient c (dense rows).
template <bool kDense, typename S>
APL_HD S gradient_element(const LossParams& params, const GradCoefs<S>& gc, const RowStats<S>& row, S p, S lp, S c,
                          bool at_label, int64_t K) {
  S g = (at_label ? S(0) : gc.constant) - p * gc.total_h;
APL_UNROLL
  for (int t = 0; t < kMaxTerms; ++t) {
    if (t >= params.num_terms || !(kDense || at_label || gc.stored[t])) continue;
    const int base = params.base[t];
    const S coef = kDense     ? gc.alpha[t] + gc.beta[t] * omega<S, S>(base, c, gc.total_c)
                   : at_label ? gc.label_coef[t]
                              : gc.off_label[t];
    const Element<S> el = kDense     ? dense_element<S, S>(base, p, lp, c, gc.total_c, row, params, K)
                          : at_label ? element<S, S>(base, p, lp, row, params, K)
                                     : off_label_element<S, S>(base, p, lp, row, params, K);
    g += coef * el.derivative;
  }
  return g;
}

// Writes row r's gradient (coefficients k, already scaled) into the gradient, reading the row's
// logits. Zero and undefined rows are still read (their logits may load while their state is
// being learnt) and get 0 and NaN. One loop each for dense and one-hot rows: each keeps only its
// own coefficients in registers.
template <bool kDense, class Group, typename scalar_t, typename S = at::opmath_type<scalar_t>>
APL_HD void gradient_loop(const Group& g, const Args<scalar_t>& a, int64_t r, const RowStats<S>& row,
                          const GradCoefs<S>& gc, S label_c, int y, int state) {
  const scalar_t* z = a.logits + r * a.row_stride;
  scalar_t* out = a.grad + r * a.K;
  const RowSpan<scalar_t> span{static_cast<int>(a.K)};
  const bool vector = vector_row(a, z), vector_store = aligned(out);
  for (int i = 0; i < g.count(); ++i) {
    for (int u = g.lane(i); u < span.units(); u += g.size()) {
      const Pack<scalar_t> pack = load_unit(z, a.col_stride, vector, span, u);
      Pack<scalar_t> grad;
APL_UNROLL
      for (int e = 0; e < span.V; ++e) {
        const int j = span.element(u, e);
        grad.v[e] = scalar_t(0);
        if (j >= span.K) continue;
        const S lp = (static_cast<S>(pack.v[e]) - row.max_z) - row.log_s;
        const S p = Math<S>::exp(lp);
        const S c = kDense ? coefficient(a, r, j, y, label_c) : S(0);
        const S value = gradient_element<kDense>(a.params, gc, row, p, lp, c, !kDense && j == y, span.K);
        grad.v[e] = static_cast<scalar_t>(state == kCounted ? value : state == kZero ? S(0) : quiet_nan<S>());
      }
      store_unit(out, vector_store, span, u, grad);
    }
  }
}

// With a.target_grad (dense rows: probability targets), the targets' gradient of row r:
// (1 - eps) w[j] (G + sum_t delta_t T_t[j]) (apl_rowmath.h, "Targets' gradient"; tk already
// scaled), in a loop of its own over the row after the logits' gradient (the row read once more,
// from cache as far as it stays there): inside gradient_loop its element switch pushed the
// bfloat16 backward past its 64 registers on sm_80.
template <class Group, typename scalar_t, typename S = at::opmath_type<scalar_t>>
APL_HD void target_gradient_loop(const Group& g, const Args<scalar_t>& a, int64_t r, const RowStats<S>& row,
                                 const TargetCoefs<S>& tk, int state) {
  const scalar_t* z = a.logits + r * a.row_stride;
  const RowSpan<scalar_t> span{static_cast<int>(a.K)};
  const bool vector = vector_row(a, z);
  for (int i = 0; i < g.count(); ++i) {
    for (int u = g.lane(i); u < span.units(); u += g.size()) {
      const Pack<scalar_t> pack = load_unit(z, a.col_stride, vector, span, u);
APL_UNROLL
      for (int e = 0; e < span.V; ++e) {
        const int j = span.element(u, e);
        if (j >= span.K) continue;
        const S lp = (static_cast<S>(pack.v[e]) - row.max_z) - row.log_s;
        const S p = Math<S>::exp(lp);
        S values[kMaxTerms] = {S(0), S(0)};
        bool finite = true;
APL_UNROLL
        for (int term = 0; term < kMaxTerms; ++term) {
          if (term < a.params.num_terms) {
            values[term] = target_element<S, S>(a.params.base[term], p, lp, row, a.params, span.K);
            finite = finite && values[term] - values[term] == S(0);
          }
        }
        // The coefficient matters only where a T is infinite (a masked class): read only there.
        const S c = finite ? S(1) : coefficient(a, r, j, -1, S(0));
        S t = tk.constant;
APL_UNROLL
        for (int term = 0; term < kMaxTerms; ++term) {
          if (term < a.params.num_terms) t += tk.slope[term] * zero_coefficient_term(values[term], c);
        }
        t *= a.keep * class_weight(a, j);
        a.target_grad_out[r * a.K + j] = state == kCounted ? t : state == kZero ? S(0) : quiet_nan<S>();
      }
    }
  }
}

template <bool kTargets = true, class Group, typename scalar_t, typename S = at::opmath_type<scalar_t>>
APL_HD void gradient_pass(const Group& g, const Args<scalar_t>& a, int64_t r, const RowStats<S>& row,
                          const RowCoefs<S>& k, const TargetCoefs<S>& tk, S total_c, S label_c, int y, int state) {
  const GradCoefs<S> gc(a.params, k, total_c, a.dense);
  if (a.dense) {
    gradient_loop<true>(g, a, r, row, gc, label_c, y, state);
    if (kTargets && a.target_grad) target_gradient_loop(g, a, r, row, tk, state);
  } else {
    gradient_loop<false>(g, a, r, row, gc, label_c, y, state);
  }
}

// ------------------------------------------------------------------ backward

// Row r's gradient from its record, times the upstream gradient over the mean's divisor (the
// record after the last row), reading the row once. Nothing is branched on before the row's
// loads: the record, the label and the logits load together.
// kTargets false: a kernel that never computes the targets' gradient (apl_cuda.cu, backward_kernel).
template <bool kTargets = true, class Group, typename scalar_t, typename S = at::opmath_type<scalar_t>>
APL_HD void backward_row(const Group& g, const Args<scalar_t>& a, int64_t r) {
  if (r >= a.rows) return;
  const RowRecord<S> record = a.records[r];
  const int64_t label = a.labels ? a.labels[r * a.label_stride] : -1;
  const bool counted_label = a.labels && label != a.ignore_index && label >= 0 && label < a.K;
  const int y = counted_label ? static_cast<int>(label) : -1;
  RowStats<S> row;
  row.max_z = record.max_z;
  row.set_log_sum_exp(record.log_s);
  const int state = record.log_s == infinity<S>() ? kZero : row.defined() ? kCounted : kUndefined;
  RowCoefs<S> k;
  k.alpha[0] = record.alpha0;
  k.beta[0] = record.beta0;
  k.alpha[1] = record.alpha1;
  k.beta[1] = record.beta1;
  k.total_h = record.total_h;
  // The targets' gradient's G and delta_t = beta_t (-beta_t for reverse terms; split's beta is w),
  // before the scale.
  TargetCoefs<S> tk;
  if (kTargets && a.target_grad) {
    tk.constant = record.target_g;
APL_UNROLL
    for (int t = 0; t < kMaxTerms; ++t) {
      tk.slope[t] = t < a.params.num_terms && family_of(a.params.base[t]) == kReverse ? -k.beta[t] : k.beta[t];
    }
  }
  const S scale = (a.upstream ? a.upstream[r * a.upstream_stride] : S(1)) / a.records[a.rows].max_z;
  k.scale_gradient(scale);
  tk.scale_gradient(scale);
  // One-hot rows: label_c = C. Smoothed labels: c[y] = spread + (1 - eps) w[y].
  const S label_c = !a.dense ? record.total_c : counted_label ? a.keep * class_weight(a, y) : S(0);
  gradient_pass<kTargets>(g, a, r, row, k, tk, record.total_c, label_c, y, state);
}

}  // namespace gpu
}  // namespace apl
