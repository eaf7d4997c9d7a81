// Per-row math of every loss of the catalogue: the one source of truth that the
// CPU kernel (apl_cpu.cpp) and the CUDA kernel (apl_cuda.cu) both compile.
//
// Notation (one row): logits z[0..K), label y, m = max z, s = sum exp(z - m),
// lp = (z - m) - log s (shifted first: z - (m + log s) loses ~1e-3 at |z| ~ 1e4
// in float32), p = exp(lp), p̂ = clamp(p, 1e-7, 1),
// mask[j] = [p[j] >= 1e-7] (torch's clamp passes the gradient at the bound).
//
// Gradients. With h[j] = dL/dlp[j] (lp taken as free variables and p = exp(lp)),
// dlp[j]/dz[i] = [i == j] - p[i] gives
//
//     dL/dz[i] = h[i] - p[i] * H,        H = sum_j h[j].
//
// For every loss, h has the shape
//
//     h[i] = at_label [i == y] + constant + clamped_p * p[i] mask[i]
//            + powered * P[i] mask[i] + focal * d[i]
//
// with per-row coefficients, P[i] = p̂[i]^q and d[i] = d/dlp of the focal term
// f = -(1 - p)^gamma lp (below). A pair alpha A + beta B adds the weighted
// coefficients of its members: one pass writes its one gradient. Derivations,
// with dp̂[j]/dlp[j] = p[j] mask[j] and dP[j]/dlp[j] = q P[j] mask[j]:
//
//   ce    L = -lp[y]                    h[y] = -1
//   fl    L = -u^g lp[y], u = 1 - p[y]  h[y] = -u^g + g u^(g-1) p[y] lp[y]   (du/dlp = -p)
//                                       official_grad: h[y] = -u^g (u^g constant)
//   gce   L = (1 - P[y]) / q            h[y] = -P[y] mask[y]
//   mae   L = 1 - p[y]                  h[y] = -p[y]
//   nmae  L = (1 - p[y]) / (K-1)        h[y] = -p[y] / (K-1)
//   rce   L = A sum_{j!=y} p̂[j]         h[j] = A p[j] mask[j] for j != y, 0 at y: the
//                                       label's element is computed without off-label terms
//   nrce  rce with 1/(K-1) for A
//   nce   L = lp[y] / S, S = sum lp     h[j] = [j==y]/S - lp[y]/S^2
//   nfl   L = f[y] / F, F = sum f,      h[j] = [j==y] d[y]/F - f[y] d[j]/F^2
//         f[j] = -u[j]^g lp[j],         d[j] = df[j]/dlp[j] = -u[j]^g + g u[j]^(g-1) p[j] lp[j]
//                                       official_grad: d[j] = -u[j]^g
//   ngce  L = (1 - P[y]) / (K - T),     h[j] = -[j==y] q P[y] mask[y] / (K-T)
//         T = sum P                            + (1 - P[y]) q P[j] mask[j] / (K-T)^2
//
// Limits the code takes care of: u^(g-1) is infinite at u = 0 (p == 1 in floating
// point) but multiplies lp ~ -u, so the term is 0 there; p lp is 0 where p = 0
// (a masked class, lp = -inf). 1 - p is computed as -expm1(lp) where p > 1/2 (no cancellation
// near p = 1; only the row's max can be there, so that is one expm1 per row), its
// derivative -p from p. With a masked class, S and F are infinite
// and nce/nfl give value 0 and gradient 0, as their limits.
//
// Row sums. The first pass(es) give m, s and sum (z - m) (nce's S = sum (z - m)
// - K log s); the other sums need p: they are gathered in one more pass only by
// the losses that use them (see row_needs). The last pass writes the gradient.

#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define APL_HD __host__ __device__ __forceinline__
#else
#define APL_HD inline
#endif

