// The fused losses on CUDA: the math of apl_rowmath.h, one group of threads per row.
//
// K <= 1024: a warp per row (8 rows per block of 256 threads); larger K: a block
// of 512 threads per row. Pass 1 reads the row once for an online max, sum of
// exp and sum of z - max; pass 2 (rce/nrce, ngce, nfl only) gathers the sums
// those losses need;
// pass 3 writes the gradient. Offsets are int64; the kernel runs on the current
// stream, never synchronizes with the host and uses no atomics, so results are
// bitwise reproducible. A label outside [0, K) that is not ignore_index is never
// used as an index: its row gets a NaN loss and a NaN gradient.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "apl_op.h"

namespace apl {
namespace {

constexpr int kWarp = 32;
constexpr int kBlockThreads = 256;     // threads per block when a warp handles a row
constexpr int kRowBlockThreads = 512;  // threads per row for large K
constexpr int64_t kWarpRowMaxClasses = 1024;

// Sum over the threads of a row (a warp, or the whole block); every thread gets it.
template <int kThreads, typename S>
__device__ S row_sum(S value, S* shared) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if constexpr (kThreads > kWarp) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    __syncthreads();  // shared may still be read by a previous reduction
    if (lane == 0) shared[warp] = value;
    __syncthreads();
    value = lane < kThreads / kWarp ? shared[lane] : S(0);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// Statistics of part of a row: its max m, sum exp(z - m), sum (z - r) and number of
// elements, with r = m, or 0 while m is -inf (every element so far masked: no -inf - -inf).
template <typename S>
struct Partial {
  S max, sum_exp, shifted, count;
};

template <typename S>
__device__ S reference_point(S max) {
  return max == -std::numeric_limits<S>::infinity() ? S(0) : max;
}

// Merges b into a. A NaN reaches sum_exp through its own exp, so the row becomes undefined.
template <typename S>
__device__ void merge(Partial<S>& a, const Partial<S>& b) {
  const S merged = a.max > b.max ? a.max : b.max;
  const S r = reference_point(merged);
  a.sum_exp = (a.sum_exp == S(0) ? S(0) : a.sum_exp * Math<S>::exp(a.max - merged)) +
              (b.sum_exp == S(0) ? S(0) : b.sum_exp * Math<S>::exp(b.max - merged));
  a.shifted = a.shifted + a.count * (reference_point(a.max) - r) + b.shifted + b.count * (reference_point(b.max) - r);
  a.count += b.count;
  a.max = merged;
}

template <typename S>
__device__ Partial<S> shuffled(const Partial<S>& p, int offset) {
  return {__shfl_xor_sync(0xffffffffu, p.max, offset), __shfl_xor_sync(0xffffffffu, p.sum_exp, offset),
          __shfl_xor_sync(0xffffffffu, p.shifted, offset), __shfl_xor_sync(0xffffffffu, p.count, offset)};
}

// The whole row's statistics from every thread's part; every thread gets them.
template <int kThreads, typename S>
__device__ Partial<S> row_statistics(Partial<S> part, S* shared) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) merge(part, shuffled(part, offset));
  if constexpr (kThreads > kWarp) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    __syncthreads();
    if (lane == 0) {
      shared[warp] = part.max;
      shared[kWarp + warp] = part.sum_exp;
      shared[2 * kWarp + warp] = part.shifted;
      shared[3 * kWarp + warp] = part.count;
    }
    __syncthreads();
    const bool filled = lane < kThreads / kWarp;
    part = {filled ? shared[lane] : -std::numeric_limits<S>::infinity(), filled ? shared[kWarp + lane] : S(0),
            filled ? shared[2 * kWarp + lane] : S(0), filled ? shared[3 * kWarp + lane] : S(0)};
    for (int offset = kWarp / 2; offset > 0; offset /= 2) merge(part, shuffled(part, offset));
  }
  return part;
}

