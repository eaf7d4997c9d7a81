// The fused losses on CUDA (the contract: apl_kernels/backends/contract.py; the math: apl_rowmath.h;
// the rows and blocks: apl_cuda_rows.h, which the host emulation apl_cuda_emulation.cpp runs too;
// the design and its bytes: docs/kernels.md, "CUDA C++").
//
// Blocks of 512 threads; a row is shared by a group of 4, 32 or 512 threads (plan_launch), each
// lane taking units of the row (one vector load each) in turn. The forward reads each row once
// (online max and sum, one exp per element), keeping it in shared memory when a later pass needs
// it, and writes per-row records; a reduced loss and a mean's divisor are summed by the last block
// to finish, in a fixed order. The backward (GRAD_IN_BACKWARD) reads each row once more and writes
// its gradient times the upstream gradient over the divisor. Two launches per forward plus
// backward (a memset zeroes the counter of a reduced forward), on the current stream, with no
// host synchronization and no atomics in the math: results are bitwise reproducible.

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "apl_cuda_launch.h"

namespace apl {
namespace gpu {
namespace {

template <typename S>
__device__ Online<S> shuffle_xor(const Online<S>& v, int offset, unsigned mask) {
  Online<S> o;
  o.max = __shfl_xor_sync(mask, v.max, offset);
  o.sum_exp = __shfl_xor_sync(mask, v.sum_exp, offset);
  o.shifted = __shfl_xor_sync(mask, v.shifted, offset);
  o.count = __shfl_xor_sync(mask, v.count, offset);
  return o;
}

template <typename S, int N>
__device__ Sums<S, N> shuffle_xor(const Sums<S, N>& v, int offset, unsigned mask) {
  Sums<S, N> o;
#pragma unroll
  for (int i = 0; i < N; ++i) o.v[i] = __shfl_xor_sync(mask, v.v[i], offset);
  return o;
}

// The largest value a block reduces through shared memory: Sums<double, 8>.
constexpr int kSlotBytes = 64;

// The lanes of this thread's group of g within its warp: ((1 << min(g, 32)) - 1) << (lane &
// -min(g, 32)) (PTX clamps a shift of 32, so a whole warp gives all ones). In one volatile asm
// block, computed afresh at every shuffle: no register holds the mask, or its parts, between
// reductions (those were registers too many for the forward kernel).
__device__ __forceinline__ unsigned group_mask(unsigned g) {
  unsigned mask;
  asm volatile(
      "{\n\t.reg .u32 w, lane, ones;\n\t"
      "min.u32 w, %1, 32;\n\t"
      "mov.u32 lane, %%laneid;\n\t"
      "shl.b32 ones, 1, w;\n\t"
      "sub.u32 ones, ones, 1;\n\t"
      "neg.s32 w, w;\n\t"
      "and.b32 lane, lane, w;\n\t"
      "shl.b32 %0, ones, lane;\n\t}"
      : "=r"(mask)
      : "r"(g));
  return mask;
}

// g consecutive threads of a block share a row (g = 4, 32 or 512: Args::group, a runtime value,
// so that one kernel serves every group size); each thread is one lane (apl_cuda_rows.h).
struct DeviceGroup {
  static constexpr int kOwned = 1;
  int g;
  unsigned char* slots;  // kWarps slots of kSlotBytes (block-wide groups)
  bool* last;            // finish_reduction's flag (block-wide groups)

  __device__ int size() const { return g; }
  __device__ int count() const { return 1; }
  __device__ int lane(int) const { return threadIdx.x & (g - 1); }
  __device__ bool leader() const { return lane(0) == 0; }
  __device__ int64_t block() const { return blockIdx.x; }

  // The group's row, from %ctaid and %tid read afresh (volatile) at each call: a row index held
  // through the row's passes was a register too many for the forward kernel.
  __device__ int64_t row() const {
    unsigned block_index, thread;
    asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(block_index));
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(thread));
    return static_cast<int64_t>(block_index) * (kBlockThreads / g) + thread / g;
  }

