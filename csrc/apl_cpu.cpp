// The fused losses on CPU, and the ops' schemas.
//
// Rows are cut into blocks whose length depends on K only; blocks run in parallel
// (at::parallel_for) and each adds up its rows' losses, so a reduced loss is the same whatever the
// number of threads. Each row is read from memory once: pass 1 takes its max (converting the row to
// the accumulation type first if it is strided or of a half type), pass 2 stores e = exp(z - max) in
// a scratch row and sums it and z - max, pass 3 (only when a term needs sums over the row, see
// term_needs_pass) gathers the terms' sums of apl_rowmath.h and keeps their V' per element, pass 4
// writes the gradient. Passes 2-4 work on the row in L1 cache, in at::vec vectors: the element math
// of apl_rowmath.h is written once as templates and instantiated here on vectors (through the Math
// specialization of apl_cpu_vec.h), on scalars by the CUDA kernels.
//
// The CPU computes the gradient in forward (GRAD_IN_FORWARD): it is bound by its exponentials, and
// a backward that recomputed them would double its cost.

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "apl_cpu_vec.h"
#include "apl_op.h"

namespace apl {

namespace {

// The passes over one row of K contiguous acc_t, with scratch rows of whole vectors: a copy of the
// row (for callers that must convert it), e = exp(z - max), the coefficients c of a dense row,
// each term's V', and (for the targets' gradient) each term's T (V; V - W for split).
template <typename acc_t>
class RowKernel {
 public:
  using V = Vec<acc_t>;
  static constexpr int64_t kLanes = V::size();

  // Rows of K elements of a loss over `classes` labels (K itself but for a class-parallel shard).
  RowKernel(int64_t K, const LossParams& params, bool dense, acc_t grad_scale, bool target_grad = false,
            int64_t classes = 0)
      : K_(K), classes_(classes ? classes : K), params_(params), dense_(dense), target_grad_(target_grad),
        grad_scale_(grad_scale),
        padded_((K + kLanes - 1) / kLanes * kLanes),
        scratch_((3 + (target_grad ? 2 : 1) * kMaxTerms) * padded_, acc_t(0)) {}

  // Where a caller may convert a row to acc_t; where a dense row's coefficients go (zero past K);
  // and where the gradient may be written (over e: each vector is read before it is written).
  acc_t* input_row() { return scratch_.data(); }
  acc_t* coefficient_row() { return scratch_.data() + 2 * padded_; }
  acc_t* gradient_row() { return e(); }

  // The loss of row z and its gradient (times grad_scale) into grad unless that is null. One-hot
  // rows: label y in [0, K) with coefficient label_c (= C). Dense rows: coefficient_row() holds c,
  // total_c its sum, y is unused; with target_grad (a kernel made for it, grad not null), the
  // targets' gradient (times grad_scale) into target_grad: dL/dc[k] times target_factor[k] =
  // (1 - eps) w[k] (apl_rowmath.h, "Targets' gradient").
  acc_t operator()(const acc_t* z, int64_t y, acc_t label_c, acc_t total_c, acc_t* grad,
                   acc_t* target_grad = nullptr, const acc_t* target_factor = nullptr) {
    const int64_t K = K_, full = K / kLanes * kLanes, tail = K - full;
    const V minus_inf(-std::numeric_limits<acc_t>::infinity());
    // Pass 1: the max (NaN if a logit is NaN).
    V max_v = minus_inf;
    for (int64_t i = 0; i < full; i += kLanes) max_v = at::vec::maximum(max_v, V::loadu(z + i));
    if (tail) max_v = at::vec::maximum(max_v, V::blendv(minus_inf, V::loadu(z + full, tail), lanes_below<acc_t>(tail)));
    RowStats<acc_t> row;
    row.max_z = horizontal_max(max_v);
    const acc_t s = exponentials(z, row.max_z, &row.sum_shifted);
    row.set_sum_exp(s);
    if (!row.defined()) return undefined(grad, target_grad);
    const acc_t inv_s = acc_t(1) / s;
    if (dense_) {
      const acc_t value = finish<true>(z, y, label_c, total_c, grad, row, inv_s);
      if (target_grad) {
        TargetCoefs<acc_t> k = target_coefs<acc_t>(params_, sums_, row, classes_);
        k.scale_gradient(grad_scale_);
        write_target_grad(target_grad, target_factor, k);
      }
      return value;
    }
    return finish<false>(z, y, label_c, total_c, grad, row, inv_s);
  }

  // Class-parallel shards (apl_kernels/distributed/class_parallel.py): z is this rank's K columns of
  // a row of `classes` (the kernel's), whose global max and log s are given, and y the label's
  // column here (-1 where another rank holds it). Every term's sums over these columns (a sum over
  // the row is the sum of the ranks' parts), with nce's D from its elements, as any other ratio's.
  // Since lp = z - lse, a derivative sum (sum omega V', sum V') is minus its sum's d/d lse.
  void shard_sums(const acc_t* z, int64_t y, acc_t label_c, acc_t total_c, acc_t max_z, acc_t log_s,
                  TermSums<acc_t>* out) {
    RowStats<acc_t> row;
    acc_t inv_s;
    if (!shard_row(z, max_z, log_s, row, inv_s)) {
      constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
      std::fill(out, out + params_.num_terms, TermSums<acc_t>{kNaN, kNaN, kNaN, kNaN});
      return;
    }
    if (dense_) {
      gather<true>(z, y, label_c, total_c, row, inv_s, false, true);
    } else {
      gather<false>(z, y, label_c, total_c, row, inv_s, false, true);
    }
    std::copy(sums_, sums_ + params_.num_terms, out);
  }

