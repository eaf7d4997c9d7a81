// The fused losses on CPU, and the op's schema.
//
// Rows run in parallel (at::parallel_for). Each row is read from memory once:
// pass 1 takes its max (converting it to the accumulation type first if it is
// strided or of a half type), pass 2 stores exp(z - max) and sums it and z - max,
// pass 3 (only for rce/nrce, ngce, nfl) gathers the sums of apl_rowmath.h and
// keeps the element terms, pass 4 writes the gradient. Passes 2-4 work on data
// in cache, in at::vec vectors: the element math of apl_rowmath.h is written
// once as templates and instantiated here on vectors (through the Math
// specialization below), on scalars by the CUDA kernel.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "apl_op.h"

namespace apl {

template <typename T>
struct Math<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V exp(const V& x) { return x.exp_u20(); }
  static V expm1(const V& x) { return x.expm1(); }
  static V pow(const V& x, const V& e) { return x.pow(e); }
  static V sqrt(const V& x) { return x.sqrt(); }
  static V log(const V& x) { return x.log(); }
  static bool any(const V& mask) { return mask.zero_mask() != (1 << V::size()) - 1; }
  static V where(const V& mask, const V& a, const V& b) { return V::blendv(b, a, mask); }
  static V ge(const V& a, const V& b) { return a >= b; }
  static V gt(const V& a, const V& b) { return a > b; }
  static V both(const V& a, const V& b) { return a & b; }
};