namespace apl {

// Base losses, in the order of apl_kernels.catalogue.BASE_LOSSES.
enum Base : int { kCE = 0, kFL, kGCE, kMAE, kRCE, kNCE, kNFL, kNGCE, kNMAE, kNRCE, kNumBases };

constexpr double kClampMin = 1e-7;                // p̂ = clamp(p, 1e-7, 1)
constexpr double kRceA = 9.2103403719761836;      // -ln(1e-4)
constexpr int kMaxTerms = 2;

// The loss of a call: sum of weight[t] * base[t], t < num_terms.
struct LossParams {
  int num_terms;
  int base[kMaxTerms];
  double weight[kMaxTerms];
  double gamma;
  double q;
  double clamp_min_powered;  // 1e-7^q
  bool official_grad;
};

// Which sums beyond m, s and sum (z - m) a row needs: each takes a second pass.
enum Needs : int { kNeedOffLabel = 1, kNeedPowered = 2, kNeedFocal = 4 };

APL_HD int base_needs(int base) {
  switch (base) {
    case kRCE:
    case kNRCE: return kNeedOffLabel;
    case kNGCE: return kNeedPowered;
    case kNFL: return kNeedFocal;
    default: return 0;
  }
}

APL_HD int row_needs(const LossParams& params) {
  int needs = 0;
  for (int t = 0; t < params.num_terms; ++t) needs |= base_needs(params.base[t]);
  return needs;
}

// Math for the element functions below, on a float or a double (std:: picks the
// precision, in host and device code alike). The CPU kernel specializes Math
// for at::vec::Vectorized so that the same templates run on whole vectors.
template <typename T>
struct Math {
  static APL_HD T exp(T x) { return std::exp(x); }
  static APL_HD T expm1(T x) { return std::expm1(x); }
  static APL_HD T sqrt(T x) { return std::sqrt(x); }
  static APL_HD T log(T x) { return std::log(x); }
  static APL_HD T where(bool c, T a, T b) { return c ? a : b; }
  static APL_HD bool ge(T a, T b) { return a >= b; }
  static APL_HD bool gt(T a, T b) { return a > b; }
  static APL_HD bool both(bool a, bool b) { return a && b; }
};

// The sums of a row (its statistics, then the sums some losses need).
template <typename S>
struct RowSums {
  S max_z = 0;             // m
  S log_s = 0;             // log s, s = sum_j exp(z[j] - m)
  S one_minus_p_max = 0;   // 1 - p at the row's max (see set_sum_exp)
  S sum_shifted = 0;       // sum_j (z[j] - m)
  S off_clamped = 0;       // sum_{j != y} p̂[j]          (kNeedOffLabel)
  S off_masked = 0;        // sum_{j != y} p[j] mask[j]
  S powered = 0;           // T = sum_j P[j]              (kNeedPowered)
  S powered_masked = 0;    // sum_j P[j] mask[j]
  S focal = 0;             // F = sum_j f[j]              (kNeedFocal)
  S focal_derivative = 0;  // D = sum_j d[j]
};

// Sets log s and, once per row, 1 - p at the row's max: the only element whose p can
// exceed 1/2 (any other has exp(z - m) <= 1 <= s - exp(z - m)), where z - m = 0 and
// so lp = -log s, and 1 - p = -expm1(-log s) without cancellation.
template <typename S>
APL_HD void set_sum_exp(RowSums<S>& sums, S s) {
  sums.log_s = Math<S>::log(s);
  sums.one_minus_p_max = -Math<S>::expm1(-sums.log_s);
}

// ----------------------------------------------------------------- elements
// V is float, double, or (CPU) a vector of them; S its scalar type.

// p[j] mask[j]: the derivative of p̂[j] w.r.t. lp[j].
template <typename V, typename S>
APL_HD V masked_p(V p) {
  using M = Math<V>;
  return M::where(M::ge(p, V(S(kClampMin))), p, V(S(0)));
}

// p̂[j]
template <typename V, typename S>
APL_HD V clamped_p(V p) {
  using M = Math<V>;
  return M::where(M::ge(p, V(S(kClampMin))), p, V(S(kClampMin)));
}

// P[j] = p̂[j]^q, as exp(q lp) where the clamp is inactive (one exp, no pow);
// params.clamp_min_powered = 1e-7^q where it is active.
template <typename V, typename S>
APL_HD V powered_p(V p, V lp, const LossParams& params) {
  using M = Math<V>;
  return M::where(M::ge(p, V(S(kClampMin))), M::exp(V(S(params.q)) * lp), V(S(params.clamp_min_powered)));
}

// u = 1 - p: as 1 - p where p <= 1/2 (no cancellation there), else it is the
// row's max and u is its precomputed -expm1(lp) (set_sum_exp).
template <typename V, typename S>
APL_HD V one_minus_p(V p, S one_minus_p_max) {
  using M = Math<V>;
  return M::where(M::gt(p, V(S(0.5))), V(one_minus_p_max), V(S(1)) - p);
}

// u^gamma for u in [0, 1]: exact forms for the common gammas, else exp(gamma log u)
// (a fraction of pow's cost; log u = -inf at u = 0 gives 0).
template <typename V, typename S>
APL_HD V power(V u, S gamma) {
  using M = Math<V>;
  if (gamma == S(0.5)) return M::sqrt(u);
  if (gamma == S(1)) return u;
  if (gamma == S(2)) return u * u;
  if (gamma == S(0)) return V(S(1));
  return M::exp(V(gamma) * M::log(u));
}

// The focal term f = -u^gamma lp, u = 1 - p, and its derivative
// d = df/dlp = -u^gamma + gamma u^(gamma-1) p lp (du/dlp = -p). official_grad
// drops the second term; it is 0 (its limit) where u = 0 or p = 0, and
// u^(gamma-1) is taken as u^gamma / u.
template <typename V>
struct Focal {
  V value;
  V derivative;
};

template <typename V, typename S>
APL_HD Focal<V> focal_term(V p, V lp, S one_minus_p_max, S gamma, bool official_grad) {
  using M = Math<V>;
  const V zero(S(0));
  const V u = one_minus_p<V, S>(p, one_minus_p_max);
  const V u_gamma = power<V, S>(u, gamma);
  Focal<V> f{zero - u_gamma * lp, zero - u_gamma};
  if (!official_grad) {
    const V defined = M::both(M::gt(u, zero), M::gt(p, zero));
    const V safe_u = M::where(defined, u, V(S(1)));
    f.derivative = f.derivative + M::where(defined, V(gamma) * (u_gamma / safe_u) * p * lp, zero);
  }
  return f;
}

// An element's terms that `needs` asks for (the others stay 0).
template <typename V>
struct ElementTerms {
  V powered;           // P[j]
  V powered_masked;    // P[j] mask[j]
  V focal_value;       // f[j]
  V focal_derivative;  // d[j]
};

template <typename V, typename S>
APL_HD ElementTerms<V> element_terms(int needs, V p, V lp, const RowSums<S>& sums, const LossParams& params) {
  const V zero(S(0));
  ElementTerms<V> terms{zero, zero, zero, zero};
  if (needs & kNeedPowered) {
    terms.powered = powered_p<V, S>(p, lp, params);
    terms.powered_masked = Math<V>::where(Math<V>::ge(p, V(S(kClampMin))), terms.powered, zero);
  }
  if (needs & kNeedFocal) {
    const Focal<V> f = focal_term<V, S>(p, lp, sums.one_minus_p_max, S(params.gamma), params.official_grad);
    terms.focal_value = f.value;
    terms.focal_derivative = f.derivative;
  }
  return terms;
}

// ----------------------------------------------------------------- rows

// A row's softmax is undefined when a logit is NaN or +inf or every logit is
// -inf: its loss and gradient are then NaN (as log_softmax's), never a finite
// number that a clamp made of NaN probabilities.
template <typename S>
APL_HD bool row_defined(const RowSums<S>& sums) {
  return std::isfinite(sums.max_z) && std::isfinite(sums.log_s);
}

// The gradient of a row: grad[i] = at_label [i == y] + constant
//   + clamped_p p[i] mask[i] + powered P[i] mask[i] + focal d[i] - p[i] total_h.
template <typename S>
struct RowGrad {
  S value = 0;
  S at_label = 0;
  S constant = 0;
  S clamped_p = 0;
  S powered = 0;
  S focal = 0;
  S total_h = 0;
};

// The gradient coefficients times `scale` (a mean's 1 / counted rows), so that the
// gradient pass writes the gradient of the reduced loss; the value is unchanged.
template <typename S>
APL_HD RowGrad<S> scaled(RowGrad<S> g, S scale) {
  g.at_label *= scale;
  g.constant *= scale;
  g.clamped_p *= scale;
  g.powered *= scale;
  g.focal *= scale;
  g.total_h *= scale;
  return g;
}

// Value and gradient coefficients of a row, from its sums and its label's logit
// and probability (as the element passes compute it).
template <typename S>
APL_HD RowGrad<S> row_grad(const LossParams& params, const RowSums<S>& sums, S z_label, S p_y, int64_t K) {
  const S lp_y = (z_label - sums.max_z) - sums.log_s;
  const S one_minus_p_y = one_minus_p<S, S>(p_y, sums.one_minus_p_max);
  const S mask_y = p_y >= S(kClampMin) ? S(1) : S(0);
  const S gamma = S(params.gamma), q = S(params.q);
  const S k_minus_1 = S(K - 1);
  RowGrad<S> g;
  for (int t = 0; t < params.num_terms; ++t) {
    const S w = S(params.weight[t]);
    switch (params.base[t]) {
      case kCE:
        g.value += w * -lp_y;
        g.at_label += -w;
        g.total_h += -w;
        break;
      case kFL: {
        const Focal<S> f = focal_term<S, S>(p_y, lp_y, sums.one_minus_p_max, gamma, params.official_grad);
        g.value += w * f.value;
        g.at_label += w * f.derivative;
        g.total_h += w * f.derivative;
        break;
      }
      case kGCE: {
        const S powered_y = powered_p<S, S>(p_y, lp_y, params);
        g.value += w * (S(1) - powered_y) / q;
        g.at_label += w * -powered_y * mask_y;
        g.total_h += w * -powered_y * mask_y;
        break;
      }
      case kMAE:
      case kNMAE: {
        const S norm = params.base[t] == kMAE ? S(1) : S(1) / k_minus_1;
        g.value += w * norm * one_minus_p_y;
        g.at_label += w * norm * -p_y;
        g.total_h += w * norm * -p_y;
        break;
      }
      case kRCE:
      case kNRCE: {
        const S a = params.base[t] == kRCE ? S(kRceA) : S(1) / k_minus_1;
        g.value += w * a * sums.off_clamped;
        g.clamped_p += w * a;  // off the label only (element_grad's needs)
        g.total_h += w * a * sums.off_masked;
        break;
      }
      case kNCE: {
        const S lp_sum = sums.sum_shifted - S(K) * sums.log_s;
        const S inv = S(1) / lp_sum;
        const S through_sum = -lp_y * inv * inv;  // d/dlp[j] of lp[y] / S through S
        g.value += w * lp_y * inv;
        g.at_label += w * inv;
        g.constant += w * through_sum;
        g.total_h += w * (inv + S(K) * through_sum);
        break;
      }
      case kNFL: {
        const Focal<S> f = focal_term<S, S>(p_y, lp_y, sums.one_minus_p_max, gamma, params.official_grad);
        const S inv = S(1) / sums.focal;
        const S through_sum = -f.value * inv * inv;  // coefficient of d[j]
        g.value += w * f.value * inv;
        g.at_label += w * f.derivative * inv;
        g.focal += w * through_sum;
        g.total_h += w * (f.derivative * inv + through_sum * sums.focal_derivative);
        break;
      }
      case kNGCE: {
        const S powered_y = powered_p<S, S>(p_y, lp_y, params);
        const S numerator = S(1) - powered_y;
        const S inv = S(1) / (S(K) - sums.powered);
        const S at_label = -q * powered_y * mask_y * inv;
        const S through_sum = numerator * q * inv * inv;  // coefficient of P[j] mask[j]
        g.value += w * numerator * inv;
        g.at_label += w * at_label;
        g.powered += w * through_sum;
        g.total_h += w * (at_label + through_sum * sums.powered_masked);
        break;
      }
      default: break;
    }
  }
  return g;
}

// Accumulates, over the elements of a row, the sums that `needs` asks for. The
// label's element is left out of the off-label sums rather than subtracted
// afterwards, which would cancel (p[y] ~ 1 next to a small sum) in float32.
template <typename V, typename S>
struct ElementSums {
  V off_clamped, off_masked, powered, powered_masked, focal, focal_derivative;
  APL_HD ElementSums()
      : off_clamped(S(0)), off_masked(S(0)), powered(S(0)), powered_masked(S(0)),
        focal(S(0)), focal_derivative(S(0)) {}

