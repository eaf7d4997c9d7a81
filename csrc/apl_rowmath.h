// Per-row math of every loss of the catalogue: the one source of truth that the CPU kernel
// (apl_cpu.cpp) and the CUDA kernels (apl_cuda.cu) both compile. docs/kernels.md explains the
// framework; docs/losses.md is the contract.
//
// Notation (one row): logits z[0..K), m = max z, s = sum exp(z - m), lp = (z - m) - log s
// (shifted first: z - (m + log s) loses ~1e-3 at |z| ~ 1e4 in float32), p = exp(lp),
// p̂ = clamp(p, 1e-7, 1), mask[j] = [p[j] >= 1e-7] (torch's clamp passes the gradient at the bound).
//
// Targets as distributions. A row's target is a vector of coefficients c over the K labels: a
// one-hot label times its class weight, a smoothed label, or class probabilities (times weights),
// and the row's loss is the expectation L(z, c) = sum_y c[y] L(z, y); C = sum_y c[y].
//
// Elements. Each base loss b has two per-element terms: V[j] and its derivative V'[j] = dV[j]/dlp[j]
// (lp taken as free variables, p = exp(lp)). Its expectation has one of five forms, its family:
//
//   local       L(z, y) = V[y]                    L(z, c) = sum c V            h[j] = c[j] V'[j]
//   reverse     L(z, y) = sum_{j != y} V[j]       L(z, c) = sum (C - c) V      h[j] = (C - c[j]) V'[j]
//   normalized  L(z, y) = V[y] / D, D = sum V     L(z, c) = N / D, N = sum c V h[j] = (c[j]/D - N/D^2) V'[j]
//   negative    L(z, y) = 1 - V[y] / D            L(z, c) = C - N / D          h[j] = -(c[j]/D - N/D^2) V'[j]
//   split       L(z, y) = V[y] + sum_{j != y} W[j]  L(z, c) = sum (c V + (C - c) W)  h[j] = c[j] V'[j] + (C - c[j]) W'[j]
//
// A split base has a second element W (off_label_element) for the classes other than the label;
// its term's element is E = c V + (C - c) W on rows with coefficients on every label (omega = 1:
// split_element), and on one-hot rows W off the label (omega = C there, as reverse) and V at it
// (omega = C, as local). Each of the C - c and c factors is exactly 0 where the label's or the
// other classes' part must be (a one-hot label adds no W[y] that U[y] would have to cancel).
//
// with h[j] = dL/dlp[j]; since dlp[j]/dz[i] = [i == j] - p[i], the gradient is
//
//     dL/dz[i] = h[i] - p[i] H,   H = sum_j h[j],
//
// so every loss is h[i] = sum_t (alpha_t + beta_t omega_t[i]) V'_t[i] over its terms t (at most
// two), omega = c (C - c for reverse, 1 for split, whose V' is E'), with per-row coefficients alpha,
// beta (RowCoefs): local, reverse and split alpha = 0, beta = w; normalized beta = w / D,
// alpha = -w N / D^2; negative the opposite signs. A pair alpha A + beta B adds its members' terms: one pass writes its gradient.
//
//   base   family      V[j]                                V'[j]
//   ce     local       -lp                                 -1
//   fl     local       f = -u^g lp, u = 1 - p              d = -u^g + g u^(g-1) p lp     (du/dlp = -p)
//   gce    local       (1 - P) / q, P = p̂^q                -P mask                        (dP/dlp = q P mask)
//   mae    local       u                                   -p
//   nmae   local       u / (K - 1)                         -p / (K - 1)
//   rce    reverse     A p̂, A = -ln 1e-4                   A p mask
//   nrce   reverse     p̂ / (K - 1)                         p mask / (K - 1)
//   nce    normalized  lp                                  1
//   nfl    normalized  f                                   d
//   ngce   normalized  (1 - P) / q (gce's V)               -P mask
//   nnce   negative    s = -ln m + l̂p, l̂p = max(lp, ln m)  [lp >= ln m]
//   nnfl   negative    B - f̂, f̂ = f at max(lp, ln m)       -d [lp >= ln m]
//   agce   local       ((a + 1)^q - (a + p)^q) / q         -(a + p)^(q-1) p
//   aul    local       ((a - p)^q - (a - 1)^q) / q         -(a - p)^(q-1) p
//   ael    local       exp(-p / a)                         -exp(-p / a) p / a
//   anorm  split       aul's V at p̂5 (q: its p)            aul's V' at p̂5, times mask5
//                      W = p̂5^q / q                         W' = p̂5^q mask5
//          (p̂5 = clamp(p, 1e-5, 1), mask5 = [p >= 1e-5]: the official code's clamp; a > 1)
//
// official_grad (fl, nfl, nnfl): every focal factor u^g is held constant, d = -u^g.
// ngce = (1 - P[y]) / (K - sum P) is the ratio of gce's V: the same value, each V without
// cancellation, and of a size ~|lp| even for q = 1e-30 (1 - P would be ~1e-30 |lp|).
//
// Numerical range (docs/losses.md): the published forms cancel, and every V above that is a
// difference is computed in a form that does not, with V' derived from that same form:
//   gce:  (1 - P) / q = -expm1(x) / q, x = q ln p̂ (1 - P is 0 in float32 for q = 1e-8);
//         dV/dlp = -exp(x) dx/dlp / q = -P mask.
//   agce: T = (a + 1)^q, r = (a + p) / (a + 1) = 1 - w, w = u / (a + 1): V = T · -expm1(x) / q,
//         x = q ln r, ln r = log1p(-w) for w <= 1/2, else ln((a + p) / (a + 1)) (r < 1/2: then
//         1 - w would lose r's digits); d ln r / dp = 1 / (a + p), so
//         V' = dV/dp · p = -T exp(x) p / (a + p) = -(a + p)^(q-1) p.
//   aul:  B = (a - 1)^q, d = a - 1 (from the float64 a: a - p in float32 loses d near a = 1),
//         x = q log1p(u / d) >= 0: V = B expm1(x) / q for x <= ln 2, else ((a - p)^q - B) / q
//         with (a - p)^q = exp(q ln(d + u)) >= 2B (no cancellation; B may underflow where
//         expm1(x) overflows); dx/du = q / (d + u), so V' = -(a - p)^q p / (d + u) in both.
// B = -(1 - m)^g ln m is f̂ where the clamp is active, so B - f̂ >= 0; s >= 0 likewise.
//
// Limits the code takes care of: u^(g-1) is infinite at u = 0 (p == 1 in floating point) but
// multiplies lp ~ -u, so the term is 0 there; p lp is 0 where p = 0 (a masked class, lp = -inf).
// 1 - p is computed as -expm1(lp) where p > 1/2 (no cancellation near p = 1; only the row's max can
// be there, so that is one expm1 per row), its derivative -p from p. Its absolute error is still
// that of log s, about an ulp of 1: below that, 1 - p is 0, as with log_softmax (docs/kernels.md).
// A coefficient c = 0 adds nothing even where V is infinite (ce and nce at a masked class). With a
// masked class, nce's and nfl's D are infinite: value 0 and gradient 0, their limits.
//
// Passes. The first pass(es) give m, s and sum (z - m) (nce's D = sum (z - m) - K log s). The
// sums of the other terms need p: they are gathered in one more pass, only when a term needs them
// (term_needs_pass). The last pass writes the gradient.

