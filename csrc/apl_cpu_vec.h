// The CPU kernel's vector math: the Math specialization that instantiates apl_rowmath.h's element
// templates on at::vec vectors, exp of non-positive floats, and the blocked sums of a row.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <limits>
#include <type_traits>

#include "apl_op.h"

namespace apl {


template <typename T>
using Vec = at::vec::Vectorized<T>;

// exp(x) of float vectors for x <= 0, the only exponentials the kernel takes but those of exp_any
// (z - max, q lp, gamma log u, -p / a), in about half the instructions of Sleef's exp and as accurate
// (1.04 ulp at most with FMA, 1.3 in the portable build): x = n ln2 + r with n = round(x / ln2),
// |r| <= ln2 / 2 (ln2 in two parts, so r is exact), exp(r) by a degree-6 polynomial (relative error
// 2e-8, fitted to exp on that interval; exp(0) = 1 exactly), and 2^n applied as 2^(n+1) added to the
// exponent field, then a multiplication by 1/2 (which rounds a subnormal result correctly). Below
// -87.6 (results under 1e-38, smaller than the smallest normal float) the result is 0, as it is for
// -inf and for NaN, which no defined row reaches (see RowStats::defined). The integer arithmetic
// works on x clamped to [-88, 0], so that it never overflows: a positive x (only ever in the
// discarded padding lanes of a row's last vector) is read as 0.
inline Vec<float> exp_nonpositive(const Vec<float>& x) {
  using V = Vec<float>;
  constexpr float kLog2e = 1.44269504088896341f;
  // 1.5 * 2^23 + 1: adding it rounds to an integer, n + 1 in the low bits.
  constexpr float kRounder = 12582913.0f;
  constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860676533018690e-06f;
  constexpr float kSmallest = -87.6f;  // n >= -126: 2^(n+1) is a normal number
  const V clamped = at::vec::clamp(x, V(-88.0f), V(0.0f));
  const V rounded = at::vec::fmadd(clamped, V(kLog2e), V(kRounder));  // kRounder + n
  const V n = rounded - V(kRounder);
  const V r = at::vec::fmadd(n, V(-kLn2Lo), at::vec::fmadd(n, V(-kLn2Hi), clamped));
  V poly(0.0013843653723597527f);
  poly = at::vec::fmadd(poly, r, V(0.00837415549904108f));
  poly = at::vec::fmadd(poly, r, V(0.04166800156235695f));
  poly = at::vec::fmadd(poly, r, V(0.16666431725025177f));
  poly = at::vec::fmadd(poly, r, V(0.4999999403953552f));
  poly = at::vec::fmadd(poly, r, V(1.0f));
  poly = at::vec::fmadd(poly, r, V(1.0f));
  // n + 1 sits in the low bits of `rounded`: shifted into the exponent field and added to poly's
  // bits (poly is in [0.7, 1.5)), it multiplies poly by 2^(n+1).
  const Vec<int32_t> exponent = at::vec::cast<int32_t>(rounded) << Vec<int32_t>(23);
  const V result = at::vec::cast<float>(at::vec::cast<int32_t>(poly) + exponent) * V(0.5f);
  return result & (x >= V(kSmallest));  // a comparison gives all-ones lanes where true
}

// A mask of every lane, known at compile time: where(AllLanes{}, a, b) is a.
struct AllLanes {};

template <typename T>
struct Math<Vec<T>> {
  using V = Vec<T>;
  static V exp(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return exp_nonpositive(x);
    } else {
      return x.exp();
    }
  }
  static V exp_any(const V& x) { return x.exp(); }
  static V expm1(const V& x) { return x.expm1(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V sqrt(const V& x) { return x.sqrt(); }
  static V log(const V& x) { return x.log(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V where(const V& mask, const V& a, const V& b) { return V::blendv(b, a, mask); }
  static V where(AllLanes, const V& a, const V&) { return a; }
  static V ge(const V& a, const V& b) { return a >= b; }
  static V gt(const V& a, const V& b) { return a > b; }
  static V ne(const V& a, const V& b) { return a != b; }
  static V both(const V& a, const V& b) { return a & b; }
  static V both(AllLanes, const V& b) { return b; }
};


// Sums of many terms are taken in blocks: a block's sum is folded into the total every kBlockVectors
// vectors, so rounding grows with the block length plus the number of blocks instead of with K (a
// vocabulary-sized row in float32 loses ~1e-4 otherwise). ATen's reductions cascade for the same
// reason.
constexpr int kBlockVectors = 64;

template <typename T>
struct BlockedSum {
  T total{0}, block{0};
  int count = 0;
  void add(const T& x) {
    block = block + x;
    if (++count == kBlockVectors) {
      total = total + block;
      block = T(0);
      count = 0;
    }
  }
  T result() const { return total + block; }
};

template <typename acc_t>
acc_t horizontal_sum(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const Vec<acc_t>& a, const Vec<acc_t>& b) { return a + b; }, v);
}

template <typename acc_t>
acc_t horizontal_max(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vec<acc_t>& a, const Vec<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

// The first `count` lanes of a vector (all of them when count >= its size).
template <typename acc_t>
Vec<acc_t> lanes_below(int64_t count) {
  return Vec<acc_t>::arange(acc_t(0), acc_t(1)) < Vec<acc_t>(acc_t(count));
}

// Loads `count` elements (a row's last vector may be partial), padding with zeros.
template <typename acc_t>
Vec<acc_t> load(const acc_t* p, int64_t count) {
  return count >= Vec<acc_t>::size() ? Vec<acc_t>::loadu(p) : Vec<acc_t>::loadu(p, count);
}

// A term's sums over a row (TermSums of apl_rowmath.h) as vectors, in blocks.
template <typename acc_t>
struct VectorSums {
  using V = Vec<acc_t>;
  BlockedSum<V> weighted, weighted_derivative, plain, plain_derivative;
  TermSums<acc_t> result() const {
    return {horizontal_sum(weighted.result()), horizontal_sum(weighted_derivative.result()),
            horizontal_sum(plain.result()), horizontal_sum(plain_derivative.result())};
  }
};

}  // namespace apl
