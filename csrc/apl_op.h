// Host-side pieces of the fused op that the CPU and CUDA implementations share:
// the schema's arguments decoded and checked, and the outputs. The op's contract
// is written out in apl_kernels/fused.py.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>

#include <cmath>

#include "apl_rowmath.h"

namespace apl {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// What a call computes, decoded from the schema's lists:
//   bases         the terms' base losses (1 or 2)
//   coefficients  one weight per term, then gamma, then q
//   options       ignore_index, reduction code, official_grad (0/1), compute_grad (0/1)
// (three lists rather than ten arguments: torch.library's autograd wrapper costs
// microseconds per argument on every call, which is most of a small batch's time).
struct OpCall {
  LossParams params;
  int64_t ignore_index;
  int64_t reduction;
  bool compute_grad;
};

inline OpCall decode_call(const at::Tensor& logits, const at::Tensor& target, at::IntArrayRef bases,
                          at::ArrayRef<double> coefficients, at::IntArrayRef options) {
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
  TORCH_CHECK(!bases.empty() && bases.size() <= kMaxTerms && coefficients.size() == bases.size() + 2,
              "apl: a loss has 1 or 2 terms, and coefficients holds one weight per term, then gamma and q; got ",
              bases.size(), " bases and ", coefficients.size(), " coefficients");
  TORCH_CHECK(options.size() == 4,
              "apl: options must be [ignore_index, reduction, official_grad, compute_grad]; got ", options.size(),
              " values");
  OpCall call{};
  LossParams& params = call.params;
  params.num_terms = static_cast<int>(bases.size());
  for (size_t t = 0; t < bases.size(); ++t) {
    TORCH_CHECK(bases[t] >= 0 && bases[t] < kNumBases, "apl: unknown base loss index ", bases[t]);
    TORCH_CHECK(std::isfinite(coefficients[t]), "apl: weights must be finite, got ", coefficients[t]);
    params.base[t] = static_cast<int>(bases[t]);
    params.weight[t] = coefficients[t];
  }
  params.gamma = coefficients[bases.size()];
  params.q = coefficients[bases.size() + 1];
  // q is used in the accumulation type: a double that rounds to 0 in float would divide by 0.
  const double q_used = dtype == at::kDouble ? params.q : static_cast<double>(static_cast<float>(params.q));
  TORCH_CHECK(std::isfinite(params.q) && q_used > 0, "apl: q must be finite and > 0 (in float32 for ", dtype,
              " logits), got ", params.q);
  TORCH_CHECK(std::isfinite(params.gamma) && params.gamma >= 0, "apl: gamma must be finite and >= 0, got ",
              params.gamma);
  params.clamp_min_powered = std::pow(kClampMin, params.q);
  call.ignore_index = options[0];
  call.reduction = options[1];
  TORCH_CHECK(call.reduction >= kNone && call.reduction <= kSum,
              "apl: reduction code must be 0 (none), 1 (mean) or 2 (sum); got ", call.reduction);
  TORCH_CHECK((options[2] == 0 || options[2] == 1) && (options[3] == 0 || options[3] == 1),
              "apl: official_grad and compute_grad (options[2], options[3]) must be 0 or 1; got ", options[2], " and ",
              options[3]);
  params.official_grad = options[2] == 1;
  call.compute_grad = options[3] == 1;
  return call;
}

inline at::ScalarType accumulation_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The gradient output: (rows, K) in the logits' dtype, or empty without compute_grad.
inline at::Tensor empty_grad(const at::Tensor& logits, bool compute_grad) {
  return compute_grad ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
}

}  // namespace apl