#pragma once

#include <cmath>
#include <cstdint>

#include "apl_catalogue.h"  // the bases, their families and APL_BASES, generated from the catalogue

namespace apl {

constexpr double kClampMin = 1e-7;            // p̂ = clamp(p, 1e-7, 1)
constexpr double kLogClampMin = -16.11809565095832;  // ln 1e-7
constexpr double kLn2 = 0.69314718055994531;
constexpr double kRceA = 9.2103403719761836;  // -ln(1e-4)
constexpr double kAnormClampMin = 1e-5;       // anorm's p̂ = clamp(p, 1e-5, 1)
constexpr double kLogAnormClampMin = -11.512925464970229;  // ln 1e-5

// The loss of a call: sum of weight[t] * base[t], t < num_terms, with the members' parameters.
struct LossParams {
  int num_terms;
  int base[kMaxTerms];
  double weight[kMaxTerms];
  double gamma, q, a, min_prob, label_smoothing;  // coefficients[terms + kCoefficient...]
  bool official_grad;
  // Derived once per call by derive(): a - 1, ln m, B = -(1 - m)^g ln m, (a + 1)^q, (a - 1)^q.
  double a_minus_one, log_min_prob, nnfl_b, agce_top, aul_bottom;

  void derive() {
    a_minus_one = a - 1.0;
    log_min_prob = std::log(min_prob);
    nnfl_b = -std::pow(1.0 - min_prob, gamma) * log_min_prob;
    agce_top = std::pow(a + 1.0, q);
    aul_bottom = a > 1.0 ? std::pow(a - 1.0, q) : 0.0;
  }
};

// Whether term base b of a row needs a pass over the row's elements for its sums: always with
// dense coefficients; with a one-hot target, only the families whose sums run over every label
// (nce's D comes from the first pass).
APL_HD constexpr bool term_needs_pass(int base, bool dense) {
  return dense || (family_of(base) != kLocal && base != kNCE);
}

// Math for the element functions below, on a float or a double (std:: picks the precision, in host
// and device code alike). The CPU kernel specializes Math for at::vec::Vectorized so that the same
// templates run on whole vectors. exp is only ever taken of x <= 0; exp_any of any x.
template <typename T>
struct Math {
  static APL_HD T exp(T x) { return std::exp(x); }
  static APL_HD T exp_any(T x) { return std::exp(x); }
  static APL_HD T expm1(T x) { return std::expm1(x); }
  static APL_HD T log1p(T x) { return std::log1p(x); }
  static APL_HD T sqrt(T x) { return std::sqrt(x); }
  static APL_HD T log(T x) { return std::log(x); }
  static APL_HD T max(T a, T b) { return a > b ? a : b; }
  static APL_HD T where(bool c, T a, T b) { return c ? a : b; }
  static APL_HD bool ge(T a, T b) { return a >= b; }
  static APL_HD bool gt(T a, T b) { return a > b; }
  static APL_HD bool ne(T a, T b) { return a != b; }
  static APL_HD bool both(bool a, bool b) { return a && b; }
};

// A row's statistics from its first pass(es).
template <typename S>
struct RowStats {
  S max_z = 0;            // m
  S log_s = 0;            // log s, s = sum_j exp(z[j] - m)
  S one_minus_p_max = 0;  // 1 - p at the row's max (see set_sum_exp)
  S sum_shifted = 0;      // sum_j (z[j] - m)

