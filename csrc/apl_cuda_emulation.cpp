// The CUDA kernels of apl_cuda.cu run on the host, for tests on machines without a GPU
// (tests/test_cuda_kernel.py). The test-only ops apl::cuda_emulation and
// apl::cuda_emulation_backward have fused_loss's schemas, take CPU tensors, and run the rows and
// blocks of apl_cuda_rows.h as the device does: the same launch plan (plan_launch, or the group
// that apl::cuda_emulation_launch forces), each group's lanes taking the same units of the row,
// every reduction in the device's butterfly order (checking that all lanes end with the same
// value), shared-memory rows in a buffer per block, and the blocks in a shuffled order with the
// last-block protocol. Outputs, workspace and shared memory start as NaN bytes, so that anything
// the code does not write, or reads before writing, shows.

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "apl_cuda_launch.h"

namespace apl {
namespace gpu {
namespace {

// The emulated launch: threads per row (0: plan_launch's choice), dynamic shared memory per block
// (bytes; the CUDA op asks the device: 112 KiB on an H100 or H200, 80 KiB on an A100) and the seed
// of the order in which blocks run.
struct EmulatedLaunch {
  int64_t group = 0;
  int64_t shared_memory = 112 * 1024;
  int64_t seed = 0;
};
EmulatedLaunch emulated;

template <typename S>
bool same(S x, S y) {
  return (std::isnan(x) && std::isnan(y)) || std::memcmp(&x, &y, sizeof(S)) == 0;
}
template <typename S, int N>
bool same(const Sums<S, N>& a, const Sums<S, N>& b) {
  for (int i = 0; i < N; ++i) {
    if (!same(a.v[i], b.v[i])) return false;
  }
  return true;
}
template <typename S>
bool same(const Online<S>& a, const Online<S>& b) {
  return same(a.max, b.max) && same(a.sum_exp, b.sum_exp) && same(a.shifted, b.shifted) && same(a.count, b.count);
}

// One caller plays the g lanes of a group (apl_cuda_rows.h).
struct HostGroup {
  static constexpr int kOwned = kBlockThreads;
  int g;
  int64_t block_index;
  int64_t row_index = 0;  // the row the group plays (forward_row)

  int size() const { return g; }
  int count() const { return g; }
  int lane(int i) const { return i; }
  bool leader() const { return true; }
  int64_t block() const { return block_index; }
  int64_t row() const { return row_index; }

  // DeviceGroup::reduce: butterflies over runs of min(g, 32) lanes, then over a block's warps.
  template <typename T>
  T reduce(const T* values) const {
    std::vector<T> lanes(values, values + g);
    butterfly(lanes, std::min(g, kWarp));
    if (g <= kWarp) return lanes[0];
    std::vector<T> warps(kWarp);  // lanes past the block's warps hold the identity
    for (int w = 0; w < g / kWarp; ++w) warps[w] = lanes[w * kWarp];
    butterfly(warps, kWarp);
    return warps[0];
  }

  // Lane l combines its value with lane l ^ offset's (a shuffle), all lanes at once.
  template <typename T>
  static void butterfly(std::vector<T>& v, int width) {
    std::vector<T> next(v.size());
    for (int offset = width / 2; offset > 0; offset /= 2) {
      for (size_t l = 0; l < v.size(); ++l) next[l] = combine(v[l], v[l ^ offset]);
      v.swap(next);
    }
    for (size_t l = 0; l < v.size(); ++l) {
      TORCH_CHECK(same(v[l], v[l / width * width]), "apl emulation: the lanes of a reduction disagree");
    }
  }

  template <typename T>
  bool arrive(T* partials, const T& total, unsigned* counter, int64_t blocks) const {
    partials[block_index] = total;
    return static_cast<int64_t>((*counter)++) == blocks - 1;
  }