  // Butterfly over the group's lanes (the threads of a smaller group name only themselves in the
  // mask: groups of a warp may take different branches); a block adds a second butterfly over
  // its warps' results, through shared memory. Every condition here is the same for the whole
  // group, so its lanes meet at the same shuffles and (block-wide groups) barriers.
  template <typename T>
  __device__ T reduce(const T* mine) const {
    static_assert(sizeof(T) <= kSlotBytes, "the slots hold kWarps reduced values");
    const unsigned width = g < kWarp ? g : kWarp;
    T v = mine[0];
#pragma unroll
    for (unsigned offset = kWarp / 2; offset > 0; offset /= 2) {
      if (offset < width) v = combine(v, shuffle_xor(v, offset, group_mask(g)));
    }
    if (g > kWarp) {
      T* slot = reinterpret_cast<T*>(slots);
      const unsigned lane_in_warp = threadIdx.x % kWarp;
      __syncthreads();  // the previous reduction's slots have been read
      if (lane_in_warp == 0) slot[threadIdx.x / kWarp] = v;
      __syncthreads();
      v = lane_in_warp < kWarps ? slot[lane_in_warp] : T();
#pragma unroll
      for (int offset = kWarp / 2; offset > 0; offset /= 2) v = combine(v, shuffle_xor(v, offset, 0xffffffffu));
    }
    return v;
  }

  // The last-block protocol (finish_reduction). Thread 0 stores the block's partial, then
  // __threadfence() orders that store before its ticket (atomicAdd) for every thread of the
  // device: a block that draws ticket gridDim.x - 1 knows that every other block's partial was
  // stored before its ticket was drawn. The last block's thread 0 then fences again (so that its
  // later loads are not ordered before the ticket) and __syncthreads() passes that on to the
  // block, whose threads read the partials with ld.global.cg (load_partial): from L2, where the
  // stores are, never from an L1 line of this SM. The counter is zeroed by a cudaMemsetAsync on
  // the stream before the launch.
  template <typename T>
  __device__ bool arrive(T* partials, const T& total, unsigned* counter, int64_t) const {
    if (threadIdx.x == 0) {
      partials[blockIdx.x] = total;
      __threadfence();
      *last = atomicAdd(counter, 1u) == gridDim.x - 1;
      if (*last) __threadfence();
    }
    __syncthreads();
    return *last;
  }

  template <typename S, int N>
  __device__ Sums<S, N> load_partial(const Sums<S, N>* p) const {
    Sums<S, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = __ldcg(&p->v[i]);
    return v;
  }
};

// Two blocks of 512 threads per SM (at most 64 registers a thread); one for float64, whose
// exp, log and expm1 take twice the registers (64 spill hundreds of bytes).
template <typename scalar_t>
constexpr int kBlocksPerSM = std::is_same_v<scalar_t, double> ? 1 : 2;
#define APL_LAUNCH_BOUNDS __launch_bounds__(kBlockThreads, kBlocksPerSM<scalar_t>)

template <typename scalar_t>
__global__ void APL_LAUNCH_BOUNDS forward_kernel(const __grid_constant__ Args<scalar_t> a) {
  using S = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char row_memory[];
  __shared__ __align__(16) unsigned char slots[kWarps * kSlotBytes];
  __shared__ bool last;
  const DeviceGroup lanes{a.group, slots, &last};
  S mine = forward_row(lanes, a, row_memory);
  if (!lanes.leader()) mine = S(0);  // each row counted once
  if (a.reduction == kNone) {
    if (blockIdx.x == 0 && threadIdx.x == 0) finish_unreduced(a);
    return;
  }
  finish_reduction(DeviceGroup{kBlockThreads, slots, &last}, a, &mine);
}

// The backward with the targets' gradient (kTargets, for target_grad) is a kernel of its own, one
// block an SM: its element switch needs more than 64 registers (sm_80's bfloat16 backward spilled
// 8 bytes with it inside), and the backward without it keeps two blocks an SM.
template <typename scalar_t, bool kTargets>
__global__ void __launch_bounds__(kBlockThreads, kTargets ? 1 : kBlocksPerSM<scalar_t>)
    backward_kernel(const __grid_constant__ Args<scalar_t> a) {
  const DeviceGroup lanes{a.group, nullptr, nullptr};
  backward_row<kTargets>(lanes, a, lanes.row());
}

// Dynamic shared memory a block may use while two fit on an SM (cudaDeviceGetAttribute: no
// synchronization, and ATen's device properties would need the cuSPARSE headers).
int64_t shared_memory_limit(int device) {
  const auto attribute = [device](cudaDeviceAttr what) {
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, what, device));
    return static_cast<int64_t>(value);
  };
  constexpr int64_t kStatic = kWarps * kSlotBytes + 16;
  const int64_t per_sm = attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor);
  const int64_t reserved = attribute(cudaDevAttrReservedSharedMemoryPerBlock);
  return std::min(per_sm / 2 - reserved, attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)) - kStatic;
}

