// Host-side pieces of the fused op that the CPU and CUDA implementations share:
// argument checks, the loss parameters, and the outputs. The op's contract is
// written out in apl_kernels/fused.py.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/util/ArrayRef.h>

#include "apl_rowmath.h"

namespace apl {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

inline LossParams make_params(at::IntArrayRef bases, at::ArrayRef<double> weights, double gamma, double q,
                              bool official_grad) {
  TORCH_CHECK(!bases.empty() && bases.size() <= kMaxTerms && bases.size() == weights.size(),
              "apl: a loss has 1 or 2 terms with one weight each; got ", bases.size(), " bases and ",
              weights.size(), " weights");
  TORCH_CHECK(q > 0, "apl: q must be > 0, got ", q);
  TORCH_CHECK(gamma >= 0, "apl: gamma must be >= 0, got ", gamma);
  LossParams params{};
  params.num_terms = static_cast<int>(bases.size());
  for (size_t t = 0; t < bases.size(); ++t) {
    TORCH_CHECK(bases[t] >= 0 && bases[t] < kNumBases, "apl: unknown base loss index ", bases[t]);
    params.base[t] = static_cast<int>(bases[t]);
    params.weight[t] = weights[t];
  }
  params.gamma = gamma;
  params.q = q;
  params.clamp_min_powered = std::pow(kClampMin, q);
  params.official_grad = official_grad;
  return params;
}

inline void check_inputs(const at::Tensor& logits, const at::Tensor& target, int64_t reduction) {
  TORCH_CHECK(logits.dim() == 2, "apl: logits must be 2-D (rows, classes); got ", logits.dim(), " dims");
  TORCH_CHECK(logits.size(1) >= 2, "apl: the number of classes must be >= 2; got ", logits.size(1));
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "apl: logits must be float16, bfloat16, float32 or float64; got ", dtype);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0),
              "apl: target must be 1-D with one label per row of logits; got shape ", target.sizes(),
              " for logits of shape ", logits.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "apl: target must be int64; got ", target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), "apl: logits are on ", logits.device(), " but target is on ",
              target.device());
  TORCH_CHECK(reduction >= kNone && reduction <= kSum, "apl: reduction code must be 0 (none), 1 (mean) or 2 (sum); got ",
              reduction);
}

inline at::ScalarType accumulation_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-row losses (accumulation dtype) and the gradient (logits' dtype, or empty).
inline std::tuple<at::Tensor, at::Tensor> empty_outputs(const at::Tensor& logits, bool compute_grad) {
  auto row_loss = at::empty({logits.size(0)}, logits.options().dtype(accumulation_type(logits)));
  auto grad = compute_grad ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  return {row_loss, grad};
}

// The op's outputs: per-row losses, or their sum, or their sum over `divisor` (a
// number, or a tensor that stays on the device).
template <typename Divisor>
inline std::tuple<at::Tensor, at::Tensor> reduce_rows(at::Tensor row_loss, at::Tensor grad, int64_t reduction,
                                                      const Divisor& divisor) {
  if (reduction == kNone) return {row_loss, grad};
  at::Tensor total = row_loss.sum();
  if (reduction == kMean) total.div_(divisor);
  return {total, grad};
}

}  // namespace apl