template <typename scalar_t, int kThreads>
__global__ void fused_loss_kernel(const scalar_t* __restrict__ logits, int64_t rows, int64_t K, int64_t row_stride,
                                  int64_t col_stride, const int64_t* __restrict__ target, LossParams params,
                                  int64_t ignore_index, const int64_t* __restrict__ mean_count,
                                  at::opmath_type<scalar_t>* __restrict__ row_loss, scalar_t* __restrict__ grad) {
  using S = at::opmath_type<scalar_t>;
  constexpr S kNaN = std::numeric_limits<S>::quiet_NaN();
  __shared__ S shared[4 * kWarp];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // whole groups leave together: no reduction is left waiting
  const int tid = threadIdx.x;
  const scalar_t* z = logits + row * row_stride;
  scalar_t* grad_row = grad ? grad + row * K : nullptr;
  const int64_t y = target[row];
  const bool ignored = y == ignore_index;
  // Ignored rows give 0; a label out of range is never used as an index: NaN.
  auto fill_row = [&](S fill) {
    if (tid == 0) row_loss[row] = fill;
    if (grad_row) {
      for (int64_t j = tid; j < K; j += kThreads) grad_row[j] = static_cast<scalar_t>(fill);
    }
  };
  if (ignored || y < 0 || y >= K) return fill_row(ignored ? S(0) : kNaN);
  // Pass 1: online max, sum of exp and sum of shifted logits.
  Partial<S> part{-std::numeric_limits<S>::infinity(), S(0), S(0), S(0)};
  for (int64_t j = tid; j < K; j += kThreads) {
    const S x = static_cast<S>(z[j * col_stride]);
    const bool masked = x == -std::numeric_limits<S>::infinity();
    merge(part, Partial<S>{x, masked ? S(0) : S(1), masked ? x : S(0), S(1)});
  }
  const Partial<S> whole = row_statistics<kThreads>(part, shared);
  RowSums<S> sums;
  sums.max_z = whole.max;
  set_sum_exp(sums, whole.sum_exp);
  sums.sum_shifted = whole.shifted;
  // The same for every thread of the row: it leaves together.
  if (!row_defined(sums)) return fill_row(kNaN);
  const int needs = row_needs(params);
  // Pass 2: the sums some losses need; the label's element is never off-label.
  if (needs) {
    ElementSums<S, S> partial;
    for (int64_t j = tid; j < K; j += kThreads) {
      const S lp = (static_cast<S>(z[j * col_stride]) - sums.max_z) - sums.log_s;
      const S p = Math<S>::exp(lp);
      partial.add(needs, p, element_terms<S, S>(needs, p, lp, sums, params), true, j != y);
    }
    sums.off_clamped = row_sum<kThreads>(partial.off_clamped, shared);
    sums.off_masked = row_sum<kThreads>(partial.off_masked, shared);
    sums.powered = row_sum<kThreads>(partial.powered, shared);
    sums.powered_masked = row_sum<kThreads>(partial.powered_masked, shared);
    sums.focal = row_sum<kThreads>(partial.focal, shared);
    sums.focal_derivative = row_sum<kThreads>(partial.focal_derivative, shared);
  }
  const S z_label = static_cast<S>(z[y * col_stride]);
  const RowGrad<S> g = row_grad<S>(params, sums, z_label, Math<S>::exp((z_label - sums.max_z) - sums.log_s), K);
  if (tid == 0) row_loss[row] = g.value;
  if (!grad_row) return;
  // Pass 3: the gradient, divided by the number of counted rows for a mean.
  const RowGrad<S> scaled_g =
      scaled(g, mean_count ? S(1) / static_cast<S>(*mean_count > 0 ? *mean_count : 1) : S(1));
  for (int64_t j = tid; j < K; j += kThreads) {
    const S lp = (static_cast<S>(z[j * col_stride]) - sums.max_z) - sums.log_s;
    const S p = Math<S>::exp(lp);
    const int element_needs = j == y ? needs & ~kNeedOffLabel : needs;
    S value = element_grad<S, S>(element_needs, p, element_terms<S, S>(element_needs, p, lp, sums, params), scaled_g);
    if (j == y) value += scaled_g.at_label;
    grad_row[j] = static_cast<scalar_t>(value);
  }
}

template <typename scalar_t, int kThreads>
void launch(const at::Tensor& logits, const at::Tensor& target, const OpCall& call, const int64_t* mean_count,
            at::Tensor& row_loss, at::Tensor& grad) {
  const int64_t rows = logits.size(0);
  if (rows == 0) return;
  const int rows_per_block = kThreads >= kBlockThreads ? 1 : kBlockThreads / kThreads;
  const dim3 block(kThreads, rows_per_block);
  const int64_t num_blocks = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(num_blocks <= 2147483647, "apl: too many rows for one launch: ", rows);
  const dim3 blocks(static_cast<unsigned>(num_blocks));
  fused_loss_kernel<scalar_t, kThreads><<<blocks, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      logits.const_data_ptr<scalar_t>(), rows, logits.size(1), logits.stride(0), logits.stride(1),
      target.const_data_ptr<int64_t>(), call.params, call.ignore_index, mean_count,
      row_loss.mutable_data_ptr<at::opmath_type<scalar_t>>(), grad.numel() ? grad.mutable_data_ptr<scalar_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> fused_loss_cuda(const at::Tensor& logits, const at::Tensor& target_in,
                                                   at::IntArrayRef bases, at::ArrayRef<double> coefficients,
                                                   at::IntArrayRef options) {
  const OpCall call = decode_call(logits, target_in, bases, coefficients, options);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor target = target_in.contiguous();
  at::Tensor row_loss = at::empty({logits.size(0)}, logits.options().dtype(accumulation_type(logits)));
  at::Tensor grad = empty_grad(logits, call.compute_grad);
  // The mean's divisor stays on the device: no synchronization.
  const at::Tensor count = at::ne(target, call.ignore_index).sum();
  const int64_t* mean_count = call.reduction == kMean ? count.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_fused_loss_cuda", [&] {
    if (logits.size(1) <= kWarpRowMaxClasses) {
      launch<scalar_t, kWarp>(logits, target, call, mean_count, row_loss, grad);
    } else {
      launch<scalar_t, kRowBlockThreads>(logits, target, call, mean_count, row_loss, grad);
    }
  });
  if (call.reduction == kNone) return {row_loss, grad};
  at::Tensor total = row_loss.sum();
  if (call.reduction == kMean) total.div_(count.clamp_min(1));  // an all-ignored batch: 0 / 1
  return {total, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(apl, CUDA, m) { m.impl("fused_loss", &fused_loss_cuda); }

}  // namespace apl