  // Sets log s and, once per row, 1 - p at the row's max: the only element whose p can exceed
  // 1/2 (any other has exp(z - m) <= 1 <= s - exp(z - m)), where z - m = 0 and so p = 1/s and
  // 1 - p = (s - 1) / s without cancellation: s - 1 is exact for s in [1, 2] (Sterbenz), where
  // p >= 1/2, so the one rounding is the division's. (-expm1(-log s) is the same number through
  // two more roundings, and expm1 cost as much as the rest of a row's scalar work at K = 10.)
  APL_HD void set_sum_exp(S s) {
    log_s = Math<S>::log(s);
    one_minus_p_max = (s - S(1)) / s;
  }

  // The same from log s itself (the CUDA backward reads it from the row's record).
  APL_HD void set_log_sum_exp(S value) {
    log_s = value;
    one_minus_p_max = -Math<S>::expm1(-log_s);
  }

  // A row's softmax is undefined when a logit is NaN or +inf or every logit is -inf: its loss
  // and gradient are then NaN (as log_softmax's), never a number that a clamp made of NaN.
  APL_HD bool defined() const { return std::isfinite(max_z) && std::isfinite(log_s); }

  // D of nce: sum_j lp[j].
  APL_HD S lp_sum(int64_t K) const { return sum_shifted - S(K) * log_s; }
};

// ----------------------------------------------------------------- elements
// V is float, double, or (CPU) a vector of them; S its scalar type.

template <typename V>
struct Element {
  V value;       // V[j]
  V derivative;  // V'[j] = dV[j]/dlp[j]
};

// p[j] mask[j]: the derivative of p̂[j] w.r.t. lp[j].
template <typename V, typename S>
APL_HD V masked_p(V p) {
  using M = Math<V>;
  return M::where(M::ge(p, V(S(kClampMin))), p, V(S(0)));
}

// p̂[j]
template <typename V, typename S>
APL_HD V clamped_p(V p) {
  return Math<V>::max(p, V(S(kClampMin)));
}

// (1 - exp(x)) / q for x = q t <= ln 2 without cancellation: -expm1(x) / q, and -t where
// |x| < 1e-30 (its error there, |x| / 2 relative, is far below an ulp), since x itself may have
// underflowed there (q = 1e-30, t = 1e-18: 1e-48 is 0 in float32) or lost digits as a subnormal.
template <typename V, typename S>
APL_HD V one_minus_power(V t, V x, V q) {
  using M = Math<V>;
  const V zero(S(0)), tiny(S(1e-30));
  return M::where(M::both(M::gt(tiny, x), M::gt(x, zero - tiny)), zero - t, (zero - M::expm1(x)) / q);
}

// gce's V = (1 - p̂^q) / q and V' = -p̂^q mask, from t = ln p̂ (lp where the clamp is inactive,
// ln 1e-7 where it holds), x = q t: one_minus_power and -exp(x) mask.
template <typename V, typename S>
APL_HD Element<V> gce_term(V p, V lp, const LossParams& params) {
  using M = Math<V>;
  const V zero(S(0)), q(S(params.q));
  const auto unclamped = M::ge(p, V(S(kClampMin)));
  const V t = M::where(unclamped, lp, V(S(kLogClampMin))), x = q * t;
  return {one_minus_power<V, S>(t, x, q), M::where(unclamped, zero - M::exp(x), zero)};
}

// u = 1 - p: as 1 - p where p <= 1/2 (no cancellation there), else it is the row's max and u is
// its precomputed -expm1(lp) (RowStats::set_sum_exp).
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

// The focal term f = -u^gamma lp, u = 1 - p, and its derivative d = df/dlp = -u^gamma
// + gamma u^(gamma-1) p lp (du/dlp = -p). official_grad drops the second term; it is 0 (its
// limit) where u = 0 or p = 0, and u^(gamma-1) is taken as u^gamma / u.
template <typename V, typename S>
APL_HD Element<V> focal_term(V p, V lp, S one_minus_p_max, S gamma, bool official_grad) {
  using M = Math<V>;
  const V zero(S(0));
  const V u = one_minus_p<V, S>(p, one_minus_p_max);
  const V u_gamma = power<V, S>(u, gamma);
  Element<V> f{zero - u_gamma * lp, zero - u_gamma};
  if (!official_grad) {
    const auto defined = M::both(M::gt(u, zero), M::gt(p, zero));
    const V safe_u = M::where(defined, u, V(S(1)));
    f.derivative = f.derivative + M::where(defined, V(gamma) * (u_gamma / safe_u) * p * lp, zero);
  }
  return f;
}

// aul's V = ((a - p)^q - (a - 1)^q) / q from u = 1 - p, and V' = -(a - p)^(q-1) dp, dp = dp/dlp
// (the forms of "Numerical range" at the top).
template <typename V, typename S>
APL_HD Element<V> aul_term(V u, V dp, const LossParams& params) {
  using M = Math<V>;
  const V zero(S(0)), q(S(params.q)), bottom(S(params.aul_bottom)), d(S(params.a_minus_one));
  const V a_minus_p = d + u;
  const V t = M::log1p(u / d), x = q * t;  // x = q ln((a - p) / (a - 1)) >= 0
  const V powered = M::exp_any(q * M::log(a_minus_p));  // (a - p)^q
  const V value = M::where(M::ge(V(S(kLn2)), x), zero - bottom * one_minus_power<V, S>(t, x, q),
                           (powered - bottom) / q);
  return {value, zero - powered / a_minus_p * dp};  // (a - p)^(q-1) first, as for agce
}

// V[j] and V'[j] of base kBase at an element with probability p and log-probability lp (the
// table at the top of this file). A base of the catalogue without its case here does not compile.
template <int kBase, typename V, typename S>
APL_HD Element<V> base_element(V p, V lp, const RowStats<S>& row, const LossParams& params, int64_t K) {
  using M = Math<V>;
  const V zero(S(0)), one(S(1));
  if constexpr (kBase == kCE) {
    return {zero - lp, V(S(-1))};
  } else if constexpr (kBase == kFL || kBase == kNFL) {
    return focal_term<V, S>(p, lp, row.one_minus_p_max, S(params.gamma), params.official_grad);
  } else if constexpr (kBase == kGCE || kBase == kNGCE) {
    return gce_term<V, S>(p, lp, params);
  } else if constexpr (kBase == kMAE || kBase == kNMAE) {
    const V norm(kBase == kMAE ? S(1) : S(1) / S(K - 1));
    return {norm * one_minus_p<V, S>(p, row.one_minus_p_max), zero - norm * p};
  } else if constexpr (kBase == kRCE || kBase == kNRCE) {
    const V norm(kBase == kRCE ? S(kRceA) : S(1) / S(K - 1));
    return {norm * clamped_p<V, S>(p), norm * masked_p<V, S>(p)};
  } else if constexpr (kBase == kNCE) {
    return {lp, one};
  } else if constexpr (kBase == kNNCE) {
    const V log_m(S(params.log_min_prob));
    return {M::max(lp, log_m) - log_m, M::where(M::ge(lp, log_m), one, zero)};
  } else if constexpr (kBase == kNNFL) {
    // f̂ = f(max(p, m)) is B where the clamp is active: V = B - f(p) there, 0 elsewhere (f at the
    // unclamped p, so that no element but the row's max is ever taken for p > 1/2).
    const auto active = M::ge(lp, V(S(params.log_min_prob)));
    const Element<V> f = focal_term<V, S>(p, lp, row.one_minus_p_max, S(params.gamma), params.official_grad);
    return {M::where(active, V(S(params.nnfl_b)) - f.value, zero), M::where(active, zero - f.derivative, zero)};
  } else if constexpr (kBase == kAGCE) {  // the forms of "Numerical range" at the top
    const V q(S(params.q)), top(S(params.agce_top)), a_plus_one(S(params.a + 1.0)), a_plus_p = V(S(params.a)) + p;
    const V w = one_minus_p<V, S>(p, row.one_minus_p_max) / a_plus_one;
    const auto near = M::ge(V(S(0.5)), w);
    const V log_ratio = M::where(near, M::log1p(zero - w), M::log(a_plus_p / a_plus_one)), x = q * log_ratio;
    // T / (a + p) first (<= (a + 1)^q / a: finite): exp(x) p (a = 1e-30, p = 1e-24) or p / (a + p)
    // (a = 1e30) may underflow float32 where the gradient does not.
    return {top * one_minus_power<V, S>(log_ratio, x, q), zero - top / a_plus_p * p * M::exp(x)};
  } else if constexpr (kBase == kAUL) {
    return aul_term<V, S>(one_minus_p<V, S>(p, row.one_minus_p_max), p, params);
  } else if constexpr (kBase == kAEL) {
    const V inv_a(S(1) / S(params.a));
    const V e = M::exp(zero - p * inv_a);
    return {e, zero - e * (p * inv_a)};  // p / a first: e p may underflow where e p / a does not
  } else if constexpr (kBase == kANORM) {  // aul's V at p̂ = clamp(p, 1e-5, 1): 1 - p̂ and dp̂/dlp
    const auto kept = M::ge(p, V(S(kAnormClampMin)));
    const V u = M::where(kept, one_minus_p<V, S>(p, row.one_minus_p_max), V(S(1.0 - kAnormClampMin)));
    return aul_term<V, S>(u, M::where(kept, p, zero), params);
  } else {
    static_assert(kBase != kBase, "a base loss of catalogue.BASES has no V, V' in base_element");
  }
}

// W[j] and W'[j] of a split base: its element at the classes other than the label (the table at
// the top; the base's V is its element at the label). Other bases: their V, V'. A split base of the
// catalogue without its case here does not compile.
template <int kBase, typename V, typename S>
APL_HD Element<V> off_label_element(V p, V lp, const RowStats<S>& row, const LossParams& params, int64_t K) {
  using M = Math<V>;
  if constexpr (family_of(kBase) != kSplit) {
    return base_element<kBase, V, S>(p, lp, row, params, K);
  } else if constexpr (kBase == kANORM) {  // W = p̂^q / q = exp(x) / q, x = q ln p̂ <= 0; W' = p̂^q mask
    const V q(S(params.q));
    const auto kept = M::ge(p, V(S(kAnormClampMin)));
    const V e = M::exp(q * M::where(kept, lp, V(S(kLogAnormClampMin))));
    return {e / q, M::where(kept, e, V(S(0)))};
  } else {
    static_assert(kBase != kBase, "a split base loss of catalogue.BASES has no W, W' in off_label_element");
  }
}

// A split base's element c V + (C - c) W from its V (`at`) and W (`off`), on a row with coefficients
// on every label. A label or a class whose factor is 0 adds nothing, even where V or W is infinite.
template <typename V, typename S>
APL_HD Element<V> split_element(const Element<V>& at, const Element<V>& off, V c, S total_c) {
  using M = Math<V>;
  const V zero(S(0)), rest = V(total_c) - c;
  return {M::where(M::ne(c, zero), c * at.value, zero) + M::where(M::ne(rest, zero), rest * off.value, zero),
          c * at.derivative + rest * off.derivative};
}

// A term's element on a row with coefficients on every label: c V + (C - c) W for a split base
// (its omega is 1, split_element), V for any other (its omega multiplies it).
template <int kBase, typename V, typename S>
APL_HD Element<V> dense_element(V p, V lp, V c, S total_c, const RowStats<S>& row, const LossParams& params,
                                int64_t K) {
  if constexpr (family_of(kBase) != kSplit) {
    return base_element<kBase, V, S>(p, lp, row, params, K);
  } else {
    return split_element<V, S>(base_element<kBase, V, S>(p, lp, row, params, K),
                               off_label_element<kBase, V, S>(p, lp, row, params, K), c, total_c);
  }
}

// The same for a base known at run time (decode_call has checked it is one of the catalogue's):
// NaN for any other index, never another loss.
template <typename V, typename S>
APL_HD Element<V> element(int base, V p, V lp, const RowStats<S>& row, const LossParams& params, int64_t K) {
  switch (base) {
#define APL_CASE(NAME) \
  case k##NAME: return base_element<k##NAME, V, S>(p, lp, row, params, K);
    APL_BASES(APL_CASE)
#undef APL_CASE
  }
  const V nan(S(NAN));
  return {nan, nan};
}

template <typename V, typename S>
APL_HD Element<V> off_label_element(int base, V p, V lp, const RowStats<S>& row, const LossParams& params,
                                    int64_t K) {
  switch (base) {
#define APL_CASE(NAME) \
  case k##NAME: return off_label_element<k##NAME, V, S>(p, lp, row, params, K);
    APL_BASES(APL_CASE)
#undef APL_CASE
  }
  const V nan(S(NAN));
  return {nan, nan};
}

template <typename V, typename S>
APL_HD Element<V> dense_element(int base, V p, V lp, V c, S total_c, const RowStats<S>& row,
                                const LossParams& params, int64_t K) {
  switch (base) {
#define APL_CASE(NAME) \
  case k##NAME: return dense_element<k##NAME, V, S>(p, lp, c, total_c, row, params, K);
    APL_BASES(APL_CASE)
#undef APL_CASE
  }
  const V nan(S(NAN));
  return {nan, nan};
}

// ----------------------------------------------------------------- rows

// A term's sums over a row: sum omega V, sum omega V', and (normalized, negative; reverse for the
// targets' gradient) sum V, sum V'.
template <typename S>
struct TermSums {
  S weighted = 0, weighted_derivative = 0, plain = 0, plain_derivative = 0;
};

// The gradient of a row: grad[i] = sum_t (alpha_t + beta_t omega_t[i]) V'_t[i] - p[i] H, and its
// value.
template <typename S>
struct RowCoefs {
  S value = 0;
  S alpha[kMaxTerms] = {0, 0};
  S beta[kMaxTerms] = {0, 0};
  S total_h = 0;  // H