  template <typename T>
  T load_partial(const T* p) const {
    return *p;
  }
};

struct alignas(16) Chunk {
  unsigned char bytes[16];
};

std::vector<int64_t> block_order(int64_t blocks) {
  std::vector<int64_t> order(blocks);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::shuffle(order.begin(), order.end(), std::mt19937_64(static_cast<uint64_t>(emulated.seed)));
  return order;
}

void poison(const at::Tensor& t) {
  if (t.numel()) std::memset(t.data_ptr(), 0xff, t.numel() * t.element_size());
}

// Groups of a block run one after another here, at once on the device: a group that wrote past
// its shared-memory rows would go unseen, so the rows of the groups still to run (from row
// next_row's on), and the bytes past the block's shared memory, must be as poisoned as they
// started.
template <typename scalar_t>
void check_untouched(const Args<scalar_t>& a, unsigned char* memory, int64_t next_row, int64_t shared_memory,
                     int64_t buffer_bytes) {
  const auto bytes = [](const void* p) { return static_cast<const unsigned char*>(p); };
  const auto poisoned = [](const unsigned char* from, const unsigned char* to) {
    return std::all_of(from, std::max(from, to), [](unsigned char b) { return b == 0xff; });
  };
  const int64_t rows_per_block = kBlockThreads / a.group;
  const bool last = next_row % rows_per_block == 0;  // the block's groups are done
  const unsigned char* c_area = memory + rows_per_block * a.cache_row * sizeof(scalar_t);
  const unsigned char* end = memory + shared_memory;
  const unsigned char* cache = last ? c_area : bytes(logits_cache(a, memory, next_row));
  const unsigned char* c_cache = !a.probabilities || last ? end : bytes(coefficient_cache(a, memory, next_row));
  TORCH_CHECK(poisoned(cache, c_area) && poisoned(c_cache, memory + buffer_bytes),
              "apl emulation: a group wrote into another group's shared memory");
}

template <typename scalar_t>
void emulate_forward(const ForwardCall<scalar_t>& f) {
  using S = at::opmath_type<scalar_t>;
  const Args<scalar_t>& a = f.args;
  poison(f.loss);
  poison(f.records);
  poison(f.workspace);
  if (a.reduction != kNone) *a.counter = 0;  // the device's cudaMemsetAsync
  const int rows_per_block = kBlockThreads / a.group;
  std::vector<Chunk> memory(f.launch.shared_memory / sizeof(Chunk) + 1);
  std::vector<S> mine(kBlockThreads);
  for (const int64_t block : block_order(a.blocks)) {
    std::memset(memory.data(), 0xff, memory.size() * sizeof(Chunk));
    std::fill(mine.begin(), mine.end(), S(0));
    for (int group = 0; group < rows_per_block; ++group) {
      const int64_t r = block * rows_per_block + group;
      mine[group * a.group] = forward_row(HostGroup{a.group, block, r}, a, memory.data()->bytes);
      if (a.cache) check_untouched(a, memory.data()->bytes, r + 1, f.launch.shared_memory, memory.size() * sizeof(Chunk));
    }
    if (a.reduction == kNone) {
      if (block == 0) finish_unreduced(a);
    } else {
      finish_reduction(HostGroup{kBlockThreads, block}, a, mine.data());
    }
  }
}

template <typename scalar_t>
void emulate_backward(const BackwardCall<scalar_t>& b) {
  poison(b.grad);
  const int rows_per_block = kBlockThreads / b.args.group;
  for (const int64_t block : block_order(b.args.rows > 0 ? b.args.blocks : 0)) {
    for (int group = 0; group < rows_per_block; ++group) {
      backward_row(HostGroup{b.args.group, block}, b.args, block * rows_per_block + group);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> cuda_emulation(const at::Tensor& logits, const at::Tensor& target,
                                                  const c10::optional<at::Tensor>& weight, at::IntArrayRef bases,
                                                  at::ArrayRef<double> coefficients, at::IntArrayRef options) {
  const OpCall call = decode_call(logits, target, weight, bases, coefficients, options);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_cuda_emulation", [&] {
    return forward_op<scalar_t>(logits, target, weight, call, emulated.shared_memory, static_cast<int>(emulated.group),
                                emulate_forward<scalar_t>, emulate_backward<scalar_t>);
  });
}

at::Tensor cuda_emulation_backward(const at::Tensor& logits, const at::Tensor& target,
                                   const c10::optional<at::Tensor>& weight, const at::Tensor& stats,
                                   const at::Tensor& grad_loss, at::IntArrayRef bases,
                                   at::ArrayRef<double> coefficients, at::IntArrayRef options) {
  const OpCall call = decode_call(logits, target, weight, bases, coefficients, options);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                         "apl_cuda_emulation_backward", [&] {
    const BackwardCall<scalar_t> b = prepare_backward<scalar_t>(logits, target, weight, stats, grad_loss, call,
                                                                static_cast<int>(emulated.group));
    emulate_backward(b);
    return b.result(target);
  });
}

void cuda_emulation_launch(int64_t group, int64_t shared_memory, int64_t seed) {
  TORCH_CHECK_VALUE(group == 0 || group == 4 || group == kWarp || group == kBlockThreads,
                    "apl: the emulated group must be 0 (the kernel's choice), 4, 32 or 512; got ", group);
  emulated = {group, shared_memory, seed};
}

}  // namespace
}  // namespace gpu

TORCH_LIBRARY_FRAGMENT(apl, m) {
  m.def("cuda_emulation(Tensor logits, Tensor target, Tensor? weight, int[] bases, float[] coefficients, "
        "int[] options) -> (Tensor, Tensor)");
  m.def("cuda_emulation_backward(Tensor logits, Tensor target, Tensor? weight, Tensor stats, Tensor grad_loss, "
        "int[] bases, float[] coefficients, int[] options) -> Tensor");
  m.def("cuda_emulation_launch(int group, int shared_memory, int seed) -> ()", &gpu::cuda_emulation_launch);
}

TORCH_LIBRARY_IMPL(apl, CPU, m) {
  m.impl("cuda_emulation", &gpu::cuda_emulation);
  m.impl("cuda_emulation_backward", &gpu::cuda_emulation_backward);
}

}  // namespace apl