template <typename Kernel, typename scalar_t>
void launch(Kernel kernel, const Args<scalar_t>& a, const Launch& l, cudaStream_t stream) {
  TORCH_CHECK(l.blocks <= 2147483647, "apl: too many rows for one launch: ", a.rows);
  if (l.shared_memory > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(l.shared_memory)));
  }
  kernel<<<static_cast<unsigned>(l.blocks), kBlockThreads, l.shared_memory, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void run_backward(const BackwardCall<scalar_t>& b, cudaStream_t stream) {
  if (b.args.rows == 0) return;
  if (b.args.target_grad) {
    launch(backward_kernel<scalar_t, true>, b.args, b.launch, stream);
  } else {
    launch(backward_kernel<scalar_t, false>, b.args, b.launch, stream);
  }
}

std::tuple<at::Tensor, at::Tensor> fused_loss_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                   const c10::optional<at::Tensor>& weight, at::IntArrayRef bases,
                                                   at::ArrayRef<double> coefficients, at::IntArrayRef options) {
  const OpCall call = decode_call(logits, target, weight, bases, coefficients, options);
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t shared_limit = shared_memory_limit(logits.get_device());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_fused_loss_cuda", [&] {
    return forward_op<scalar_t>(
        logits, target, weight, call, shared_limit, 0,
        [&](const ForwardCall<scalar_t>& f) {
          if (call.reduction != kNone) C10_CUDA_CHECK(cudaMemsetAsync(f.args.counter, 0, sizeof(unsigned), stream));
          launch(forward_kernel<scalar_t>, f.args, f.launch, stream);
        },
        [&](const BackwardCall<scalar_t>& b) { run_backward(b, stream); });
  });
}

at::Tensor fused_loss_backward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                    const c10::optional<at::Tensor>& weight, const at::Tensor& stats,
                                    const at::Tensor& grad_loss, at::IntArrayRef bases,
                                    at::ArrayRef<double> coefficients, at::IntArrayRef options) {
  const OpCall call = decode_call(logits, target, weight, bases, coefficients, options);
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_fused_loss_backward_cuda",
                                         [&] {
    const BackwardCall<scalar_t> b = prepare_backward<scalar_t>(logits, target, weight, stats, grad_loss, call, 0);
    run_backward(b, stream);
    return b.result(target);
  });
}

}  // namespace
}  // namespace gpu

TORCH_LIBRARY_IMPL(apl, CUDA, m) {
  m.impl("fused_loss", &gpu::fused_loss_cuda);
  m.impl("fused_loss_backward", &gpu::fused_loss_backward_cuda);
}

}  // namespace apl
