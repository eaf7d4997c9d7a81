// What the CUDA kernels do to rows and blocks, written once for two executors of a group of G
// threads that shares a row: the device (apl_cuda.cu: one thread is one lane, the group's
// reductions are warp shuffles and, for G = 512, shared memory) and the host emulation
// (apl_cuda_emulation.cpp: one caller plays every lane in turn and computes each reduction in the
// order the device's butterfly does). A Group offers size() (G), count() (lanes this executor
// plays: 1 on the device), lane(i), leader() (plays lane 0), reduce(values of its lanes) (the
// group's combine() of them, the same value for every lane) and, for whole blocks, arrive() and
// load_partial() (the last-block protocol of finish_reduction). The math is apl_rowmath.h's;
// docs/kernels.md ("CUDA C++") explains the design and counts its bytes.
//
// Control flow: whatever decides a branch around a reduction is the same for every lane of the
// group (a row's label, its reduced statistics, the call's flags), so every lane reaches the same
// reductions. Reductions combine commutatively, bit for bit, so that every lane of a butterfly
// ends with the same value.

#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "apl_op.h"

// Loops with a constant trip count that nvcc must unroll (their arrays then stay in registers).
#if defined(__CUDACC__)
#define APL_UNROLL _Pragma("unroll")
#else
#define APL_UNROLL
#endif

// The host emulation checks what would fault on the device: a vector access off its alignment.
#if defined(__CUDA_ARCH__)
#define APL_CHECK_ALIGNED(p)
#else
#define APL_CHECK_ALIGNED(p) \
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % alignof(decltype(*(p))) == 0, "apl emulation: a misaligned vector access")
#endif

namespace apl {
namespace gpu {

constexpr int kBlockThreads = 512;
constexpr int kWarp = 32;
constexpr int kWarps = kBlockThreads / kWarp;

enum FloatType : int { kF16 = 0, kBF16, kF32, kF64 };
// A row's outcome: counted, zero (ignored, or no coefficient on any label: loss and gradient 0),
// undefined (no softmax, or a label outside [0, K): NaN).
enum RowState : int { kCounted = 0, kZero, kUndefined };

template <typename S>
APL_HD S infinity() {
  return S(INFINITY);
}
template <typename S>
APL_HD S quiet_nan() {
  return S(NAN);
}

// N running sums, added lane by lane.
template <typename S, int N>
struct Sums {
  S v[N];
  APL_HD Sums() {
APL_UNROLL
    for (int i = 0; i < N; ++i) v[i] = S(0);
  }
};

template <typename S, int N>
APL_HD Sums<S, N> combine(const Sums<S, N>& a, const Sums<S, N>& b) {
  Sums<S, N> c;
APL_UNROLL
  for (int i = 0; i < N; ++i) c.v[i] = a.v[i] + b.v[i];
  return c;
}

// The online pass over part of a row: its max, sum exp(z - max), sum (z - max) and number of
// elements. A default Online is the identity of combine().
template <typename S>
struct Online {
  S max = -infinity<S>(), sum_exp = S(0), shifted = S(0), count = S(0);

  // max as the reference of `shifted`: 0 while no element is finite, so that -inf - max is -inf.
  APL_HD S reference() const { return max == -infinity<S>() ? S(0) : max; }

  // One exp per element: exp(x - max) adds to the sum, or, when x is a new max, exp(max - x)
  // rescales the sum to it (exp(-inf) = 0 the first time). An element of -inf adds exp(-inf) = 0
  // and a shifted -inf; a NaN makes the sum NaN (the row is then undefined), never the max.
  APL_HD void add(S x) {
    const bool grows = x > max;
    const S e = Math<S>::exp(grows ? max - x : x - reference());
    if (grows) {
      shifted = count == S(0) ? S(0) : shifted + count * (max - x);
      sum_exp = sum_exp * e + S(1);
      max = x;
    } else {
      shifted += x - reference();
      sum_exp += e;
    }
    count += S(1);
  }