  // Times `scale` (a mean's 1 / divisor), so that the gradient pass writes the gradient of the
  // reduced loss; the value is unchanged.
  APL_HD void scale_gradient(S scale) {
    for (int t = 0; t < kMaxTerms; ++t) {
      alpha[t] *= scale;
      beta[t] *= scale;
    }
    total_h *= scale;
  }
};

// Value and gradient coefficients of a row from its terms' sums and C = sum c. nce's D and sum V'
// come from the row's statistics (lp_sum, K) rather than from its sums.
template <typename S>
APL_HD RowCoefs<S> row_coefs(const LossParams& params, const TermSums<S>* sums, const RowStats<S>& row,
                             S total_c, int64_t K) {
  RowCoefs<S> k;
  for (int t = 0; t < kMaxTerms && t < params.num_terms; ++t) {  // a constant bound: nvcc unrolls it
    const S w = S(params.weight[t]);
    const TermSums<S>& sum = sums[t];
    const int family = family_of(params.base[t]);
    if (family == kLocal || family == kReverse || family == kSplit) {
      k.value += w * sum.weighted;
      k.beta[t] = w;
      k.total_h += w * sum.weighted_derivative;
      continue;
    }
    const bool nce = params.base[t] == kNCE;
    const S d = nce ? row.lp_sum(K) : sum.plain;
    const S plain_derivative = nce ? S(K) : sum.plain_derivative;
    const S inv = S(1) / d;
    const S sign = family == kNormalized ? S(1) : S(-1);
    const S n_over_d = sum.weighted == S(0) ? S(0) : sum.weighted * inv;  // N / D, 0 where N is 0
    k.value += w * (family == kNormalized ? n_over_d : total_c - n_over_d);
    k.beta[t] = sign * w * inv;
    k.alpha[t] = -sign * w * n_over_d * inv;
    k.total_h += k.beta[t] * sum.weighted_derivative + k.alpha[t] * plain_derivative;
  }
  return k;
}

// ----------------------------------------------------------------- the targets' gradient
// Targets' gradient. Every loss is linear in the row's coefficients c (and C = sum c is), so
// dL/dc[k] is a per-class term of the row. Differentiating each family's expectation at fixed z
// (V, D independent of c):
//   local       L = sum_j c[j] V[j]                dL/dc[k] = V[k]
//   reverse     L = sum_j (C - c[j]) V[j]          dL/dc[k] = S - V[k],  S = sum_j V[j] (dC/dc[k] = 1)
//   normalized  L = N / D, N = sum_j c[j] V[j]     dL/dc[k] = V[k] / D
//   negative    L = C - N / D                      dL/dc[k] = 1 - V[k] / D
//   split       L = sum_j (c[j] V[j] + (C - c[j]) W[j]) = sum_j c[j] (V[j] - W[j]) + C S,  S = sum_j W[j]
//                                                  dL/dc[k] = V[k] - W[k] + S
// so over the terms dL/dc[k] = G + sum_t delta_t T_t[k], T = V (V - W for split: target_element),
// with per-row G = sum_t w_t (S_t for reverse and split, 1 for negative, else 0) and
// delta_t = w_t, -w_t, w_t / D_t, -w_t / D_t, w_t (TargetCoefs).
// A probability target t enters as c[k] = w[k] ((1 - eps) t[k] + eps / K) (class weights w, label
// smoothing eps), so dL/dt[k] = (1 - eps) w[k] dL/dc[k]; a mean's 1 / divisor (rows: free of t)
// and the upstream gradient scale it as they scale the logits' gradient. (The reverse and split
// families' S is the only sum this needs beyond the gradient's: their pass gathers it as `plain`.)
// With a split term, V[k] - W[k] + S cancels where W[k] is most of S (p[k] near 1): its error is
// then relative to S, as the reverse family's S - V[k] is.
template <typename S>
struct TargetCoefs {
  S constant = 0;                // G
  S slope[kMaxTerms] = {0, 0};   // delta_t

