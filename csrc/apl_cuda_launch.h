// The CUDA kernels' launch plan (host code): threads per row, blocks, shared memory, and the
// kernels' arguments from a decoded call; apl_cuda.cu launches it, apl_cuda_emulation.cpp emulates it.

#pragma once

#include <ATen/ops/stack.h>

#include "apl_cuda_backward.h"
#include "apl_cuda_forward.h"

namespace apl {
namespace gpu {

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
  a.target_grad = call.target_grad;
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
  at::Tensor grad, upstream, target_grad;

  // The op's gradient: the logits', or with target_grad the pair (contract.gradient_output) in the
  // promoted dtype of the logits and the targets (the targets' half is computed in S).
  at::Tensor result(const at::Tensor& target) const {
    if (!target_grad.defined()) return grad;
    const at::ScalarType type = at::promoteTypes(grad.scalar_type(), target.scalar_type());
    return at::stack({grad.to(type), target_grad.to(type)});
  }
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
  if (call.target_grad) {
    b.target_grad = at::empty(logits.sizes(), logits.options().dtype(accumulation_type(logits)));
    a.target_grad_out = b.target_grad.template mutable_data_ptr<S>();
  }
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
  return {f.loss, b.result(target)};
}

}  // namespace gpu
}  // namespace apl
