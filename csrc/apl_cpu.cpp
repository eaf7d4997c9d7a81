// The fused losses on CPU, and the op's schema.
//
// Rows run in parallel (at::parallel_for). Each row is read from memory once:
// pass 1 converts it to the accumulation type while taking its max and sum,
// pass 2 stores exp(z - max) and sums it, pass 3 (only for rce/nrce, ngce, nfl)
// gathers the sums of apl_rowmath.h, pass 4 writes the gradient. Passes 2-4
// work on the row's copy in cache, in at::vec vectors: the element math of
// apl_rowmath.h is written once as templates and instantiated here on vectors
// (through the Math specialization below) and on scalars for the tails.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "apl_op.h"

namespace apl {

template <typename T>
struct Math<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V exp(const V& x) { return x.exp(); }
  static V expm1(const V& x) { return x.expm1(); }
  static V pow(const V& x, const V& e) { return x.pow(e); }
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

// Adds the sums that `needs` asks for over elements [begin, end) of a row, and
// stores the element terms the gradient pass reads back (when it will).
template <typename acc_t>
void add_sums(RowSums<acc_t>& sums, int needs, const acc_t* z, const acc_t* e, acc_t inv_s, int64_t begin,
              int64_t end, const LossParams& params, acc_t* powered_masked, acc_t* focal_derivative) {
  using V = Vec<acc_t>;
  ElementSums<V, acc_t> vector_sums, block_sums;
  ElementSums<acc_t, acc_t> scalar_sums;
  const V inv_s_v(inv_s), lse_v(sums.lse);
  int64_t i = begin;
  int count = 0;
  for (; i + V::size() <= end; i += V::size()) {
    const V p = V::loadu(e + i) * inv_s_v;
    const ElementTerms<V> terms = element_terms<V, acc_t>(needs, p, V::loadu(z + i) - lse_v, params);
    block_sums.add(needs, p, terms);
    if (++count == kBlockVectors) {
      vector_sums.merge(block_sums);
      block_sums = ElementSums<V, acc_t>();
      count = 0;
    }
    if (powered_masked) terms.powered_masked.store(powered_masked + i);
    if (focal_derivative) terms.focal_derivative.store(focal_derivative + i);
  }
  for (; i < end; ++i) {
    const acc_t p = e[i] * inv_s;
    const ElementTerms<acc_t> terms = element_terms<acc_t, acc_t>(needs, p, z[i] - sums.lse, params);
    scalar_sums.add(needs, p, terms);
    if (powered_masked) powered_masked[i] = terms.powered_masked;
    if (focal_derivative) focal_derivative[i] = terms.focal_derivative;
  }
  vector_sums.merge(block_sums);
  sums.off_clamped += horizontal_sum(vector_sums.off_clamped) + scalar_sums.off_clamped;
  sums.off_masked += horizontal_sum(vector_sums.off_masked) + scalar_sums.off_masked;
  sums.powered += horizontal_sum(vector_sums.powered) + scalar_sums.powered;
  sums.powered_masked += horizontal_sum(vector_sums.powered_masked) + scalar_sums.powered_masked;
  sums.focal += horizontal_sum(vector_sums.focal) + scalar_sums.focal;
  sums.focal_derivative += horizontal_sum(vector_sums.focal_derivative) + scalar_sums.focal_derivative;
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
  const int64_t rows = args.logits.size(0), K = args.logits.size(1);
  const int64_t row_stride = args.logits.stride(0), col_stride = args.logits.stride(1);
  const scalar_t* logits = args.logits.const_data_ptr<scalar_t>();
  acc_t* loss_out = row_loss.mutable_data_ptr<acc_t>();
  scalar_t* grad_out = grad.numel() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  const LossParams params = args.params;
  const int needs = row_needs(params);
  const acc_t scale = static_cast<acc_t>(args.grad_scale);
  // Rows of a chunk share one scratch buffer; chunks are big enough to amortize the threads.
  const int64_t grain = std::max<int64_t>(1, 32768 / K);

  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // The row's copy, exp(z - max), and the element terms kept for the gradient pass.
    std::vector<acc_t> scratch(4 * K);
    acc_t* z_copy = scratch.data();
    acc_t* e = scratch.data() + K;
    acc_t* powered_masked = grad_out && (needs & kNeedPowered) ? scratch.data() + 2 * K : nullptr;
    acc_t* focal_derivative = grad_out && (needs & kNeedFocal) ? scratch.data() + 3 * K : nullptr;
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
      const acc_t* z;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (col_stride == 1) {
          z = row;
        } else {
          for (int64_t i = 0; i < K; ++i) z_copy[i] = row[i * col_stride];
          z = z_copy;
        }
      } else {
        for (int64_t i = 0; i < K; ++i) z_copy[i] = static_cast<acc_t>(row[i * col_stride]);
        z = z_copy;
      }
      V max_v(-std::numeric_limits<acc_t>::infinity());
      BlockedSum<V> sum_z_v;
      int64_t i = 0;
      for (; i + V::size() <= K; i += V::size()) {
        const V x = V::loadu(z + i);
        max_v = at::vec::maximum(max_v, x);
        sum_z_v.add(x);
      }
      acc_t max_z = at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return at::vec::maximum(a, b); }, max_v);
      acc_t sum_z = horizontal_sum(sum_z_v.result());
      for (; i < K; ++i) {
        max_z = (z[i] > max_z || std::isnan(z[i])) ? z[i] : max_z;  // NaN propagates, as in maximum
        sum_z += z[i];
      }
      // Pass 2: e = exp(z - max), s = sum e.
      const V max_vec(max_z);
      BlockedSum<V> s_v;
      i = 0;
      for (; i + V::size() <= K; i += V::size()) {
        const V x = (V::loadu(z + i) - max_vec).exp();
        x.store(e + i);
        s_v.add(x);
      }
      acc_t s = horizontal_sum(s_v.result());
      for (; i < K; ++i) {
        e[i] = std::exp(z[i] - max_z);
        s += e[i];
      }
      RowSums<acc_t> sums;
      sums.lse = max_z + std::log(s);
      sums.sum_z = sum_z;
      const acc_t inv_s = acc_t(1) / s;
      // Pass 3: the sums some losses need; the label's element is never off-label.
      if (needs) {
        add_sums(sums, needs, z, e, inv_s, 0, y, params, powered_masked, focal_derivative);
        add_sums(sums, needs & ~kNeedOffLabel, z, e, inv_s, y, y + 1, params, powered_masked, focal_derivative);
        add_sums(sums, needs, z, e, inv_s, y + 1, K, params, powered_masked, focal_derivative);
      }
      const RowGrad<acc_t> g = row_grad<acc_t>(params, sums, z[y], K);
      loss_out[r] = g.value;
      if (!grad_row) continue;
      // Pass 4: the gradient, written over e (each element is read before it is written).
      acc_t* grad_acc;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        grad_acc = grad_row;
      } else {
        grad_acc = e;
      }
      const acc_t p_label = e[y] * inv_s;  // before e is overwritten
      const V scale_v(scale), inv_s_v(inv_s), zero_v(0);
      i = 0;
      for (; i + V::size() <= K; i += V::size()) {
        const ElementTerms<V> terms{zero_v, powered_masked ? V::loadu(powered_masked + i) : zero_v, zero_v,
                                    focal_derivative ? V::loadu(focal_derivative + i) : zero_v};
        (element_grad<V, acc_t>(needs, V::loadu(e + i) * inv_s_v, terms, g) * scale_v).store(grad_acc + i);
      }
      for (; i < K; ++i) {
        const ElementTerms<acc_t> terms{0, powered_masked ? powered_masked[i] : acc_t(0), 0,
                                        focal_derivative ? focal_derivative[i] : acc_t(0)};
        grad_acc[i] = element_grad<acc_t, acc_t>(needs, e[i] * inv_s, terms, g) * scale;
      }
      {
        const ElementTerms<acc_t> terms{0, powered_masked ? powered_masked[y] : acc_t(0), 0,
                                        focal_derivative ? focal_derivative[y] : acc_t(0)};
        grad_acc[y] = (element_grad<acc_t, acc_t>(needs & ~kNeedOffLabel, p_label, terms, g) + g.at_label) * scale;
      }
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
    TORCH_CHECK(y >= 0 && y < K, "apl: target ", y, " at row ", r, " is outside [0, ", K,
                ") and is not ignore_index (", ignore_index, ")");
    ++counted;
  }
  auto [row_loss, grad] = empty_outputs(logits, compute_grad);
  const double grad_scale = reduction == kMean ? 1.0 / static_cast<double>(std::max<int64_t>(counted, 1)) : 1.0;
  const RowsArgs args{logits, labels, params, ignore_index, grad_scale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_fused_loss_cpu",
                                  [&] { loss_rows_cpu<scalar_t>(args, row_loss, grad); });
  if (reduction == kNone) return {row_loss, grad};
  at::Tensor total = row_loss.sum();
  if (reduction == kMean) total.div_(static_cast<double>(std::max<int64_t>(counted, 1)));
  return {total, grad};
}

}  // namespace

TORCH_LIBRARY(apl, m) {
  m.def(
      "fused_loss(Tensor logits, Tensor target, int[] bases, float[] weights, float gamma, float q, "
      "bool official_grad, int ignore_index, int reduction, bool compute_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(apl, CPU, m) { m.impl("fused_loss", &fused_loss_cpu); }

}  // namespace apl