  // The gradient of a shard's columns from the row's global coefficients k (alpha_t = dF/dD_t,
  // beta_t = dF/dN_t of the global sums, H = -dF/dlse: grad = sum_t (alpha_t + beta_t omega_t) V'_t
  // - p H, as for a whole row), and with target_grad the targets' gradient from G = dF/dC: a term's
  // delta_t is its dF/d(sum), beta_t, negated for the reverse family (dL/dc[k] = -V[k] there).
  void shard_gradient(const acc_t* z, int64_t y, acc_t label_c, acc_t total_c, acc_t max_z, acc_t log_s,
                      const RowCoefs<acc_t>& k, acc_t target_constant, acc_t* grad, acc_t* target_grad,
                      const acc_t* target_factor) {
    RowStats<acc_t> row;
    acc_t inv_s;
    if (!shard_row(z, max_z, log_s, row, inv_s)) {
      undefined(grad, target_grad);
      return;
    }
    if (!dense_) {
      gather<false>(z, y, label_c, total_c, row, inv_s, true, true);
      write_gradient<false>(k, y, label_c, total_c, inv_s, grad);
      return;
    }
    gather<true>(z, y, label_c, total_c, row, inv_s, true, true);
    write_gradient<true>(k, y, label_c, total_c, inv_s, grad);
    if (target_grad) {
      TargetCoefs<acc_t> target{target_constant};
      for (int t = 0; t < params_.num_terms; ++t) {
        target.slope[t] = family_of(params_.base[t]) == kReverse ? -k.beta[t] : k.beta[t];
      }
      write_target_grad(target_grad, target_factor, target);
    }
  }

 private:
  acc_t* e() { return scratch_.data() + padded_; }
  acc_t* derivative_row(int t) { return scratch_.data() + (3 + t) * padded_; }
  acc_t* value_row(int t) { return scratch_.data() + (3 + kMaxTerms + t) * padded_; }

  // Pass 2 over a row whose max is max_z: e = exp(z - max_z) (0 past K), and sum (z - max_z) into
  // *sum_shifted; returns s = sum e.
  acc_t exponentials(const acc_t* z, acc_t max_z, acc_t* sum_shifted) {
    const int64_t K = K_, full = K / kLanes * kLanes, tail = K - full;
    const V zero(acc_t(0)), max_vec(max_z);
    acc_t* e = this->e();
    BlockedSum<V> s_v, shifted_v;
    for (int64_t i = 0; i < full; i += kLanes) {
      const V shifted = V::loadu(z + i) - max_vec;
      const V x = Math<V>::exp(shifted);
      x.store(e + i);
      s_v.add(x);
      shifted_v.add(shifted);
    }
    if (tail) {
      const V counted = lanes_below<acc_t>(tail);
      const V shifted = V::blendv(zero, V::loadu(z + full, tail) - max_vec, counted);
      const V x = V::blendv(zero, Math<V>::exp(shifted), counted);
      x.store(e + full);
      s_v.add(x);
      shifted_v.add(shifted);
    }
    *sum_shifted = horizontal_sum(shifted_v.result());
    return horizontal_sum(s_v.result());
  }

  // A shard's row statistics are the global max and log s (set_log_sum_exp: 1 - p at the global max,
  // on whichever rank holds it), and its e = exp(z - max) from the global max. False where the row's
  // softmax is undefined.
  bool shard_row(const acc_t* z, acc_t max_z, acc_t log_s, RowStats<acc_t>& row, acc_t& inv_s) {
    row.max_z = max_z;
    row.set_log_sum_exp(log_s);
    if (!row.defined()) return false;
    exponentials(z, max_z, &row.sum_shifted);
    inv_s = std::exp(-log_s);
    return true;
  }

  // A row whose softmax is undefined (RowStats::defined): NaN loss and gradients.
  acc_t undefined(acc_t* grad, acc_t* target_grad) const {
    constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
    if (grad) std::fill(grad, grad + K_, kNaN);
    if (target_grad) std::fill(target_grad, target_grad + K_, kNaN);
    return kNaN;
  }

  // The targets' gradient of a dense row whose term passes have stored their T (value_row: V,
  // V - W for split), from its coefficients k.
  void write_target_grad(acc_t* out, const acc_t* factor, const TargetCoefs<acc_t>& k) {
    const V constant(k.constant);
    const acc_t* c = coefficient_row();
    for (int64_t i = 0; i < K_; i += kLanes) {
      const int64_t count = std::min(kLanes, K_ - i);
      const V c_i = V::loadu(c + i);
      V g = constant;
      for (int t = 0; t < params_.num_terms; ++t) {
        g = g + V(k.slope[t]) * zero_coefficient_term(V::loadu(value_row(t) + i), c_i);
      }
      g = g * load(factor + i, count);
      count == kLanes ? g.store(out + i) : g.store(out + i, count);
    }
  }