  // The sums moved to the reference max m (a part without elements adds 0, even where m is inf).
  APL_HD S sum_exp_at(S m) const { return sum_exp == S(0) ? S(0) : sum_exp * Math<S>::exp(max - m); }
  APL_HD S shifted_at(S m, S m_reference) const {
    return count == S(0) ? S(0) : shifted + count * (reference() - m_reference);
  }
};

// Commutative bit for bit: each side's terms are formed before the one addition, and the max is
// fmax plus 0 (a max is never NaN; fmax may return either of -0 and +0, and -0 + 0 is +0).
template <typename S>
APL_HD Online<S> combine(const Online<S>& a, const Online<S>& b) {
  Online<S> c;
  c.max = std::fmax(a.max, b.max) + S(0);
  const S reference = c.reference();
  c.sum_exp = a.sum_exp_at(c.max) + b.sum_exp_at(c.max);
  c.shifted = a.shifted_at(c.max, reference) + b.shifted_at(c.max, reference);
  c.count = a.count + b.count;
  return c;
}

// What one vector load or store moves: 4 elements at most (16 bytes of float32, 8 of half types,
// whose 16-byte packs of 8 elements, unrolled, exceed the 64 registers a thread has), 16 bytes
// of float64.
template <typename scalar_t>
constexpr int pack_bytes() {
  return sizeof(scalar_t) >= 4 ? 16 : 4 * static_cast<int>(sizeof(scalar_t));
}

template <typename scalar_t>
struct alignas(pack_bytes<scalar_t>()) Pack {
  static constexpr int kSize = pack_bytes<scalar_t>() / sizeof(scalar_t);
  scalar_t v[kSize];
};

// Whether a vector access may start at p.
template <typename scalar_t>
APL_HD bool aligned(const scalar_t* p) {
  return reinterpret_cast<uintptr_t>(p) % pack_bytes<scalar_t>() == 0;
}

// A row as units of V = Pack::kSize elements: unit u holds the elements j = u V + k (k < V) below
// K, whatever the row's layout, so that a lane's elements, and so the order of every sum, depend on
// j alone: strided, shifted and contiguous copies of a row give the same bits. A full unit of a
// row that starts aligned with stride 1 is one vector access; other units go element by element.
// Indices within a row are 32-bit (prepare_forward checks K).
template <typename scalar_t>
struct RowSpan {
  static constexpr int V = Pack<scalar_t>::kSize;
  int K;
  APL_HD int units() const { return (K + V - 1) / V; }
  APL_HD int element(int u, int k) const { return u * V + k; }
  APL_HD bool full(int u) const { return u * V + V <= K; }
};

// Unit u of a row whose element j is row[j * stride]: one vector load where the unit is full and
// `vector` (stride 1, row aligned), else element by element (zero past K, which nothing reads).
template <typename scalar_t>
APL_HD Pack<scalar_t> load_unit(const scalar_t* row, int64_t stride, bool vector, const RowSpan<scalar_t>& span,
                                int u) {
  if (vector && span.full(u)) {
    const Pack<scalar_t>* pack = reinterpret_cast<const Pack<scalar_t>*>(row + u * span.V);
    APL_CHECK_ALIGNED(pack);
    return *pack;
  }
  Pack<scalar_t> pack;
APL_UNROLL
  for (int k = 0; k < span.V; ++k) {
    const int j = span.element(u, k);
    pack.v[k] = j < span.K ? row[j * stride] : scalar_t(0);
  }
  return pack;
}

// Stores unit u into a row of stride 1: one vector store where the unit is full and `vector` (the
// row aligned).
template <typename scalar_t>
APL_HD void store_unit(scalar_t* row, bool vector, const RowSpan<scalar_t>& span, int u, const Pack<scalar_t>& pack) {
  if (vector && span.full(u)) {
    Pack<scalar_t>* to = reinterpret_cast<Pack<scalar_t>*>(row + u * span.V);
    APL_CHECK_ALIGNED(to);
    *to = pack;
    return;
  }
APL_UNROLL
  for (int k = 0; k < span.V; ++k) {
    const int j = span.element(u, k);
    if (j < span.K) row[j] = pack.v[k];
  }
}

// Everything a kernel reads and writes, passed by value as a __grid_constant__ (so the loss
// parameters are read from the parameter bank, never copied to local memory).
template <typename scalar_t>
struct Args {
  using S = at::opmath_type<scalar_t>;
  // Logits (R, K), any strides.
  const scalar_t* logits;
  int64_t rows, K, row_stride, col_stride;
  // Labels (R,) of any stride, or else probabilities (R, K) of any floating type and strides.
  const int64_t* labels;
  int64_t label_stride;
  const void* probabilities;
  int probability_type;
  int64_t probability_row_stride, probability_col_stride;
  // Class weights (K,) of any floating type and stride, or null.
  const void* weight;
  int weight_type;
  int64_t weight_stride;
  LossParams params;
  int64_t ignore_index;
  int reduction;
  bool dense;       // coefficients on every label (OpCall::dense)
  bool needs_pass;  // some term needs the sums pass (term_needs_pass)
  S keep;           // 1 - label_smoothing
  S eps_over_k;     // label_smoothing / K
  // The launch: threads per row, blocks, and the rows kept in shared memory between passes.
  int group;
  int64_t blocks;
  bool cache;
  int64_t cache_row;  // elements per cached row, whole packs
  // The mean's divisor when the host knows it (> 0: probability targets, or 1 for other
  // reductions); else finish_reduction sums it.
  S known_divisor;
  // Outputs: per-row losses (reduction none), the reduced loss, row records, the gradient
  // (backward), and the reduction's counter and block partials.
  S* row_loss;
  S* loss;
  RowRecord<S>* records;
  scalar_t* grad;
  unsigned* counter;
  Sums<S, 2>* partials;
  // Backward: the upstream gradient, element r at upstream[r * upstream_stride] (null: 1).
  const S* upstream;
  int64_t upstream_stride;
};

template <typename S>
APL_HD S load_float(const void* base, int type, int64_t i) {
  switch (type) {
    case kF16: return S(static_cast<float>(static_cast<const c10::Half*>(base)[i]));
    case kBF16: return S(static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]));
    case kF32: return S(static_cast<const float*>(base)[i]);
    default: return S(static_cast<const double*>(base)[i]);
  }
}

