// The fused losses on CUDA: the math of apl_rowmath.h, one group of threads per row.
//
// K <= 1024: a warp per row (8 rows per block of 256 threads); larger K: a block
// of 512 threads per row. Pass 1 reads the row once for an online max/sum;
// pass 2 (nce, rce/nrce, ngce, nfl only) gathers the sums those losses need;
// pass 3 writes the gradient. Offsets are int64; the kernel runs on the current
// stream, never synchronizes with the host and uses no atomics, so results are
// bitwise reproducible. A label outside [0, K) that is not ignore_index is never
// used as an index: its row gets a NaN loss and a NaN gradient.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/clamp_min.h>
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

// Merges two partial (max, sum of exp(x - max)) pairs; empty parts have max -inf.
template <typename S>
__device__ void merge_max_sum(S& max_a, S& sum_a, S max_b, S sum_b) {
  const S merged = max_a > max_b ? max_a : max_b;
  if (merged == -std::numeric_limits<S>::infinity()) return;  // both parts empty or masked
  sum_a = (max_a == merged ? sum_a : sum_a * Math<S>::exp(max_a - merged)) +
          (max_b == merged ? sum_b : sum_b * Math<S>::exp(max_b - merged));
  max_a = merged;
}

template <int kThreads, typename S>
__device__ void row_max_sum(S& max_z, S& sum_exp, S* shared) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    merge_max_sum(max_z, sum_exp, __shfl_xor_sync(0xffffffffu, max_z, offset),
                  __shfl_xor_sync(0xffffffffu, sum_exp, offset));
  }
  if constexpr (kThreads > kWarp) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    __syncthreads();
    if (lane == 0) {
      shared[warp] = max_z;
      shared[kWarp + warp] = sum_exp;
    }
    __syncthreads();
    max_z = lane < kThreads / kWarp ? shared[lane] : -std::numeric_limits<S>::infinity();
    sum_exp = lane < kThreads / kWarp ? shared[kWarp + lane] : S(0);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      merge_max_sum(max_z, sum_exp, __shfl_xor_sync(0xffffffffu, max_z, offset),
                    __shfl_xor_sync(0xffffffffu, sum_exp, offset));
    }
  }
}

template <typename scalar_t, int kThreads>
__global__ void fused_loss_kernel(const scalar_t* __restrict__ logits, int64_t rows, int64_t K, int64_t row_stride,
                                  int64_t col_stride, const int64_t* __restrict__ target, LossParams params,
                                  int64_t ignore_index, const int64_t* __restrict__ mean_count,
                                  at::opmath_type<scalar_t>* __restrict__ row_loss, scalar_t* __restrict__ grad) {
  using S = at::opmath_type<scalar_t>;
  constexpr S kNaN = std::numeric_limits<S>::quiet_NaN();
  __shared__ S shared[2 * kWarp];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // whole groups leave together: no reduction is left waiting
  const int tid = threadIdx.x;
  const scalar_t* z = logits + row * row_stride;
  scalar_t* grad_row = grad ? grad + row * K : nullptr;
  const int64_t y = target[row];
  const bool ignored = y == ignore_index;
  if (ignored || y < 0 || y >= K) {
    const S fill = ignored ? S(0) : kNaN;
    if (tid == 0) row_loss[row] = fill;
    if (grad_row) {
      for (int64_t j = tid; j < K; j += kThreads) grad_row[j] = static_cast<scalar_t>(fill);
    }
    return;
  }
  // Pass 1: online max and sum of exp.
  S max_z = -std::numeric_limits<S>::infinity(), sum_exp = 0;
  for (int64_t j = tid; j < K; j += kThreads) {
    merge_max_sum(max_z, sum_exp, static_cast<S>(z[j * col_stride]), S(1));  // a NaN makes the sum NaN
  }
  row_max_sum<kThreads>(max_z, sum_exp, shared);
  RowSums<S> sums;
  sums.max_z = max_z;
  sums.log_s = Math<S>::log(sum_exp);
  const int needs = row_needs(params);
  // Pass 2: the sums some losses need; the label's element is never off-label.
  if (needs) {
    ElementSums<S, S> partial;
    S sum_shifted = 0;
    for (int64_t j = tid; j < K; j += kThreads) {
      const S shifted = static_cast<S>(z[j * col_stride]) - max_z;
      sum_shifted += shifted;
      if (!(needs & kElementNeeds)) continue;
      const S lp = shifted - sums.log_s;
      const S p = Math<S>::exp(lp);
      partial.add(needs, p, element_terms<S, S>(needs, p, lp, params), true, j != y);
    }
    if (needs & kNeedShiftedSum) sums.sum_shifted = row_sum<kThreads>(sum_shifted, shared);
    if (needs & kElementNeeds) {
      sums.off_clamped = row_sum<kThreads>(partial.off_clamped, shared);
      sums.off_masked = row_sum<kThreads>(partial.off_masked, shared);
      sums.powered = row_sum<kThreads>(partial.powered, shared);
      sums.powered_masked = row_sum<kThreads>(partial.powered_masked, shared);
      sums.focal = row_sum<kThreads>(partial.focal, shared);
      sums.focal_derivative = row_sum<kThreads>(partial.focal_derivative, shared);
    }
  }
  const S z_label = static_cast<S>(z[y * col_stride]);
  const RowGrad<S> g = row_grad<S>(params, sums, z_label, Math<S>::exp((z_label - max_z) - sums.log_s), K);
  if (tid == 0) row_loss[row] = g.value;
  if (!grad_row) return;
  // Pass 3: the gradient, divided by the number of counted rows for a mean.
  const S scale = mean_count ? S(1) / static_cast<S>(*mean_count > 0 ? *mean_count : 1) : S(1);
  for (int64_t j = tid; j < K; j += kThreads) {
    const S lp = (static_cast<S>(z[j * col_stride]) - max_z) - sums.log_s;
    const S p = Math<S>::exp(lp);
    const int element_needs = j == y ? needs & ~kNeedOffLabel : needs;
    S value = element_grad<S, S>(element_needs, p, element_terms<S, S>(element_needs, p, lp, params), g);
    if (j == y) value += g.at_label;
    grad_row[j] = static_cast<scalar_t>(value * scale);
  }
}