  // Pass 3 for term t, whose base kBase is known at compile time (its element is
  // base_element<kBase>, inlined): its sums over the row, and its V' per element into
  // derivative_row(t) when `store` (the gradient pass reads them); with `target_grad` (dense rows)
  // its T into value_row(t) and the sum the targets' gradient reads as `plain` (reverse, split).
  template <bool kDense, int kBase>
  TermSums<acc_t> term_pass(int t, const acc_t* z, int64_t y, acc_t total_c, const RowStats<acc_t>& row, acc_t inv_s,
                            bool store, bool target_grad) {
    const int64_t K = K_, classes = classes_;
    constexpr int kFamily = family_of(kBase);
    const V zero(acc_t(0)), max_vec(row.max_z), log_s_v(row.log_s), inv_s_v(inv_s), total_c_v(total_c);
    const V lane_index = V::arange(acc_t(0), acc_t(1));
    const acc_t* e = this->e();
    const acc_t* c = coefficient_row();
    acc_t* derivatives = derivative_row(t);
    acc_t* values = value_row(t);
    VectorSums<acc_t> sum;
    // `counted`: lanes that are elements of the row; `off_label`: (one-hot rows) those that are not
    // the label. Masks only for the vector holding the label and a partial last vector.
    auto accumulate = [&](int64_t i, int64_t count, auto counted, auto off_label) {
      const V p = V::loadu(e + i) * inv_s_v;
      const V lp = (load(z + i, count) - max_vec) - log_s_v;
      Element<V> el;
      if constexpr (kDense && kFamily == kSplit) {  // its V and W once, for the targets' gradient too
        const Element<V> at = base_element<kBase, V, acc_t>(p, lp, row, params_, classes);
        const Element<V> off = off_label_element<kBase, V, acc_t>(p, lp, row, params_, classes);
        el = split_element<V, acc_t>(at, off, V::loadu(c + i), total_c);
        if (target_grad) {  // its T = V - W, and S = sum W
          (at.value - off.value).store(values + i);
          sum.plain.add(Math<V>::where(counted, off.value, zero));
        }
      } else if constexpr (kDense) {
        el = dense_element<kBase, V, acc_t>(p, lp, V::loadu(c + i), total_c, row, params_, classes);
      } else {
        el = off_label_element<kBase, V, acc_t>(p, lp, row, params_, classes);
      }
      if (store) el.derivative.store(derivatives + i);
      if constexpr (kDense) {
        const V w = Math<V>::where(counted, omega<V, acc_t>(kBase, V::loadu(c + i), total_c), zero);
        // A label of coefficient 0 adds nothing, even where V is infinite (a masked class).
        sum.weighted.add(Math<V>::where(w != zero, w * el.value, zero));
        sum.weighted_derivative.add(w * el.derivative);
        // The targets' gradient reads T = V (target_element), and the reverse family's S = sum V.
        if (target_grad && kFamily != kSplit) {
          el.value.store(values + i);
          if constexpr (kFamily == kReverse) sum.plain.add(Math<V>::where(counted, el.value, zero));
        }
      } else if constexpr (sums_off_label(kBase)) {
        sum.weighted.add(Math<V>::where(off_label, total_c_v * el.value, zero));
        sum.weighted_derivative.add(Math<V>::where(off_label, total_c_v * el.derivative, zero));
      }
      if constexpr (kFamily == kNormalized || kFamily == kNegative) {
        sum.plain.add(Math<V>::where(counted, el.value, zero));
        sum.plain_derivative.add(Math<V>::where(counted, el.derivative, zero));
      }
    };
    for (int64_t i = 0; i < K; i += kLanes) {
      const int64_t count = std::min(kLanes, K - i);
      if (count == kLanes && (kDense || y < i || y >= i + kLanes)) {
        accumulate(i, count, AllLanes{}, AllLanes{});
      } else {
        const V counted = lanes_below<acc_t>(count);
        accumulate(i, count, counted, counted & (lane_index != V(acc_t(y - i))));
      }
    }
    return sum.result();
  }

  // Calls f(std::integral_constant<int, base>{}) for every base of the catalogue; decode_call has
  // refused any other index.
  template <typename F>
  static auto with_base(int base, F&& f) {
    switch (base) {
#define APL_WITH_BASE_CASE(NAME) \
  case k##NAME: return f(std::integral_constant<int, k##NAME>{});
      APL_BASES(APL_WITH_BASE_CASE)
#undef APL_WITH_BASE_CASE
    }
    TORCH_CHECK_VALUE(false, "apl: unknown base loss index ", base);
  }

  // Pass 3 for the terms that need it, the coefficients, and pass 4 (the gradient).
  template <bool kDense>
  acc_t finish(const acc_t* z, int64_t y, acc_t label_c, acc_t total_c, acc_t* grad, const RowStats<acc_t>& row,
               acc_t inv_s) {
    gather<kDense>(z, y, label_c, total_c, row, inv_s, grad != nullptr, false);
    RowCoefs<acc_t> k = row_coefs<acc_t>(params_, sums_, row, total_c, classes_);
    if (!grad) return k.value;
    k.scale_gradient(grad_scale_);
    write_gradient<kDense>(k, y, label_c, total_c, inv_s, grad);
    return k.value;
  }

