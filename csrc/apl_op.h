// Host-side pieces of the fused ops that the CPU and CUDA implementations share: the schema's
// arguments decoded and checked, and the outputs. The ops' contract is written out in
// apl_kernels/backends/contract.py; the math in apl_rowmath.h.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <cmath>

#include "apl_rowmath.h"

namespace apl {

// What a call computes, decoded from the schema's lists (their positions, codes and kStats are
// apl_catalogue.h's, generated from apl_kernels/backends/contract.py):
//   bases         the terms' base losses (1 or 2)
//   coefficients  one weight per term, then gamma, q, a, min_prob, then label_smoothing
//   options       ignore_index, reduction code, official_grad (0/1), gradient mode (0/1/2),
//                 target_grad (0/1: the probability targets' gradient too, see gradient_output)
// Bad arguments raise ValueError (TypeError for a wrong dtype), as the Python checks of the Triton
// op and of the public API do
// (three lists rather than a dozen arguments: torch.library's autograd wrapper costs microseconds
// per argument on every call, which is most of a small batch's time).
struct OpCall {
  LossParams params;
  int64_t ignore_index;
  int64_t reduction;
  int64_t grad_mode;
  bool target_grad;    // the gradient of the probability targets too
  bool probabilities;  // target holds (R, K) class probabilities, not (R,) labels
  bool dense;          // coefficients on every label: probabilities, or label smoothing
};

inline bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// num_classes: the loss's number of classes when the logits hold only some of them (a class-parallel
// shard's columns, at least one); 0 for logits.size(1).
inline OpCall decode_call(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                          at::IntArrayRef bases, at::ArrayRef<double> coefficients, at::IntArrayRef options,
                          int64_t num_classes = 0) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "apl: logits must be 2-D (rows, classes); got ", logits.dim(), " dims");
  TORCH_CHECK_VALUE((num_classes ? num_classes : logits.size(1)) >= 2 && logits.size(1) >= 1 &&
                    logits.size(1) <= (num_classes ? num_classes : logits.size(1)),
                    "apl: the number of classes must be >= 2 (a shard's columns between 1 and it); got ",
                    logits.size(1), " columns, num_classes ", num_classes);
  TORCH_CHECK_TYPE(is_float(logits.scalar_type()), "apl: logits must be float16, bfloat16, float32 or float64; got ",
              logits.scalar_type());
  OpCall call{};
  call.probabilities = target.dim() == 2;
  if (call.probabilities) {
    TORCH_CHECK_VALUE(target.sizes() == logits.sizes() && is_float(target.scalar_type()),
                "apl: probability targets must be floating with the logits' shape ", logits.sizes(), "; got ",
                target.scalar_type(), " of shape ", target.sizes());
  } else {
    TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(0),
                "apl: target must be 1-D with one label per row of logits, or 2-D probabilities; got shape ",
                target.sizes(), " for logits of shape ", logits.sizes());
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "apl: labels must be int64; got ", target.scalar_type());
  }
  TORCH_CHECK_VALUE(target.device() == logits.device(), "apl: logits are on ", logits.device(), " but target is on ",
              target.device());
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == logits.size(1) && is_float(weight->scalar_type()),
                "apl: weight must be 1-D floating with one weight per class (", logits.size(1), "); got ",
                weight->scalar_type(), " of shape ", weight->sizes());
    TORCH_CHECK_VALUE(weight->device() == logits.device(), "apl: weight is on ", weight->device(), " but logits are on ",
                logits.device());
  }
  const size_t terms = bases.size();
  TORCH_CHECK_VALUE(terms >= 1 && terms <= kMaxTerms && coefficients.size() == terms + kNumCoefficients,
              "apl: a loss has 1 or 2 terms, and coefficients holds one weight per term, then gamma, q, a, "
              "min_prob and label_smoothing; got ", terms, " bases and ", coefficients.size(), " coefficients");
  TORCH_CHECK_VALUE(options.size() == kNumOptions,
              "apl: options must be [ignore_index, reduction, official_grad, grad_mode, target_grad]; got ", options.size(),
              " values");
  LossParams& params = call.params;
  params.num_terms = static_cast<int>(terms);
  for (size_t t = 0; t < terms; ++t) {
    TORCH_CHECK_VALUE(bases[t] >= 0 && bases[t] < kNumBases, "apl: unknown base loss index ", bases[t]);
    TORCH_CHECK_VALUE(std::isfinite(coefficients[t]), "apl: weights must be finite, got ", coefficients[t]);
    params.base[t] = static_cast<int>(bases[t]);
    params.weight[t] = coefficients[t];
  }
  params.gamma = coefficients[terms + kCoefficientGamma];
  params.q = coefficients[terms + kCoefficientQ];
  params.a = coefficients[terms + kCoefficientA];
  params.min_prob = coefficients[terms + kCoefficientMinProb];
  params.label_smoothing = coefficients[terms + kCoefficientLabelSmoothing];
  // The public API checks the catalogue's limits (apl_kernels.catalogue.LIMITS); direct callers get
  // at least values the math is defined for.
  TORCH_CHECK_VALUE(std::isfinite(params.gamma) && params.gamma >= 0, "apl: gamma must be finite and >= 0, got ",
              params.gamma);
  TORCH_CHECK_VALUE(std::isfinite(params.q) && params.q >= 1e-30, "apl: q must be finite and >= 1e-30, got ", params.q);
  TORCH_CHECK_VALUE(std::isfinite(params.a) && params.a > 0, "apl: a must be finite and > 0, got ", params.a);
  TORCH_CHECK_VALUE(params.min_prob > 0 && params.min_prob < 1, "apl: min_prob must be in (0, 1), got ", params.min_prob);
  TORCH_CHECK_VALUE(params.label_smoothing >= 0 && params.label_smoothing <= 1,
              "apl: label_smoothing must be in [0, 1], got ", params.label_smoothing);
  for (size_t t = 0; t < terms; ++t) {
    TORCH_CHECK_VALUE(!needs_a_above_one(params.base[t]) || params.a > 1, "apl: ", kBaseNames[params.base[t]],
                      " needs a > 1, got ", params.a);
  }
  params.derive();
  call.ignore_index = options[kOptionIgnoreIndex];
  call.reduction = options[kOptionReduction];
  TORCH_CHECK_VALUE(call.reduction >= kNone && call.reduction <= kSum,
              "apl: reduction code must be 0 (none), 1 (mean) or 2 (sum); got ", call.reduction);
  const int64_t official_grad = options[kOptionOfficialGrad];
  TORCH_CHECK_VALUE(official_grad == 0 || official_grad == 1, "apl: official_grad (options[", kOptionOfficialGrad,
                    "]) must be 0 or 1; got ", official_grad);
  params.official_grad = official_grad == 1;
  call.grad_mode = options[kOptionGradMode];
  TORCH_CHECK_VALUE(call.grad_mode >= kNoGrad && call.grad_mode <= kGradInBackward,
              "apl: the gradient mode (options[", kOptionGradMode, "]) must be 0, 1 or 2; got ", call.grad_mode);
  const int64_t target_grad = options[kOptionTargetGrad];
  TORCH_CHECK_VALUE(target_grad == 0 || (target_grad == 1 && call.probabilities && call.grad_mode != kNoGrad),
                    "apl: target_grad (options[", kOptionTargetGrad, "]) must be 0, or 1 for probability targets "
                    "with a gradient mode; got ", target_grad);
  call.target_grad = target_grad == 1;
  call.dense = call.probabilities || params.label_smoothing != 0;
  return call;
}

// A gradient output (contract.gradient_output): the logits' (R, K), or with target_grad both
// gradients stacked (2, R, K) in the promoted dtype of the logits and the targets.
inline at::Tensor gradient_output(const at::Tensor& logits, const at::Tensor& target, bool target_grad) {
  if (!target_grad) return at::empty(logits.sizes(), logits.options());
  return at::empty({2, logits.size(0), logits.size(1)},
                   logits.options().dtype(at::promoteTypes(logits.scalar_type(), target.scalar_type())));
}

inline at::ScalarType accumulation_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The per-row record that GRAD_IN_BACKWARD saves (kStats values, in this order), and the mean's
// divisor in the record after the last row.
template <typename S>
struct RowRecord {
  S max_z, log_s, total_c, alpha0, beta0, alpha1, beta1, total_h, target_g;
};
static_assert(sizeof(RowRecord<float>) == kStats * sizeof(float), "RowRecord holds kStats values");

}  // namespace apl
