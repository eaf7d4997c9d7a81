// The fused losses on CPU, and the op's schema.
//
// Rows are cut into blocks whose length depends on K only; blocks run in parallel
// (at::parallel_for) and each adds up its rows' losses, so a reduced loss is the
// same whatever the number of threads. Each row is read from memory once: pass 1
// takes its max (converting the row to the accumulation type first if it is
// strided or of a half type), pass 2 stores e = exp(z - max) in a scratch row and
// sums it and z - max, pass 3 (only rce/nrce, ngce, nfl) gathers the sums of
// apl_rowmath.h and keeps the element terms, pass 4 writes the gradient. Passes
// 2-4 work on the row in L1 cache, in at::vec vectors: the element math of
// apl_rowmath.h is written once as templates and instantiated here on vectors
// (through the Math specialization below), on scalars by the CUDA kernel.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "apl_op.h"

namespace apl {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// exp(x) of float vectors for x <= 0, the only exponentials the kernel takes
// (z - max, q lp, gamma log u), in about half the instructions of Sleef's exp and
// as accurate (1.04 ulp at most with FMA, 1.3 in the portable build): x = n ln2 + r
// with n = round(x / ln2), |r| <= ln2 / 2 (ln2 in two parts, so r is exact),
// exp(r) by a degree-6 polynomial (relative error 2e-8, fitted to exp on that
// interval; exp(0) = 1 exactly), and 2^n applied as 2^(n+1) added to the exponent
// field, then a multiplication by 1/2 (which rounds a subnormal result correctly).
// Below -87.6 (results under 1e-38, smaller than the smallest normal float) the
// result is 0, as it is for -inf and for NaN, which no defined row reaches (see
// row_defined). The integer arithmetic works on x clamped to [-88, 0], so that it
// never overflows: a positive x (only ever in the discarded padding lanes of a
// row's last vector) is read as 0.
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
  // n + 1 sits in the low bits of `rounded`: shifted into the exponent field and
  // added to poly's bits (poly is in [0.7, 1.5)), it multiplies poly by 2^(n+1).
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
  static V sqrt(const V& x) { return x.sqrt(); }
  static V log(const V& x) { return x.log(); }
  static V where(const V& mask, const V& a, const V& b) { return V::blendv(b, a, mask); }
  static V where(AllLanes, const V& a, const V&) { return a; }
  static V ge(const V& a, const V& b) { return a >= b; }
  static V gt(const V& a, const V& b) { return a > b; }
  static V both(const V& a, const V& b) { return a & b; }
};

namespace {

// Sums of many terms are taken in blocks: a block's sum is folded into the total
// every kBlockVectors vectors, so rounding grows with the block length plus the
// number of blocks instead of with K (a vocabulary-sized row in float32 loses
// ~1e-4 otherwise). ATen's reductions cascade for the same reason.
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

// Calls f(std::integral_constant<int, needs>{}): the passes that depend on which
// sums a loss needs are compiled once per combination, without the others' code.
template <typename F>
auto with_needs(int needs, F&& f) {
  switch (needs) {
    case 0: return f(std::integral_constant<int, 0>{});
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    default: return f(std::integral_constant<int, 7>{});
  }
}

// The passes over one row of K contiguous acc_t, with scratch rows of whole
// vectors: a copy of the row (for callers that must convert it), e = exp(z - max),
// and the element terms the gradient pass needs.
template <typename acc_t>
class RowKernel {
 public:
  using V = Vec<acc_t>;
  static constexpr int64_t kLanes = V::size();

  RowKernel(int64_t K, const LossParams& params, acc_t grad_scale)
      : K_(K),
        params_(params),
        needs_(row_needs(params)),
        grad_scale_(grad_scale),
        padded_((K + kLanes - 1) / kLanes * kLanes),
        scratch_(4 * padded_) {}

  // Where a caller may convert a row to acc_t, and where the gradient may be
  // written (over e: each vector is read before it is written).
  acc_t* input_row() { return scratch_.data(); }
  acc_t* gradient_row() { return e(); }