namespace {

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

template <typename acc_t>
acc_t horizontal_sum(const Vec<acc_t>& v) {
  acc_t lanes[Vec<acc_t>::size()];
  v.store(lanes);
  acc_t total = 0;
  for (int i = 0; i < Vec<acc_t>::size(); ++i) total += lanes[i];
  return total;
}

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

// A row is walked in vectors; the last may be partial (`count` lanes): loads pad
// it, `lanes_below(count)` masks its sums, stores write `count` lanes.
template <typename acc_t>
Vec<acc_t> lanes_below(int64_t count) {
  return Vec<acc_t>::arange(acc_t(0), acc_t(1)) < Vec<acc_t>(acc_t(count));
}

template <typename acc_t>
Vec<acc_t> load(const acc_t* p, int64_t count) {
  return count == Vec<acc_t>::size() ? Vec<acc_t>::loadu(p) : Vec<acc_t>::loadu(p, count);
}

struct RowsArgs {
  const at::Tensor& logits;
  const int64_t* target;
  const LossParams& params;
  int64_t ignore_index;
  double grad_scale;  // 1 / (non-ignored rows) for mean, else 1
};

template <typename scalar_t>
void loss_rows_cpu(const RowsArgs& args, at::Tensor& row_loss, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t kLanes = V::size();
  const int64_t rows = args.logits.size(0), K = args.logits.size(1);
  const int64_t row_stride = args.logits.stride(0), col_stride = args.logits.stride(1);
  const scalar_t* logits = args.logits.const_data_ptr<scalar_t>();
  acc_t* loss_out = row_loss.mutable_data_ptr<acc_t>();
  scalar_t* grad_out = grad.numel() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  const LossParams params = args.params;
  const int needs = row_needs(params);
  const acc_t scale = static_cast<acc_t>(args.grad_scale);
  const V minus_inf(-std::numeric_limits<acc_t>::infinity()), zero(0), all_lanes = zero == zero;
  // Chunks of rows big enough to amortize a thread; they share one scratch buffer.
  const int64_t grain = std::max<int64_t>(1, 32768 / K);

  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // The row in the accumulation type, exp(z - max), and the element terms kept
    // for the gradient pass; padded to whole vectors.
    const int64_t padded = (K + kLanes - 1) / kLanes * kLanes;
    std::vector<acc_t> scratch(4 * padded);
    acc_t* z_copy = scratch.data();
    acc_t* e = scratch.data() + padded;
    acc_t* powered_masked = scratch.data() + 2 * padded;
    acc_t* focal_derivative = scratch.data() + 3 * padded;
    const bool keep_terms = grad_out != nullptr;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = args.target[r];
      scalar_t* grad_row = grad_out ? grad_out + r * K : nullptr;
      if (y == args.ignore_index) {
        loss_out[r] = 0;
        if (grad_row) std::fill(grad_row, grad_row + K, scalar_t(0));
        continue;
      }
      // Pass 1: the row in the accumulation type, its max and its sum.
      const scalar_t* row = logits + r * row_stride;
      const acc_t* z = z_copy;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (col_stride == 1) z = row;
      }
      if (z == z_copy) {
        for (int64_t i = 0; i < K; ++i) z_copy[i] = static_cast<acc_t>(row[i * col_stride]);
      }
      V max_v = minus_inf;
      for (int64_t i = 0; i < K; i += kLanes) {
        const int64_t count = std::min(kLanes, K - i);
        const V x = load(z + i, count);
        max_v = at::vec::maximum(max_v, count == kLanes ? x : V::blendv(minus_inf, x, lanes_below<acc_t>(count)));
      }
      const acc_t max_z = at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return at::vec::maximum(a, b); }, max_v);
      // Pass 2: e = exp(z - max), s = sum e, and sum (z - max).
      const V max_vec(max_z);
      BlockedSum<V> s_v, shifted_v;
      for (int64_t i = 0; i < K; i += kLanes) {
        const int64_t count = std::min(kLanes, K - i);
        V shifted = load(z + i, count) - max_vec;
        V x = Math<V>::exp(shifted);
        if (count < kLanes) {
          x = V::blendv(zero, x, lanes_below<acc_t>(count));
          shifted = V::blendv(zero, shifted, lanes_below<acc_t>(count));
        }
        x.store(e + i);
        s_v.add(x);
        shifted_v.add(shifted);
      }
      const acc_t s = horizontal_sum(s_v.result());
      RowSums<acc_t> sums;
      sums.max_z = max_z;
      sums.log_s = std::log(s);
      sums.sum_shifted = horizontal_sum(shifted_v.result());
      const acc_t inv_s = acc_t(1) / s;
      const V inv_s_v(inv_s), log_s_v(sums.log_s);
      if (!row_defined(sums)) {
        loss_out[r] = std::numeric_limits<acc_t>::quiet_NaN();
        if (grad_row) std::fill(grad_row, grad_row + K, scalar_t(std::numeric_limits<acc_t>::quiet_NaN()));
        continue;
      }
      // Pass 3: the sums some losses need; the label's element is never off-label.
      if (needs) {
        ElementSums<V, acc_t> total, block;
        int blocked = 0;
        for (int64_t i = 0; i < K; i += kLanes) {
          const int64_t count = std::min(kLanes, K - i);
          const V p = V::loadu(e + i) * inv_s_v;
          const ElementTerms<V> terms = element_terms<V, acc_t>(needs, p, (load(z + i, count) - max_vec) - log_s_v, params);
          const V counted = count < kLanes ? lanes_below<acc_t>(count) : all_lanes;
          V off_label = counted;
          if (y >= i && y < i + kLanes) {
            off_label = off_label & (V::arange(acc_t(0), acc_t(1)) != V(acc_t(y - i)));
          }
          block.add(needs, p, terms, counted, off_label);
          if (++blocked == kBlockVectors) {
            total.merge(block);
            block = ElementSums<V, acc_t>();
            blocked = 0;
          }
          if (keep_terms && (needs & kNeedPowered)) terms.powered_masked.store(powered_masked + i);
          if (keep_terms && (needs & kNeedFocal)) terms.focal_derivative.store(focal_derivative + i);
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
      const RowGrad<acc_t> g = row_grad<acc_t>(params, sums, z[y], p_label, K);
      loss_out[r] = g.value;
      if (!grad_row) continue;
      // Pass 4: the gradient, written over e (each vector is read before it is written).
      acc_t* grad_acc;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        grad_acc = grad_row;
      } else {
        grad_acc = e;
      }
      const V scale_v(scale);
      for (int64_t i = 0; i < K; i += kLanes) {
        const int64_t count = std::min(kLanes, K - i);
        const ElementTerms<V> terms{zero, needs & kNeedPowered ? V::loadu(powered_masked + i) : zero, zero,
                                    needs & kNeedFocal ? V::loadu(focal_derivative + i) : zero};
        const V value = element_grad<V, acc_t>(needs, V::loadu(e + i) * inv_s_v, terms, g) * scale_v;
        if (count == kLanes) {
          value.store(grad_acc + i);
        } else {
          value.store(grad_acc + i, count);
        }
      }
      const ElementTerms<acc_t> label_terms{0, powered_masked[y], 0, focal_derivative[y]};
      grad_acc[y] = (element_grad<acc_t, acc_t>(needs & ~kNeedOffLabel, p_label, label_terms, g) + g.at_label) * scale;
      if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(grad_acc, grad_row, K);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fused_loss_cpu(const at::Tensor& logits, const at::Tensor& target_in,
                                                  at::IntArrayRef bases, at::ArrayRef<double> weights, double gamma,
                                                  double q, bool official_grad, int64_t ignore_index,
                                                  int64_t reduction, bool compute_grad) {
  check_inputs(logits, target_in, reduction);
  const LossParams params = make_params(bases, weights, gamma, q, official_grad);
  const at::Tensor target = target_in.contiguous();
  const int64_t* labels = target.const_data_ptr<int64_t>();
  const int64_t K = logits.size(1);
  // Every label is checked before any logit is read.
  int64_t counted = 0;
  for (int64_t r = 0; r < target.size(0); ++r) {
    const int64_t y = labels[r];
    if (y == ignore_index) continue;
    TORCH_CHECK_VALUE(y >= 0 && y < K, "target ", y, " at flat position ", r, " is outside [0, ", K,
                      ") and is not ignore_index (", ignore_index, ")");
    ++counted;
  }
  auto [row_loss, grad] = empty_outputs(logits, compute_grad);
  const double divisor = static_cast<double>(std::max<int64_t>(counted, 1));  // a mean's; 0 / 1 when all ignored
  const double grad_scale = reduction == kMean ? 1.0 / divisor : 1.0;
  const RowsArgs args{logits, labels, params, ignore_index, grad_scale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_fused_loss_cpu",
                                  [&] { loss_rows_cpu<scalar_t>(args, row_loss, grad); });
  return reduce_rows(row_loss, grad, reduction, divisor);
}

}  // namespace

TORCH_LIBRARY(apl, m) {
  m.def(
      "fused_loss(Tensor logits, Tensor target, int[] bases, float[] weights, float gamma, float q, "
      "bool official_grad, int ignore_index, int reduction, bool compute_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(apl, CPU, m) { m.impl("fused_loss", &fused_loss_cpu); }

}  // namespace apl