  // Pass 3: the terms' sums into sums_ (their V' kept for pass 4 when `store`), and for one-hot rows
  // the label's elements. A whole row skips the passes term_needs_pass spares; a shard (`shard`)
  // runs one for every term but the local ones of one-hot rows, since its D of nce is not the row's.
  template <bool kDense>
  void gather(const acc_t* z, int64_t y, acc_t label_c, acc_t total_c, const RowStats<acc_t>& row, acc_t inv_s,
              bool store, bool shard) {
    const int terms = params_.num_terms;
    for (int t = 0; t < terms; ++t) {
      const int base = params_.base[t];
      sums_[t] = TermSums<acc_t>{};
      stored_[t] = false;
      if (shard ? !kDense && family_of(base) == kLocal : !term_needs_pass(base, kDense)) continue;
      stored_[t] = store;
      sums_[t] = with_base(base, [&](auto b) {
        return term_pass<kDense, decltype(b)::value>(t, z, y, total_c, row, inv_s, store,
                                                     target_grad_ && (store || shard));
      });
    }
    // One-hot rows: the sums of omega = c, which is label_c at the label and 0 elsewhere (added to a
    // split term's sums off the label). A shard without the label (y = -1) has none.
    if constexpr (!kDense) {
      if (y < 0 || y >= K_) return;
      p_label_ = e()[y] * inv_s;
      const acc_t lp_label = (z[y] - row.max_z) - row.log_s;
      for (int t = 0; t < terms; ++t) {
        at_label_[t] = element<acc_t, acc_t>(params_.base[t], p_label_, lp_label, row, params_, classes_);
        if (family_of(params_.base[t]) != kReverse) {
          sums_[t].weighted += label_c == acc_t(0) ? acc_t(0) : label_c * at_label_[t].value;
          sums_[t].weighted_derivative += label_c * at_label_[t].derivative;
        }
      }
    }
  }

  // Pass 4: grad = sum_t (alpha_t + beta_t omega_t) V'_t - p H, after gather(store). Terms without a
  // pass (one-hot rows) add only nce's alpha (its V' is 1; the local terms' alpha is 0).
  template <bool kDense>
  void write_gradient(const RowCoefs<acc_t>& k, int64_t y, acc_t label_c, acc_t total_c, acc_t inv_s, acc_t* grad) {
    const int64_t K = K_;
    const int terms = params_.num_terms;
    const acc_t* e = this->e();
    const V inv_s_v(inv_s), h_v(k.total_h);
    const acc_t* c = coefficient_row();
    acc_t off_label[kMaxTerms];  // one-hot rows: alpha_t + beta_t omega_t away from the label
    acc_t constant = 0;
    for (int t = 0; t < terms; ++t) {
      off_label[t] = k.alpha[t] + (sums_off_label(params_.base[t]) ? k.beta[t] * total_c : acc_t(0));
      if (!stored_[t]) constant += params_.base[t] == kNCE ? off_label[t] : acc_t(0);
    }
    const V constant_v(constant);
    for (int64_t i = 0; i < K; i += kLanes) {
      const V p = V::loadu(e + i) * inv_s_v;
      V g = constant_v - p * h_v;
      for (int t = 0; t < terms; ++t) {
        if (!stored_[t]) continue;
        if constexpr (kDense) {
          const V w = omega<V, acc_t>(params_.base[t], V::loadu(c + i), total_c);
          g = g + (V(k.alpha[t]) + V(k.beta[t]) * w) * V::loadu(derivative_row(t) + i);
        } else {
          g = g + V(off_label[t]) * V::loadu(derivative_row(t) + i);
        }
      }
      if (i + kLanes <= K) {
        g.store(grad + i);
      } else {
        g.store(grad + i, K - i);
      }
    }
    if constexpr (!kDense) {
      if (y < 0 || y >= K) return;
      acc_t g = -p_label_ * k.total_h;
      for (int t = 0; t < terms; ++t) {
        const bool reverse = family_of(params_.base[t]) == kReverse;
        g += (k.alpha[t] + (reverse ? acc_t(0) : k.beta[t] * label_c)) * at_label_[t].derivative;
      }
      grad[y] = g;
    }
  }

  int64_t K_, classes_;
  LossParams params_;
  bool dense_, target_grad_;
  acc_t grad_scale_;
  // The last row's gather(): each term's sums, whether its V' is stored, and (one-hot rows) the
  // label's p and elements.
  TermSums<acc_t> sums_[kMaxTerms];
  bool stored_[kMaxTerms] = {false, false};
  Element<acc_t> at_label_[kMaxTerms];
  acc_t p_label_ = 0;
  int64_t padded_;
  std::vector<acc_t> scratch_;
};

// Rows per block: about kBlockElements logits. Threads take whole blocks, so blocks are kept small
// enough to share out evenly even when a batch is small.
constexpr int64_t kBlockElements = 4096;

// Reads row r of a (rows, K) tensor of any strides and floating dtype as contiguous acc_t: in place
// when it already is, else converted into `buffer`.
template <typename acc_t>
struct RowReader {
  const at::Tensor& tensor;
  template <typename scalar_t>
  const acc_t* read(int64_t r, acc_t* buffer) const {
    const int64_t K = tensor.size(1), col_stride = tensor.stride(1);
    const scalar_t* row = tensor.const_data_ptr<scalar_t>() + r * tensor.stride(0);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (col_stride == 1) return row;
    }
    if (col_stride == 1) {
      at::vec::convert(row, buffer, K);
    } else {
      for (int64_t i = 0; i < K; ++i) buffer[i] = static_cast<acc_t>(row[i * col_stride]);
    }
    return buffer;
  }
};

// Row r of a tensor of any floating dtype, as contiguous acc_t.
template <typename acc_t>
const acc_t* read_any(const RowReader<acc_t>& reader, int64_t r, acc_t* buffer) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, reader.tensor.scalar_type(), "apl_read_row",
                                         [&] { return reader.template read<scalar_t>(r, buffer); });
}