  // The loss of row z with label y in [0, K); its gradient (times grad_scale) goes
  // to grad unless that is null.
  acc_t operator()(const acc_t* z, int64_t y, acc_t* grad) {
    const int64_t K = K_, full = K / kLanes * kLanes, tail = K - full;
    const V zero(acc_t(0)), minus_inf(-std::numeric_limits<acc_t>::infinity());
    acc_t* e = this->e();
    // Pass 1: the max (NaN if a logit is NaN).
    V max_v = minus_inf;
    for (int64_t i = 0; i < full; i += kLanes) max_v = at::vec::maximum(max_v, V::loadu(z + i));
    if (tail) max_v = at::vec::maximum(max_v, V::blendv(minus_inf, V::loadu(z + full, tail), lanes_below<acc_t>(tail)));
    RowSums<acc_t> sums;
    sums.max_z = horizontal_max(max_v);
    // Pass 2: e = exp(z - max), s = sum e, and sum (z - max); e is 0 past K.
    const V max_vec(sums.max_z);
    BlockedSum<V> s_v, shifted_v;
    for (int64_t i = 0; i < full; i += kLanes) {
      const V shifted = V::loadu(z + i) - max_vec;
      const V x = Math<V>::exp(shifted);
      x.store(e + i);
      s_v.add(x);
      shifted_v.add(shifted);
    }
    if (tail) {
      const V counted = lanes_below<acc_t>(tail);
      const V shifted = V::blendv(zero, V::loadu(z + full, tail) - max_vec, counted);
      const V x = V::blendv(zero, Math<V>::exp(shifted), counted);
      x.store(e + full);
      s_v.add(x);
      shifted_v.add(shifted);
    }
    const acc_t s = horizontal_sum(s_v.result());
    set_sum_exp(sums, s);
    sums.sum_shifted = horizontal_sum(shifted_v.result());
    if (!row_defined(sums)) {
      constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
      if (grad) std::fill(grad, grad + K, kNaN);
      return kNaN;
    }
    return with_needs(needs_, [&](auto needs) { return finish<decltype(needs)::value>(z, y, grad, sums, s); });
  }

 private:
  acc_t* e() { return scratch_.data() + padded_; }
  acc_t* powered_masked() { return scratch_.data() + 2 * padded_; }
  acc_t* focal_derivative() { return scratch_.data() + 3 * padded_; }

  // Pass 3 (the sums kNeeds asks for) and pass 4 (the gradient) of a defined row.
  template <int kNeeds>
  acc_t finish(const acc_t* z, int64_t y, acc_t* grad, RowSums<acc_t>& sums, acc_t s) {
    const int64_t K = K_;
    const V zero(acc_t(0)), max_vec(sums.max_z), log_s_v(sums.log_s);
    const acc_t inv_s = acc_t(1) / s;
    const V inv_s_v(inv_s);
    const acc_t* e = this->e();
    acc_t* powered_masked = this->powered_masked();
    acc_t* focal_derivative = this->focal_derivative();
    if constexpr (kNeeds != 0) {
      // Pass 3. Only the vector holding the label and a partial last vector need masks.
      const V lane_index = V::arange(acc_t(0), acc_t(1));
      ElementSums<V, acc_t> total, block;
      int blocked = 0;
      for (int64_t i = 0; i < K; i += kLanes) {
        const int64_t count = std::min(kLanes, K - i);
        const V p = V::loadu(e + i) * inv_s_v;
        const ElementTerms<V> terms =
            element_terms<V, acc_t>(kNeeds, p, (load(z + i, count) - max_vec) - log_s_v, sums, params_);
        if (count == kLanes && (y < i || y >= i + kLanes)) {
          block.add(kNeeds, p, terms, AllLanes{}, AllLanes{});
        } else {
          const V counted = lanes_below<acc_t>(count);
          block.add(kNeeds, p, terms, counted, counted & (lane_index != V(acc_t(y - i))));
        }
        if (++blocked == kBlockVectors) {
          total.merge(block);
          block = ElementSums<V, acc_t>();
          blocked = 0;
        }
        if (grad && (kNeeds & kNeedPowered)) terms.powered_masked.store(powered_masked + i);
        if (grad && (kNeeds & kNeedFocal)) terms.focal_derivative.store(focal_derivative + i);
      }
      total.merge(block);
      sums.off_clamped = horizontal_sum(total.off_clamped);
      sums.off_masked = horizontal_sum(total.off_masked);
      sums.powered = horizontal_sum(total.powered);
      sums.powered_masked = horizontal_sum(total.powered_masked);
      sums.focal = horizontal_sum(total.focal);
      sums.focal_derivative = horizontal_sum(total.focal_derivative);
    }
    const acc_t p_label = e[y] * inv_s;
    const RowGrad<acc_t> g = scaled(row_grad<acc_t>(params_, sums, z[y], p_label, K), grad_scale_);
    if (!grad) return g.value;
    // Pass 4: the gradient.
    for (int64_t i = 0; i < K; i += kLanes) {
      const ElementTerms<V> terms{zero, kNeeds & kNeedPowered ? V::loadu(powered_masked + i) : zero, zero,
                                  kNeeds & kNeedFocal ? V::loadu(focal_derivative + i) : zero};
      const V value = element_grad<V, acc_t>(kNeeds, V::loadu(e + i) * inv_s_v, terms, g);
      if (i + kLanes <= K) {
        value.store(grad + i);
      } else {
        value.store(grad + i, K - i);
      }
    }
    const ElementTerms<acc_t> label_terms{0, powered_masked[y], 0, focal_derivative[y]};
    grad[y] = element_grad<acc_t, acc_t>(kNeeds & ~kNeedOffLabel, p_label, label_terms, g) + g.at_label;
    return g.value;
  }