  APL_HD void merge(const ElementSums& other) {
    off_clamped = off_clamped + other.off_clamped;
    off_masked = off_masked + other.off_masked;
    powered = powered + other.powered;
    powered_masked = powered_masked + other.powered_masked;
    focal = focal + other.focal;
    focal_derivative = focal_derivative + other.focal_derivative;
  }

  // `counted`: lanes that are elements of the row; `off_label`: those that are
  // not the label (masks for vectors, bools for scalars).
  template <typename Mask>
  APL_HD void add(int needs, V p, const ElementTerms<V>& terms, Mask counted, Mask off_label) {
    using M = Math<V>;
    const V zero(S(0));
    if (needs & kNeedOffLabel) {
      off_clamped = off_clamped + M::where(off_label, clamped_p<V, S>(p), zero);
      off_masked = off_masked + M::where(off_label, masked_p<V, S>(p), zero);
    }
    if (needs & kNeedPowered) {
      powered = powered + M::where(counted, terms.powered, zero);
      powered_masked = powered_masked + M::where(counted, terms.powered_masked, zero);
    }
    if (needs & kNeedFocal) {
      focal = focal + M::where(counted, terms.focal_value, zero);
      focal_derivative = focal_derivative + M::where(counted, terms.focal_derivative, zero);
    }
  }
};

// The gradient of one element (or vector of elements), from p and the element's
// terms. The label's element is computed with kNeedOffLabel cleared, and adds
// at_label.
template <typename V, typename S>
APL_HD V element_grad(int needs, V p, const ElementTerms<V>& terms, const RowGrad<S>& g) {
  V grad = V(g.constant) - p * V(g.total_h);
  if (needs & kNeedOffLabel) grad = grad + V(g.clamped_p) * masked_p<V, S>(p);
  if (needs & kNeedPowered) grad = grad + V(g.powered) * terms.powered_masked;
  if (needs & kNeedFocal) grad = grad + V(g.focal) * terms.focal_derivative;
  return grad;
}

}  // namespace apl