// What a call's rows share: the class weights and the label smoothing, as the coefficients c.
template <typename acc_t>
struct Coefficients {
  std::vector<acc_t> weight;  // w (K), 1 without class weights
  std::vector<acc_t> spread;  // eps / K * w: what smoothing puts on every label
  acc_t spread_total = 0;
  acc_t keep = 1;  // 1 - eps

  // K classes here, of num_classes in the loss (a class-parallel shard's K of the global K).
  Coefficients(const c10::optional<at::Tensor>& w, int64_t K, double label_smoothing, int64_t num_classes = 0)
      : weight(K, acc_t(1)), spread(K), keep(acc_t(1 - label_smoothing)) {
    if (w.has_value()) {
      const at::Tensor values = w->to(at::kDouble).contiguous();
      const double* data = values.const_data_ptr<double>();
      for (int64_t i = 0; i < K; ++i) weight[i] = static_cast<acc_t>(data[i]);
    }
    for (int64_t i = 0; i < K; ++i) {
      spread[i] = static_cast<acc_t>(label_smoothing / static_cast<double>(num_classes ? num_classes : K)) * weight[i];
      spread_total += spread[i];
    }
  }

  // A dense row's coefficients c = w ((1 - eps) t + eps / K) from its targets t (which may be c
  // itself: each vector is read before it is written), their sum, and whether any is nonzero (the
  // sum of |c|, which is 0 only when every c is). In vectors: a scalar loop's serial sum took
  // about as long as the rest of the row's passes at K = 100.
  void dense_row(const acc_t* t, acc_t* c, int64_t K, acc_t& total, acc_t& any) const {
    using V = Vec<acc_t>;
    const V keep_v(keep);
    V total_v(acc_t(0)), magnitude_v(acc_t(0));
    int64_t i = 0;
    for (; i + V::size() <= K; i += V::size()) {
      const V ci = keep_v * V::loadu(weight.data() + i) * V::loadu(t + i) + V::loadu(spread.data() + i);
      ci.store(c + i);
      total_v = total_v + ci;
      magnitude_v = magnitude_v + ci.abs();
    }
    total = horizontal_sum(total_v);
    any = horizontal_sum(magnitude_v);
    for (; i < K; ++i) {
      c[i] = keep * weight[i] * t[i] + spread[i];
      total += c[i];
      any += std::abs(c[i]);
    }
  }
};

// Every row's loss (into row_loss unless it is null) and gradient (into grad unless it is empty,
// of grad_t: scalar_t, or acc_t for the (2, R, K) pair with the targets' gradient, call.target_grad);
// returns the sum of the row losses. Rows go in blocks of a length that depends on K only, each
// block's sum taken in order and the blocks' sums added in order: the same result for any number of
// threads.
template <typename scalar_t, typename grad_t>
double loss_rows_cpu(const at::Tensor& logits, const at::Tensor& target, const Coefficients<at::opmath_type<scalar_t>>& co,
                     const OpCall& call, double grad_scale, at::opmath_type<scalar_t>* row_loss, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSameType = std::is_same_v<grad_t, acc_t>;
  const int64_t rows = logits.size(0), K = logits.size(1);
  grad_t* grad_out = grad.numel() ? grad.mutable_data_ptr<grad_t>() : nullptr;
  // The targets' gradient: the second half of the pair, and each class's (1 - eps) w[k].
  acc_t* target_grad_out = call.target_grad ? reinterpret_cast<acc_t*>(grad_out) + rows * K : nullptr;
  std::vector<acc_t> target_factor(call.target_grad ? K : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(target_factor.size()); ++i) target_factor[i] = co.keep * co.weight[i];
  const int64_t* labels = call.probabilities ? nullptr : target.const_data_ptr<int64_t>();
  const int64_t rows_per_block = std::max<int64_t>(1, kBlockElements / K);
  const int64_t num_blocks = (rows + rows_per_block - 1) / rows_per_block;
  std::vector<double> block_sums(num_blocks);
  at::parallel_for(0, num_blocks, 1, [&](int64_t first_block, int64_t end_block) {
    RowKernel<acc_t> kernel(K, call.params, call.dense, static_cast<acc_t>(grad_scale), call.target_grad);
    const RowReader<acc_t> logits_reader{logits}, target_reader{target};
    acc_t* c = kernel.coefficient_row();
    for (int64_t b = first_block; b < end_block; ++b) {
      double block_sum = 0;
      for (int64_t r = b * rows_per_block; r < std::min(rows, (b + 1) * rows_per_block); ++r) {
        grad_t* grad_row = grad_out ? grad_out + r * K : nullptr;
        acc_t* target_grad_row = target_grad_out ? target_grad_out + r * K : nullptr;
        const int64_t y = labels ? labels[r] : -1;
        // The row's coefficients: c[y] = label_c for a one-hot row; a dense row's in c.
        acc_t label_c = 0, total_c = 0, any_c = 0;
        if (labels && y != call.ignore_index) {
          label_c = co.keep * co.weight[y];
          total_c = label_c + co.spread_total;
          any_c = label_c != acc_t(0) || co.spread_total != acc_t(0) ? acc_t(1) : acc_t(0);
          if (call.dense) {
            std::copy(co.spread.begin(), co.spread.end(), c);
            c[y] += label_c;
          }
        } else if (!labels) {
          co.dense_row(read_any(target_reader, r, c), c, K, total_c, any_c);
        }
        acc_t loss = 0;
        if (any_c == acc_t(0)) {  // ignored, or no coefficient on any label: 0 (as the reference)
          if (grad_row) std::fill(grad_row, grad_row + K, grad_t(0));
          if (target_grad_row) std::fill(target_grad_row, target_grad_row + K, acc_t(0));
        } else {
          const acc_t* z = logits_reader.template read<scalar_t>(r, kernel.input_row());
          acc_t* grad_acc = nullptr;
          if (grad_row) grad_acc = kSameType ? reinterpret_cast<acc_t*>(grad_row) : kernel.gradient_row();
          loss = kernel(z, y, label_c, total_c, grad_acc, target_grad_row, target_factor.data());
          if constexpr (!kSameType) {
            if (grad_row) at::vec::convert(grad_acc, grad_row, K);
          }
        }
        if (row_loss) row_loss[r] = loss;
        block_sum += loss;
      }
      block_sums[b] = block_sum;
    }
  });
  double total = 0;
  for (const double block_sum : block_sums) total += block_sum;
  return total;
}