  int64_t K_;
  LossParams params_;
  int needs_;
  acc_t grad_scale_;
  int64_t padded_;
  std::vector<acc_t> scratch_;
};

// Rows per block: about kBlockElements logits. Threads take whole blocks, so blocks
// are kept small enough to share out evenly even when a batch is small.
constexpr int64_t kBlockElements = 4096;

// Every row's loss (into row_loss unless it is null) and gradient (into grad unless
// it is empty); returns the sum of the row losses. Rows go in blocks of a length
// that depends on K only, each block's sum taken in order and the blocks' sums
// added in order: the same result for any number of threads.
template <typename scalar_t>
double loss_rows_cpu(const at::Tensor& logits, const int64_t* target, const OpCall& call, double grad_scale,
                     at::opmath_type<scalar_t>* row_loss, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t rows = logits.size(0), K = logits.size(1);
  const int64_t row_stride = logits.stride(0), col_stride = logits.stride(1);
  const scalar_t* logits_data = logits.const_data_ptr<scalar_t>();
  scalar_t* grad_out = grad.numel() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t rows_per_block = std::max<int64_t>(1, kBlockElements / K);
  const int64_t num_blocks = (rows + rows_per_block - 1) / rows_per_block;
  std::vector<double> block_sums(num_blocks);
  at::parallel_for(0, num_blocks, 1, [&](int64_t first_block, int64_t end_block) {
    RowKernel<acc_t> kernel(K, call.params, static_cast<acc_t>(grad_scale));
    for (int64_t b = first_block; b < end_block; ++b) {
      double block_sum = 0;
      for (int64_t r = b * rows_per_block; r < std::min(rows, (b + 1) * rows_per_block); ++r) {
        scalar_t* grad_row = grad_out ? grad_out + r * K : nullptr;
        const int64_t y = target[r];
        acc_t loss = 0;
        if (y == call.ignore_index) {
          if (grad_row) std::fill(grad_row, grad_row + K, scalar_t(0));
        } else {
          // The row as contiguous acc_t: in place, or converted.
          const scalar_t* row = logits_data + r * row_stride;
          const acc_t* z = kernel.input_row();
          if constexpr (kSameType) {
            if (col_stride == 1) z = row;
          }
          if (z == kernel.input_row()) {
            if (col_stride == 1) {
              at::vec::convert(row, kernel.input_row(), K);
            } else {
              for (int64_t i = 0; i < K; ++i) kernel.input_row()[i] = static_cast<acc_t>(row[i * col_stride]);
            }
          }
          acc_t* grad_acc = nullptr;
          if (grad_row) {
            if constexpr (kSameType) {
              grad_acc = grad_row;
            } else {
              grad_acc = kernel.gradient_row();
            }
          }
          loss = kernel(z, y, grad_acc);
          if constexpr (!kSameType) {
            if (grad_row) at::vec::convert(grad_acc, grad_row, K);
          }
        }
        if (row_loss) row_loss[r] = loss;
        block_sum += loss;
      }
      block_sums[b] = block_sum;
    }
  });
  double total = 0;
  for (const double block_sum : block_sums) total += block_sum;
  return total;
}

std::tuple<at::Tensor, at::Tensor> fused_loss_cpu(const at::Tensor& logits, const at::Tensor& target_in,
                                                  at::IntArrayRef bases, at::ArrayRef<double> coefficients,
                                                  at::IntArrayRef options) {
  const OpCall call = decode_call(logits, target_in, bases, coefficients, options);
  const at::Tensor target = target_in.contiguous();
  const int64_t* labels = target.const_data_ptr<int64_t>();
  const int64_t K = logits.size(1);
  // Every label is checked before any logit is read.
  int64_t counted = 0;
  for (int64_t r = 0; r < target.size(0); ++r) {
    const int64_t y = labels[r];
    if (y == call.ignore_index) continue;
    TORCH_CHECK_VALUE(y >= 0 && y < K, "target ", y, " at flat position ", r, " is outside [0, ", K,
                      ") and is not ignore_index (", call.ignore_index, ")");
    ++counted;
  }
  at::Tensor grad = empty_grad(logits, call.compute_grad);
  const auto loss_options = logits.options().dtype(accumulation_type(logits));
  at::Tensor loss = call.reduction == kNone ? at::empty({logits.size(0)}, loss_options) : at::empty({}, loss_options);
  const double divisor = static_cast<double>(std::max<int64_t>(counted, 1));  // a mean's; 0 / 1 when all ignored
  const double grad_scale = call.reduction == kMean ? 1.0 / divisor : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_fused_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* row_loss = call.reduction == kNone ? loss.mutable_data_ptr<acc_t>() : nullptr;
    const double total = loss_rows_cpu<scalar_t>(logits, labels, call, grad_scale, row_loss, grad);
    if (call.reduction != kNone) {
      *loss.mutable_data_ptr<acc_t>() = static_cast<acc_t>(call.reduction == kMean ? total / divisor : total);
    }
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY(apl, m) {
  m.def("fused_loss(Tensor logits, Tensor target, int[] bases, float[] coefficients, int[] options) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(apl, CPU, m) { m.impl("fused_loss", &fused_loss_cpu); }

}  // namespace apl
