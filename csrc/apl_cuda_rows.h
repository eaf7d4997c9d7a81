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
// This header holds what both kernels use (sums, a row's units, the arguments); the forward
// kernel's rows are apl_cuda_forward.h's, the gradient and the backward kernel's rows
// apl_cuda_backward.h's, the host's launch plan apl_cuda_launch.h's.
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
  bool target_grad; // the probability targets' gradient too (OpCall::target_grad)
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
  S* target_grad_out;  // (target_grad) the targets' gradient, (rows, K) in S
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

}  // namespace gpu
}  // namespace apl