  APL_HD void scale_gradient(S scale) {
    constant *= scale;
    for (int t = 0; t < kMaxTerms; ++t) slope[t] *= scale;
  }
};

// TargetCoefs of a row from its terms' sums (`plain` = S for reverse and split, D for normalized
// and negative; nce's D from the row's statistics, as in row_coefs).
template <typename S>
APL_HD TargetCoefs<S> target_coefs(const LossParams& params, const TermSums<S>* sums, const RowStats<S>& row,
                                   int64_t K) {
  TargetCoefs<S> k;
  for (int t = 0; t < kMaxTerms && t < params.num_terms; ++t) {
    const S w = S(params.weight[t]);
    const int family = family_of(params.base[t]);
    if (family == kLocal) {
      k.slope[t] = w;
    } else if (family == kSplit) {
      k.slope[t] = w;
      k.constant += w * sums[t].plain;
    } else if (family == kReverse) {
      k.slope[t] = -w;
      k.constant += w * sums[t].plain;
    } else if (family == kNormalized || family == kNegative) {
      const S d = params.base[t] == kNCE ? row.lp_sum(K) : sums[t].plain;
      k.slope[t] = (family == kNormalized ? w : -w) / d;
      if (family == kNegative) k.constant += w;
    }
  }
  return k;
}

// T[k], a term's per-class part of dL/dc[k] that delta_t multiplies: V[k], and V[k] - W[k] for a
// split base. A split term's S = sum W is gathered with its sums (`plain`).
template <int kBase, typename V, typename S>
APL_HD V target_element(V p, V lp, const RowStats<S>& row, const LossParams& params, int64_t K) {
  const V value = base_element<kBase, V, S>(p, lp, row, params, K).value;
  if constexpr (family_of(kBase) == kSplit) {
    return value - off_label_element<kBase, V, S>(p, lp, row, params, K).value;
  } else {
    return value;
  }
}

// T[k] as dL/dc[k] reads it: at a class of coefficient 0 where T is infinite (a masked class, lp =
// -inf: ce's and nfl's V = +inf, nce's -inf), 0. A coefficient of 0 adds c V = 0 to the loss there
// whatever V is (the sums' rule above), and the reference differentiates that product
// (reference.expectation); 0 also keeps a slope of 0 (nce's w / D with D = -inf) from making
// 0 * inf = NaN. (T - T is 0 where T is finite, NaN where it is infinite.)
template <typename V>
APL_HD V zero_coefficient_term(V target_term, V c) {
  const V zero(0);
  return Math<V>::where(Math<V>::ne(c, zero), target_term,
                        Math<V>::where(Math<V>::ne(target_term - target_term, zero), zero, target_term));
}

template <typename V, typename S>
APL_HD V target_element(int base, V p, V lp, const RowStats<S>& row, const LossParams& params, int64_t K) {
  switch (base) {
#define APL_CASE(NAME) \
  case k##NAME: return target_element<k##NAME, V, S>(p, lp, row, params, K);
    APL_BASES(APL_CASE)
#undef APL_CASE
  }
  return V(S(NAN));
}

// omega of term base b at an element of coefficient c (rows with coefficients on every label): c,
// C - c for the reverse family, 1 for the split family (its dense_element holds c and C - c).
template <typename V, typename S>
APL_HD V omega(int base, V c, S total_c) {
  const int family = family_of(base);
  return family == kReverse ? V(total_c) - c : family == kSplit ? V(S(1)) : c;
}

// One-hot rows: whether a term's sums run over the classes other than the label with omega = C
// (its off_label_element there), as reverse's do; a split term also adds its V at the label.
APL_HD constexpr bool sums_off_label(int base) {
  return family_of(base) == kReverse || family_of(base) == kSplit;
}

}  // namespace apl