template <typename scalar_t, typename S = at::opmath_type<scalar_t>>
APL_HD S class_weight(const Args<scalar_t>& a, int64_t j) {
  return a.weight ? load_float<S>(a.weight, a.weight_type, j * a.weight_stride) : S(1);
}

// What label smoothing puts on label j: eps / K w[j] (apl_cpu.cpp's Coefficients::spread).
template <typename scalar_t, typename S = at::opmath_type<scalar_t>>
APL_HD S spread(const Args<scalar_t>& a, int64_t j) {
  return a.eps_over_k * class_weight(a, j);
}

// c[j] of row r: w[j] ((1 - eps) t[j]) + eps / K w[j] for probabilities, eps / K w[j] plus
// label_c = (1 - eps) w[y] at the label y for labels (reference.target_coefficients).
template <typename scalar_t, typename S = at::opmath_type<scalar_t>>
APL_HD S coefficient(const Args<scalar_t>& a, int64_t r, int j, int y, S label_c) {
  if (a.probabilities) {
    const S t = load_float<S>(a.probabilities, a.probability_type,
                              r * a.probability_row_stride + j * a.probability_col_stride);
    return a.keep * class_weight(a, j) * t + spread(a, j);
  }
  return j == y ? spread(a, j) + label_c : spread(a, j);
}

// Whether row z of the logits is read in vector loads.
template <typename scalar_t>
APL_HD bool vector_row(const Args<scalar_t>& a, const scalar_t* z) {
  return a.col_stride == 1 && aligned(z);
}

// The shared-memory rows of the group that plays row r in a block whose shared memory starts at
// `memory` (the block's rows are consecutive, a power of two of them): its logits, then
// (probability targets) its c; null where rows are not kept.
template <typename scalar_t>
APL_HD scalar_t* logits_cache(const Args<scalar_t>& a, unsigned char* memory, int64_t r) {
  const int64_t rows_per_block = kBlockThreads / a.group;
  return a.cache ? reinterpret_cast<scalar_t*>(memory) + (r & (rows_per_block - 1)) * a.cache_row : nullptr;
}

template <typename scalar_t, typename S = at::opmath_type<scalar_t>>
APL_HD S* coefficient_cache(const Args<scalar_t>& a, unsigned char* memory, int64_t r) {
  const int64_t rows_per_block = kBlockThreads / a.group;
  return a.cache && a.probabilities ? reinterpret_cast<S*>(memory + rows_per_block * a.cache_row * sizeof(scalar_t)) +
                                          (r & (rows_per_block - 1)) * a.cache_row
                                    : nullptr;
}

// ------------------------------------------------------------------ gradient

// The gradient's per-row coefficients (apl_cpu.cpp's pass 4), grad = sum_t coef_t V'_t - p H:
// dense rows coef_t = alpha_t + beta_t omega_t; one-hot rows, away from the label, off_label[t]
// (alpha_t, plus beta_t C for reverse terms) for the terms with a pass (`stored`) plus nce's alpha
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
      stored[t] = used && term_needs_pass(params.base[t], dense);
      alpha[t] = k.alpha[t];
      beta[t] = k.beta[t];
      off_label[t] = k.alpha[t] + (reverse ? k.beta[t] * total_c : S(0));
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
    g += coef * element<S, S>(base, p, lp, row, params, K).derivative;
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