// The loss of a decoded call, and its gradient into `grad` (unless it is empty): a new tensor, or the
// logits themselves (fused_loss_). In place is safe row by row: a row is read (into its max, e and
// V' scratch rows of RowKernel) before pass 4 writes its gradient from those scratch rows alone.
at::Tensor loss_cpu(const at::Tensor& logits, const at::Tensor& target_in, const c10::optional<at::Tensor>& weight,
                    const OpCall& call, at::Tensor& grad) {
  const at::Tensor target = call.probabilities ? target_in : target_in.contiguous();
  const int64_t rows = logits.size(0), K = logits.size(1);
  // Every label is checked before any logit is read; a mean divides by the summed weight of the
  // counted rows (the number of rows for probabilities), by 1 when that is 0.
  double divisor = static_cast<double>(rows);
  if (!call.probabilities) {
    const at::Tensor weights = weight.has_value() ? weight->to(at::kDouble).contiguous() : at::Tensor();
    const double* w = weights.defined() ? weights.const_data_ptr<double>() : nullptr;
    const int64_t* labels = target.const_data_ptr<int64_t>();
    divisor = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t y = labels[r];
      if (y == call.ignore_index) continue;
      TORCH_CHECK_VALUE(y >= 0 && y < K, "target ", y, " at flat position ", r, " is outside [0, ", K,
                        ") and is not ignore_index (", call.ignore_index, ")");
      divisor += w ? w[y] : 1.0;
    }
  }
  if (divisor == 0) divisor = 1;  // every row ignored (or weighted 0): the mean is 0
  const auto loss_options = logits.options().dtype(accumulation_type(logits));
  at::Tensor loss = call.reduction == kNone ? at::empty({rows}, loss_options) : at::empty({}, loss_options);
  const double grad_scale = call.reduction == kMean ? 1.0 / divisor : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_fused_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Coefficients<acc_t> co(weight, K, call.params.label_smoothing);
    acc_t* row_loss = call.reduction == kNone ? loss.mutable_data_ptr<acc_t>() : nullptr;
    const double total = call.target_grad
                             ? loss_rows_cpu<scalar_t, acc_t>(logits, target, co, call, grad_scale, row_loss, grad)
                             : loss_rows_cpu<scalar_t, scalar_t>(logits, target, co, call, grad_scale, row_loss, grad);
    if (call.reduction != kNone) {
      *loss.mutable_data_ptr<acc_t>() = static_cast<acc_t>(call.reduction == kMean ? total / divisor : total);
    }
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> fused_loss_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                  const c10::optional<at::Tensor>& weight, at::IntArrayRef bases,
                                                  at::ArrayRef<double> coefficients, at::IntArrayRef options) {
  const OpCall call = decode_call(logits, target, weight, bases, coefficients, options);
  TORCH_CHECK(call.grad_mode != kGradInBackward,
              "apl: the CPU kernel computes the gradient in forward (gradient mode 1), not in backward (2)");
  // The targets' gradient: the pair in the accumulation type, then gradient_output's dtype (a copy where it differs).
  at::Tensor grad = call.grad_mode != kGradInForward ? at::empty({0}, logits.options())
                    : call.target_grad ? at::empty({2, logits.size(0), logits.size(1)}, logits.options().dtype(accumulation_type(logits)))
                                       : at::empty(logits.sizes(), logits.options());
  at::Tensor loss = loss_cpu(logits, target, weight, call, grad);
  if (call.target_grad) grad = grad.to(at::promoteTypes(logits.scalar_type(), target.scalar_type()));
  return {loss, grad};
}

// fused_loss with the gradient written over the logits (contiguous, gradient mode 1): the loss
// alone is returned. For callers that form the logits only to take this gradient (the fused
// linear + loss): no gradient-sized allocation, as Liger-Kernel's cross entropy overwrites its input.
at::Tensor fused_loss_inplace_cpu(at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                                  at::IntArrayRef bases, at::ArrayRef<double> coefficients, at::IntArrayRef options) {
  const OpCall call = decode_call(logits, target, weight, bases, coefficients, options);
  TORCH_CHECK_VALUE(call.grad_mode == kGradInForward, "apl: fused_loss_ writes the gradient over the logits: its "
                    "gradient mode (options[", kOptionGradMode, "]) must be 1 (in forward); got ", call.grad_mode);
  TORCH_CHECK_VALUE(!call.target_grad, "apl: fused_loss_ writes the logits' gradient alone over the logits; for the "
                    "targets' gradient (options[", kOptionTargetGrad, "]) call fused_loss");
  TORCH_CHECK_VALUE(logits.is_contiguous(), "apl: fused_loss_ writes the gradient over the logits, which must be "
                    "contiguous; got strides ", logits.strides(), " (pass logits.contiguous())");
  for (const at::Tensor* read : {&target, weight.has_value() ? &*weight : nullptr}) {
    TORCH_CHECK_VALUE(!read || at::get_overlap_status(logits, *read) == at::MemOverlapStatus::No,
                      "apl: fused_loss_ writes the gradient over the logits, so the ", read == &target ? "target" : "weight",
                      " must not share their memory; pass a copy (.clone())");
  }
  return loss_cpu(logits, target, weight, call, logits);
}