template <typename scalar_t, int kThreads>
void launch(const at::Tensor& logits, const at::Tensor& target, const LossParams& params, int64_t ignore_index,
            const int64_t* mean_count, at::Tensor& row_loss, at::Tensor& grad) {
  const int64_t rows = logits.size(0);
  if (rows == 0) return;
  const int rows_per_block = kThreads >= kBlockThreads ? 1 : kBlockThreads / kThreads;
  const dim3 block(kThreads, rows_per_block);
  const dim3 blocks(static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block));
  TORCH_CHECK(blocks.x <= 2147483647u, "apl: too many rows for one launch: ", rows);
  fused_loss_kernel<scalar_t, kThreads><<<blocks, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      logits.const_data_ptr<scalar_t>(), rows, logits.size(1), logits.stride(0), logits.stride(1),
      target.const_data_ptr<int64_t>(), params, ignore_index, mean_count,
      row_loss.mutable_data_ptr<at::opmath_type<scalar_t>>(), grad.numel() ? grad.mutable_data_ptr<scalar_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> fused_loss_cuda(const at::Tensor& logits, const at::Tensor& target_in,
                                                   at::IntArrayRef bases, at::ArrayRef<double> weights, double gamma,
                                                   double q, bool official_grad, int64_t ignore_index,
                                                   int64_t reduction, bool compute_grad) {
  check_inputs(logits, target_in, reduction);
  const LossParams params = make_params(bases, weights, gamma, q, official_grad);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor target = target_in.contiguous();
  auto [row_loss, grad] = empty_outputs(logits, compute_grad);
  // The mean's divisor stays on the device: no synchronization.
  const at::Tensor count = at::ne(target, ignore_index).sum();
  const int64_t* mean_count = reduction == kMean ? count.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_fused_loss_cuda", [&] {
    if (logits.size(1) <= kWarpRowMaxClasses) {
      launch<scalar_t, kWarp>(logits, target, params, ignore_index, mean_count, row_loss, grad);
    } else {
      launch<scalar_t, kRowBlockThreads>(logits, target, params, ignore_index, mean_count, row_loss, grad);
    }
  });
  return reduce_rows(row_loss, grad, reduction, count.clamp_min(1));
}

}  // namespace

TORCH_LIBRARY_IMPL(apl, CUDA, m) { m.impl("fused_loss", &fused_loss_cuda); }

}  // namespace apl