template <class Group, typename scalar_t, typename S = at::opmath_type<scalar_t>>
APL_HD void gradient_pass(const Group& g, const Args<scalar_t>& a, int64_t r, const RowStats<S>& row,
                          const RowCoefs<S>& k, S total_c, S label_c, int y, int state) {
  const GradCoefs<S> gc(a.params, k, total_c, a.dense);
  if (a.dense) {
    gradient_loop<true>(g, a, r, row, gc, label_c, y, state);
  } else {
    gradient_loop<false>(g, a, r, row, gc, label_c, y, state);
  }
}

// ------------------------------------------------------------------ forward

// The one-hot sums of the terms that take no pass: omega = c is label_c at the label, 0 elsewhere.
template <typename S>
APL_HD void label_terms(const LossParams& params, S z_label, const RowStats<S>& row, S label_c, int64_t K,
                        TermSums<S>* sums) {
  const S lp = (z_label - row.max_z) - row.log_s;
  const S p = Math<S>::exp(lp);
APL_UNROLL
  for (int t = 0; t < kMaxTerms; ++t) {
    if (t >= params.num_terms || family_of(params.base[t]) == kReverse) continue;
    const Element<S> at = element<S, S>(params.base[t], p, lp, row, params, K);
    sums[t].weighted = label_c == S(0) ? S(0) : label_c * at.value;
    sums[t].weighted_derivative = label_c * at.derivative;
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
          const Element<S> el = element<S, S>(base, p, lp, row, a.params, span.K);
          S* s = part[i].v + 4 * t;  // weighted, weighted_derivative, plain, plain_derivative
          if (a.dense) {
            // A label of coefficient 0 adds nothing, even where V is infinite (a masked class).
            const S w = omega<S, S>(base, c, total_c);
            s[0] += w != S(0) ? w * el.value : S(0);
            s[1] += w * el.derivative;
          } else if (family == kReverse && j != y) {
            s[0] += total_c * el.value;
            s[1] += total_c * el.derivative;
          }
          if (family == kNormalized || family == kNegative) {
            s[2] += el.value;
            s[3] += el.derivative;
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
APL_HD RowRecord<S> make_record(int state, const RowStats<S>& row, S total_c, const RowCoefs<S>& k) {
  if (state == kZero) return {S(0), infinity<S>(), S(0), S(0), S(0), S(0), S(0), S(0)};  // log s = inf: zero
  if (state == kUndefined) {
    const S nan = quiet_nan<S>();
    return {nan, nan, nan, nan, nan, nan, nan, nan};
  }
  return {row.max_z, row.log_s, total_c, k.alpha[0], k.beta[0], k.alpha[1], k.beta[1], k.total_h};
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
  if (g.leader()) write_row(a, g.row(), k.value, make_record(kCounted, row, total_c, k));
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

// ------------------------------------------------------------------ backward

// Row r's gradient from its record, times the upstream gradient over the mean's divisor (the
// record after the last row), reading the row once. Nothing is branched on before the row's
// loads: the record, the label and the logits load together.
template <class Group, typename scalar_t, typename S = at::opmath_type<scalar_t>>
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
  k.scale_gradient((a.upstream ? a.upstream[r * a.upstream_stride] : S(1)) / a.records[a.rows].max_z);
  // One-hot rows: label_c = C. Smoothed labels: c[y] = spread + (1 - eps) w[y].
  const S label_c = !a.dense ? record.total_c : counted_label ? a.keep * class_weight(a, y) : S(0);
  gradient_pass(g, a, r, row, k, record.total_c, label_c, y, state);
}

// ------------------------------------------------------------------ launch plan (host)

struct Launch {
  int group;          // threads per row: 4, 32 or 512
  int64_t blocks;     // of kBlockThreads threads
  bool cache;         // rows kept in shared memory for the passes after the first
  int64_t cache_row;  // elements per cached row
  int64_t shared_memory;  // dynamic shared memory per block, bytes
};

// Threads per row from the row's units of V elements: 4 lanes for up to 16 units (K <= 64; 32 in
// float64), a warp for up to 512 (K <= 2048; 1024), else a block; `forced` (the emulation's tests)
// chooses instead. Rows read again after pass 1 (`second_read`) stay in shared memory when a
// block's rows fit in `shared_limit` bytes, moving a warp's rows to a block each where only that
// fits; longer rows are read again from memory.
inline Launch plan_launch(int64_t rows, int64_t K, int V, int element_size, int acc_size, bool second_read,
                          bool probabilities, int64_t shared_limit, int forced) {
  const int64_t units = (K + V - 1) / V;
  Launch l{};
  l.group = forced ? forced : units <= 16 ? 4 : units <= 512 ? kWarp : kBlockThreads;
  l.cache_row = units * V;  // whole packs: every row's cache is aligned
  const int64_t row_bytes = l.cache_row * (element_size + (probabilities ? acc_size : 0));
  const auto block_bytes = [&] { return kBlockThreads / l.group * row_bytes; };
  if (second_read && shared_limit > 0) {
    if (!forced && l.group < kBlockThreads && block_bytes() > shared_limit) l.group = kBlockThreads;
    l.cache = block_bytes() <= shared_limit;
  }
  l.shared_memory = l.cache ? block_bytes() : 0;
  const int64_t rows_per_block = kBlockThreads / l.group;
  l.blocks = std::max<int64_t>(1, (rows + rows_per_block - 1) / rows_per_block);
  return l;
}

inline int float_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kFloat: return kF32;
    default: return kF64;
  }
}

// The arguments every kernel of a call shares: inputs, loss parameters, targets.
template <typename scalar_t>
Args<scalar_t> input_args(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                          const OpCall& call) {
  using S = at::opmath_type<scalar_t>;
  Args<scalar_t> a{};
  a.logits = logits.const_data_ptr<scalar_t>();
  a.rows = logits.size(0);
  a.K = logits.size(1);
  a.row_stride = logits.stride(0);
  a.col_stride = logits.stride(1);
  if (call.probabilities) {
    a.probabilities = target.const_data_ptr();
    a.probability_type = float_type(target.scalar_type());
    a.probability_row_stride = target.stride(0);
    a.probability_col_stride = target.stride(1);
  } else {
    a.labels = target.const_data_ptr<int64_t>();
    a.label_stride = target.stride(0);
  }
  if (weight.has_value()) {
    a.weight = weight->const_data_ptr();
    a.weight_type = float_type(weight->scalar_type());
    a.weight_stride = weight->stride(0);
  }
  a.params = call.params;
  a.ignore_index = call.ignore_index;
  a.reduction = static_cast<int>(call.reduction);
  a.dense = call.dense;
  for (int t = 0; t < call.params.num_terms; ++t) a.needs_pass |= term_needs_pass(call.params.base[t], call.dense);
  a.keep = static_cast<S>(1 - call.params.label_smoothing);
  a.eps_over_k = static_cast<S>(call.params.label_smoothing / static_cast<double>(a.K));
  return a;
}

// A forward call on the host side: its arguments, launch, outputs and workspace (the counter,
// which the caller zeroes before the launch, then the blocks' partials). GRAD_IN_FORWARD keeps
// its records in `records` for the backward kernel that follows (finish_forward).
template <typename scalar_t>
struct ForwardCall {
  Args<scalar_t> args;
  Launch launch;
  at::Tensor loss, records, workspace;
};

template <typename scalar_t>
ForwardCall<scalar_t> prepare_forward(const at::Tensor& logits, const at::Tensor& target,
                                      const c10::optional<at::Tensor>& weight, const OpCall& call,
                                      int64_t shared_limit, int forced_group) {
  using S = at::opmath_type<scalar_t>;
  ForwardCall<scalar_t> f;
  Args<scalar_t>& a = f.args;
  a = input_args<scalar_t>(logits, target, weight, call);
  TORCH_CHECK_VALUE(a.K <= (int64_t(1) << 30), "apl: the CUDA kernels take at most 2^30 classes; got ", a.K);
  f.launch = plan_launch(a.rows, a.K, Pack<scalar_t>::kSize, sizeof(scalar_t), sizeof(S), a.needs_pass,
                         call.probabilities, shared_limit, forced_group);
  a.group = f.launch.group;
  a.blocks = f.launch.blocks;
  a.cache = f.launch.cache;
  a.cache_row = f.launch.cache_row;
  const auto acc_options = logits.options().dtype(accumulation_type(logits));
  f.loss = call.reduction == kNone ? at::empty({a.rows}, acc_options) : at::empty({}, acc_options);
  f.records = at::empty({call.grad_mode == kNoGrad ? 0 : a.rows + 1, kStats}, acc_options);
  if (call.grad_mode != kNoGrad) a.records = reinterpret_cast<RowRecord<S>*>(f.records.template mutable_data_ptr<S>());
  a.known_divisor = call.reduction != kMean ? S(1) : call.probabilities ? S(std::max<int64_t>(a.rows, 1)) : S(0);
  constexpr int64_t kHeader = 16;  // the counter
  f.workspace = at::empty({kHeader + a.blocks * static_cast<int64_t>(sizeof(Sums<S, 2>))},
                          logits.options().dtype(at::kByte));
  unsigned char* memory = f.workspace.template mutable_data_ptr<unsigned char>();
  a.counter = reinterpret_cast<unsigned*>(memory);
  a.partials = reinterpret_cast<Sums<S, 2>*>(memory + kHeader);
  if (call.reduction == kNone) {
    a.row_loss = f.loss.template mutable_data_ptr<S>();
  } else {
    a.loss = f.loss.template mutable_data_ptr<S>();
  }
  return f;
}

// A backward call on the host side; an undefined grad_loss is an upstream gradient of 1.
template <typename scalar_t>
struct BackwardCall {
  Args<scalar_t> args;
  Launch launch;
  at::Tensor grad, upstream;
};

template <typename scalar_t>
BackwardCall<scalar_t> prepare_backward(const at::Tensor& logits, const at::Tensor& target,
                                        const c10::optional<at::Tensor>& weight, const at::Tensor& stats,
                                        const at::Tensor& grad_loss, const OpCall& call, int forced_group) {
  using S = at::opmath_type<scalar_t>;
  BackwardCall<scalar_t> b;
  Args<scalar_t>& a = b.args;
  a = input_args<scalar_t>(logits, target, weight, call);
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == a.rows + 1 && stats.size(1) == kStats &&
                        stats.scalar_type() == accumulation_type(logits) && stats.is_contiguous() &&
                        stats.device() == logits.device(),
                    "apl: stats must be the forward's contiguous (rows + 1, ", kStats, ") ",
                    accumulation_type(logits), " tensor on the logits' device; got ", stats.scalar_type(),
                    " of shape ", stats.sizes(), " on ", stats.device());
  a.records = reinterpret_cast<RowRecord<S>*>(const_cast<S*>(stats.template const_data_ptr<S>()));
  if (grad_loss.defined()) {
    const bool reduced = call.reduction != kNone;
    TORCH_CHECK_VALUE(reduced ? grad_loss.numel() == 1 : grad_loss.dim() == 1 && grad_loss.size(0) == a.rows,
                      "apl: grad_loss must be a scalar for a reduced loss and (rows,) for reduction none; got "
                      "shape ", grad_loss.sizes());
    // A copy only where the upstream gradient is on another device or of another dtype.
    b.upstream = grad_loss.to(logits.device(), accumulation_type(logits));
    a.upstream = b.upstream.template const_data_ptr<S>();
    a.upstream_stride = reduced ? 0 : b.upstream.stride(0);
  }
  b.launch = plan_launch(a.rows, a.K, Pack<scalar_t>::kSize, sizeof(scalar_t), sizeof(S), false, false, 0,
                         forced_group);
  a.group = b.launch.group;
  a.blocks = b.launch.blocks;
  b.grad = at::empty(logits.sizes(), logits.options());
  a.grad = b.grad.template mutable_data_ptr<scalar_t>();
  return b;
}

// The op's forward for either executor (run_forward and run_backward launch, or emulate, a
// prepared call): NO_GRAD returns no gradient, GRAD_IN_BACKWARD the records, and GRAD_IN_FORWARD
// the gradient of the backward kernel run right away with an upstream gradient of 1.
template <typename scalar_t, class RunForward, class RunBackward>
std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& logits, const at::Tensor& target,
                                              const c10::optional<at::Tensor>& weight, const OpCall& call,
                                              int64_t shared_limit, int forced_group, RunForward run_forward,
                                              RunBackward run_backward) {
  const ForwardCall<scalar_t> f = prepare_forward<scalar_t>(logits, target, weight, call, shared_limit, forced_group);
  run_forward(f);
  if (call.grad_mode == kNoGrad) return {f.loss, at::empty({0}, logits.options())};
  if (call.grad_mode == kGradInBackward) return {f.loss, f.records};
  const BackwardCall<scalar_t> b =
      prepare_backward<scalar_t>(logits, target, weight, f.records, at::Tensor(), call, forced_group);
  run_backward(b);
  return {f.loss, b.grad};
}

}  // namespace gpu
}  // namespace apl