// -- class-parallel shards (apl_kernels/distributed/class_parallel.py) --------------------------------
// logits: this rank's columns (R, K_r) of a loss over num_classes labels. target: each row's label as
// a column here (-1 where another rank holds it, or the row is ignored), or this rank's columns of
// class probabilities. weight: this rank's class weights. record (R, kStats) float64: RowRecord's
// global max_z, log_s and total_c, and for shard_gradient the row's alpha, beta, H and target_g from
// the global sums. counted (R) bool: the rows with a coefficient on some rank (others give 0).

// Calls f(kernel, r, z, y, label_c, row_record, target_factor) for every row, in parallel: z is null
// for a row that is not counted, row_record the row's kStats doubles of record (total_c at 2), and
// target_factor (with target_grad) dc[k]/dt[k] = (1 - eps) w[k].
template <typename scalar_t, typename F>
void for_each_shard_row(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                        const at::Tensor& record, const at::Tensor& counted, const OpCall& call, int64_t num_classes,
                        F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = logits.size(0), K = logits.size(1);
  TORCH_CHECK_VALUE(record.dim() == 2 && record.size(0) == rows && record.size(1) == kStats &&
                    record.scalar_type() == at::kDouble && record.is_contiguous(),
                    "apl: record must be a contiguous float64 (", rows, ", ", kStats, ") tensor; got ",
                    record.scalar_type(), " of shape ", record.sizes());
  TORCH_CHECK_VALUE(counted.dim() == 1 && counted.size(0) == rows && counted.scalar_type() == at::kBool,
                    "apl: counted must be a bool (", rows, ") tensor; got ", counted.scalar_type(), " of shape ",
                    counted.sizes());
  TORCH_CHECK_VALUE(num_classes >= K, "apl: num_classes (", num_classes, ") is below the shard's ", K, " columns");
  const at::Tensor labels_t = call.probabilities ? at::Tensor() : target.contiguous();
  const int64_t* labels = call.probabilities ? nullptr : labels_t.const_data_ptr<int64_t>();
  for (int64_t r = 0; labels && r < rows; ++r) {
    TORCH_CHECK_VALUE(labels[r] >= -1 && labels[r] < K, "apl: a shard's label column ", labels[r], " at row ", r,
                      " is outside [-1, ", K, ")");
  }
  const at::Tensor counted_c = counted.contiguous();
  const bool* is_counted = counted_c.const_data_ptr<bool>();
  const double* rec = record.const_data_ptr<double>();
  const Coefficients<acc_t> co(weight, K, call.params.label_smoothing, num_classes);
  std::vector<acc_t> target_factor(call.target_grad ? K : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(target_factor.size()); ++i) target_factor[i] = co.keep * co.weight[i];
  at::parallel_for(0, rows, std::max<int64_t>(1, kBlockElements / K), [&](int64_t begin, int64_t end) {
    RowKernel<acc_t> kernel(K, call.params, call.dense, acc_t(1), call.target_grad, num_classes);
    const RowReader<acc_t> logits_reader{logits}, target_reader{target};
    acc_t* c = kernel.coefficient_row();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = labels ? labels[r] : -1;
      const acc_t label_c = y >= 0 ? co.keep * co.weight[y] : acc_t(0);
      if (!is_counted[r]) {
        f(kernel, r, static_cast<const acc_t*>(nullptr), y, label_c, rec + r * kStats, target_factor.data());
        continue;
      }
      if (labels && call.dense) {
        std::copy(co.spread.begin(), co.spread.end(), c);
        if (y >= 0) c[y] += label_c;
      } else if (!labels) {
        acc_t local_total, any;
        co.dense_row(read_any(target_reader, r, c), c, K, local_total, any);
      }
      const acc_t* z = logits_reader.template read<scalar_t>(r, kernel.input_row());
      f(kernel, r, z, y, label_c, rec + r * kStats, target_factor.data());
    }
  });
}

// Each row's sums over this shard's columns: (R, terms, 4) of TermSums (weighted, weighted_derivative,
// plain, plain_derivative), in the accumulation type; 0 for rows not counted.
at::Tensor shard_sums_cpu(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                          const at::Tensor& record, const at::Tensor& counted, at::IntArrayRef bases,
                          at::ArrayRef<double> coefficients, at::IntArrayRef options, int64_t num_classes) {
  const OpCall call = decode_call(logits, target, weight, bases, coefficients, options, num_classes);
  const int terms = call.params.num_terms;
  at::Tensor sums = at::zeros({logits.size(0), terms, 4}, logits.options().dtype(accumulation_type(logits)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_shard_sums_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    static_assert(sizeof(TermSums<acc_t>) == 4 * sizeof(acc_t), "TermSums holds 4 values");
    auto* out = reinterpret_cast<TermSums<acc_t>*>(sums.mutable_data_ptr<acc_t>());
    for_each_shard_row<scalar_t>(logits, target, weight, record, counted, call, num_classes,
                                 [&](RowKernel<acc_t>& kernel, int64_t r, const acc_t* z, int64_t y, acc_t label_c,
                                     const double* row, const acc_t*) {
      if (z) kernel.shard_sums(z, y, label_c, acc_t(row[2]), row[0], row[1], out + r * terms);
    });
  });
  return sums;
}

// The gradient of this shard's columns into grad (contiguous (R, K_r) of the accumulation type; it may
// be the logits themselves: a row is read before its gradient is written), and with target_grad
// (options) the probability targets' gradient into target_grad (the same layout); 0 for rows not
// counted.
void shard_gradient_cpu(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                        const at::Tensor& record, const at::Tensor& counted, at::IntArrayRef bases,
                        at::ArrayRef<double> coefficients, at::IntArrayRef options, int64_t num_classes,
                        at::Tensor& grad, const c10::optional<at::Tensor>& target_grad) {
  const OpCall call = decode_call(logits, target, weight, bases, coefficients, options, num_classes);
  const auto acc = accumulation_type(logits);
  const at::Tensor* outputs[] = {&grad, target_grad.has_value() ? &*target_grad : nullptr};
  for (const at::Tensor* out : outputs) {
    TORCH_CHECK_VALUE(!out || (out->sizes() == logits.sizes() && out->scalar_type() == acc && out->is_contiguous()),
                      "apl: shard_gradient's outputs must be contiguous ", acc, " of the logits' shape ",
                      logits.sizes(), "; got ", out->scalar_type(), " of shape ", out->sizes());
  }
  TORCH_CHECK_VALUE(target_grad.has_value() == call.target_grad, "apl: pass target_grad exactly when options ask "
                    "for the targets' gradient");
  TORCH_CHECK_VALUE(!grad.is_alias_of(logits) ||
                    (logits.data_ptr() == grad.data_ptr() && logits.strides() == grad.strides()),
                    "apl: shard_gradient's grad must be the logits themselves or not share their memory");
  const at::Tensor* target_grad_readers[] = {&grad, &logits, &target};
  for (const at::Tensor* other : target_grad_readers) {
    TORCH_CHECK_VALUE(!target_grad.has_value() || !target_grad->is_alias_of(*other) ||
                      at::get_overlap_status(*target_grad, *other) == at::MemOverlapStatus::No,
                      "apl: shard_gradient's target_grad must not share memory with grad, the logits or the target");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_shard_gradient_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t K = logits.size(1);
    acc_t* grad_out = grad.mutable_data_ptr<acc_t>();
    acc_t* target_out = call.target_grad ? target_grad->mutable_data_ptr<acc_t>() : nullptr;
    for_each_shard_row<scalar_t>(logits, target, weight, record, counted, call, num_classes,
                                 [&](RowKernel<acc_t>& kernel, int64_t r, const acc_t* z, int64_t y, acc_t label_c,
                                     const double* row, const acc_t* target_factor) {
      acc_t* grad_row = grad_out + r * K;
      acc_t* target_row = target_out ? target_out + r * K : nullptr;
      if (!z) {
        std::fill(grad_row, grad_row + K, acc_t(0));
        if (target_row) std::fill(target_row, target_row + K, acc_t(0));
        return;
      }
      RowCoefs<acc_t> k;  // row: RowRecord's order
      k.alpha[0] = acc_t(row[3]), k.beta[0] = acc_t(row[4]), k.alpha[1] = acc_t(row[5]), k.beta[1] = acc_t(row[6]);
      k.total_h = acc_t(row[7]);
      kernel.shard_gradient(z, y, label_c, acc_t(row[2]), acc_t(row[0]), acc_t(row[1]), k, acc_t(row[8]), grad_row,
                            target_row, target_factor);
    });
  });
}

}  // namespace

TORCH_LIBRARY(apl, m) {
  m.def("fused_loss(Tensor logits, Tensor target, Tensor? weight, int[] bases, float[] coefficients, "
        "int[] options) -> (Tensor, Tensor)");
  m.def("fused_loss_(Tensor(a!) logits, Tensor target, Tensor? weight, int[] bases, float[] coefficients, "
        "int[] options) -> Tensor");
  m.def("fused_loss_backward(Tensor logits, Tensor target, Tensor? weight, Tensor stats, Tensor grad_loss, "
        "int[] bases, float[] coefficients, int[] options) -> Tensor");
  m.def("shard_sums(Tensor logits, Tensor target, Tensor? weight, Tensor record, Tensor counted, int[] bases, "
        "float[] coefficients, int[] options, int num_classes) -> Tensor");
  m.def("shard_gradient(Tensor logits, Tensor target, Tensor? weight, Tensor record, Tensor counted, int[] bases, "
        "float[] coefficients, int[] options, int num_classes, Tensor(a!) grad, Tensor(b!)? target_grad) -> ()");
}

TORCH_LIBRARY_IMPL(apl, CPU, m) {
  m.impl("fused_loss", &fused_loss_cpu);
  m.impl("fused_loss_", &fused_loss_inplace_cpu);
  m.impl("shard_sums", &shard_sums_cpu);
  m.impl("shard_gradient", &shard_gradient_cpu);
}

}  // namespace apl
