"""The spec's formulas written out independently in NumPy float64, with hand-derived gradients.

Nothing here imports apl_kernels: it is the yardstick the reference is held to.

Gradients use the spec's identity. With ``h[j] = dL/dlp[j]`` (``lp`` taken as
free variables, ``p = exp(lp)``), ``dL/dz[i] = h[i] - p[i] * sum_j h[j]``, since
``dlp[j]/dz[i] = [i == j] - p[i]``. A clamp ``p̂ = clamp(p, 1e-7, 1)`` passes
``dp̂[j]/dlp[j] = p[j] * m[j]`` with ``m[j] = [p[j] >= 1e-7]`` (torch's clamp
passes the gradient at the boundary).
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-7
A = -math.log(1e-4)
DEFAULTS = {"gamma": 0.5, "q": 0.7, "a": None, "min_prob": 1e-7}
# The later families' own defaults of q and a (docs/losses.md).
BASE_DEFAULTS = {"gce": {"q": 0.7}, "ngce": {"q": 0.7}, "agce": {"a": 1.0, "q": 2.0}, "aul": {"a": 1.5, "q": 0.9},
                 "ael": {"a": 3.0}, "anorm": {"a": 1.5, "q": 0.9}}
ANORM_EPS = 1e-5  # anorm's clamp of p (the official ANL code)
OWN_NAMES = {"anorm": {"p": "q"}}  # a base's own name of a parameter: the name the formulas use


def _focal_h(u, p, lp, gamma, official):
    """d/dlp of f = -u^gamma lp with u = 1 - exp(lp): -u^gamma + gamma u^(gamma-1) p lp.

    The second term has the limit 0 at u = 0 (lp ~ -u), and is 0 where p = 0.
    """
    u, p, lp = (np.asarray(a, dtype=np.float64) for a in (u, p, lp))
    d = -(u ** gamma)
    if not official:
        with np.errstate(divide="ignore", invalid="ignore"):
            extra = gamma * u ** (gamma - 1) * p * lp
        d = d + np.where((u > 0) & (p > 0), extra, 0.0)
    return d


def _log_ratio(a, p, u, sign):
    """ln((a + sign p) / (a + sign)) with u = 1 - p, without cancellation: log1p(-sign u / (a + sign))
    where its argument is above -1/2, else the difference of the logarithms (no cancellation there)."""
    arg = -sign * u / (a + sign)
    return math.log1p(arg) if arg > -0.5 else math.log(a + sign * p) - math.log(a + sign)


def _reverse_norm(base, K):
    """rce's and nrce's factor of the other labels' clamped probabilities."""
    return A if base == "rce" else 1.0 / (K - 1)


def row_value_and_h(z, y, base, gamma=0.5, q=0.7, official=False, a=None, min_prob=1e-7):
    """One row: (value, h, p, |terms of h|) of base loss ``base`` with logits ``z`` (K,) and label ``y``."""
    K = z.shape[0]
    top = int(np.argmax(z))
    m = z[top]
    # ln sum exp(z - m) = ln(1 + rest): log1p of the other classes' sum, not the log of 1 + rest
    # rounded, so that 1 - p at the max (-expm1(lp)) keeps its digits where it is below float64's
    # epsilon (a confident row), rather than turning to 0 (or to 2.2e-16) by rounding.
    rest = np.exp(np.delete(z, top) - m).sum()
    lp = z - m - math.log1p(rest)
    p = np.exp(lp)
    ph = np.clip(p, EPS, 1.0)
    mask = (p >= EPS).astype(float)
    onehot = np.zeros(K)
    onehot[y] = 1.0
    h = np.zeros(K)
    h_terms = None  # where h[j] sums terms of both signs: their absolute sum
    terms = None  # where the value is a difference: the size of what it subtracts
    if base == "ce":
        value = -lp[y]
        h[y] = -1.0
    elif base == "fl":
        u = -math.expm1(lp[y])
        value = -(u ** gamma) * lp[y]
        h[y] = _focal_h(u, p[y], lp[y], gamma, official)
    elif base == "gce":
        # (1 - p̂^q) / q as -expm1(q ln p̂) / q: the published form cancels for small q.
        lph = lp[y] if mask[y] else math.log(EPS)
        value = -math.expm1(q * lph) / q
        h[y] = -math.exp(q * lph) * mask[y]
    elif base in ("mae", "nmae"):
        norm = 1.0 if base == "mae" else K - 1.0
        value = (1 - p[y]) / norm
        h[y] = -p[y] / norm
    elif base in ("rce", "nrce"):
        norm = _reverse_norm(base, K)
        value = norm * (ph * (1 - onehot)).sum()
        h = norm * p * mask * (1 - onehot)
    elif base == "nce":
        s = lp.sum()
        value = lp[y] / s
        h = onehot / s - lp[y] / s**2
        h_terms = onehot / abs(s) + abs(lp[y]) / s**2
    elif base == "nfl":
        u = -np.expm1(lp)
        f = -(u ** gamma) * lp
        d = _focal_h(u, p, lp, gamma, official)
        F = f.sum()
        value = f[y] / F
        h = onehot * d[y] / F - f[y] * d / F**2
        h_terms = np.abs(onehot * d[y] / F) + np.abs(f[y] * d / F**2)
    elif base == "ngce":
        # (1 - P[y]) / (K - sum P) = g[y] / sum g, g = (1 - P) / q = -expm1(q ln p̂) / q (no cancellation).
        lph = np.where(mask > 0, lp, math.log(EPS))
        P = np.exp(q * lph)
        g = -np.expm1(q * lph) / q
        num, den = g[y], g.sum()
        value = num / den
        h = -onehot * P[y] * mask[y] / den + num * P * mask / den**2
        h_terms = onehot * P[y] * mask[y] / den + num * P * mask / den**2
    elif base == "nnce":
        # s = -ln m + ln clamp(p, m, 1); ds/dlp = [p >= m]
        lpc = np.log(np.clip(p, min_prob, 1.0))
        s = -math.log(min_prob) + lpc
        keep = (p >= min_prob).astype(float)
        total = s.sum()
        value = 1 - s[y] / total
        terms = 1 + abs(s[y] / total)
        h = -(onehot / total - s[y] / total**2) * keep
        h_terms = (onehot / abs(total) + abs(s[y]) / total**2) * keep
    elif base == "nnfl":
        # f̂ = -(1 - p̂)^gamma ln p̂ with p̂ = clamp(p, m, 1); B = -(1 - m)^gamma ln m; g = B - f̂
        ph_m = np.clip(p, min_prob, 1.0)
        lpc = np.log(ph_m)
        keep = (p >= min_prob).astype(float)
        u = -np.expm1(lpc)
        f = -(u ** gamma) * lpc
        d = _focal_h(u, ph_m, lpc, gamma, official)
        g = -(1 - min_prob) ** gamma * math.log(min_prob) - f
        G = g.sum()
        value = 1 - g[y] / G
        terms = 1 + abs(g[y] / G)
        h = (onehot / G - g[y] / G**2) * d * keep
        h_terms = (np.abs(onehot / G) + np.abs(g[y]) / G**2) * np.abs(d) * keep
    elif base == "agce":
        # ((a + 1)^q - (a + p)^q) / q = (a + 1)^q (1 - r^q) / q, r = (a + p) / (a + 1): the published
        # form cancels where r^q is close to 1.
        u = -math.expm1(lp[y])
        value = math.exp(q * math.log1p(a)) * -math.expm1(q * _log_ratio(a, p[y], u, 1)) / q
        h[y] = -((a + p[y]) ** (q - 1)) * p[y]
    elif base == "aul":
        # ((a - p)^q - (a - 1)^q) / q = (a - 1)^q expm1(x) / q, x = q ln((a - p) / (a - 1)) >= 0, while
        # x <= 1; beyond, (a - p)^q >= e (a - 1)^q and the published form does not cancel.
        u = -math.expm1(lp[y])
        x = q * _log_ratio(a, p[y], u, -1)
        a_minus_p = (a - 1) + u
        value = (a - 1) ** q * math.expm1(x) / q if x <= 1 else (a_minus_p**q - (a - 1) ** q) / q
        h[y] = -(a_minus_p ** (q - 1)) * p[y]
    elif base == "ael":
        value = math.exp(-p[y] / a)
        h[y] = -math.exp(-p[y] / a) * p[y] / a
    elif base == "anorm":
        # (sum_k |a onehot[k] - p̂[k]|^q - (a - 1)^q) / q, p̂ = clamp(p, 1e-5, 1), as published (q is
        # its p); d|t - p̂|^q / dlp / q = -sign(t - p̂) |t - p̂|^(q-1) p [p >= 1e-5].
        diff = a * onehot - np.clip(p, ANORM_EPS, 1.0)
        keep = p >= ANORM_EPS
        value = ((np.abs(diff) ** q).sum() - (a - 1) ** q) / q
        h = -np.sign(diff) * np.abs(diff) ** (q - 1) * p * keep
        terms = (np.abs(diff) ** q).sum() / q
    else:
        raise KeyError(base)
    return value, h, p, np.abs(h) if h_terms is None else h_terms, abs(value) if terms is None else terms


def members(name, params):
    """The spec's decomposition of a catalogue name into (base, weight) terms."""
    if name == "sce":
        return [("ce", params.get("alpha", 0.1)), ("rce", params.get("beta", 1.0))]
    parts = name.split("+")
    if len(parts) == 1:
        return [(parts[0], params.get("scale", 1.0))]
    return [(parts[0], params.get("alpha", 1.0)), (parts[1], params.get("beta", 1.0))]


def coefficients(target, num_classes, weight=None, label_smoothing=0.0, ignore_index=-100):
    """Each row's coefficients over the labels (N, K), and its weight in a mean (N,): the rules of
    torch.nn.functional.cross_entropy, written out here in NumPy for index targets (N,) and
    probability targets (N, K)."""
    target = np.asarray(target)
    w = np.ones(num_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    eps = label_smoothing
    if target.ndim == 2:
        return w * ((1 - eps) * target.astype(np.float64) + eps / num_classes), np.ones(target.shape[0])
    c = np.zeros((target.shape[0], num_classes))
    row_weight = np.zeros(target.shape[0])
    for r, y in enumerate(target):
        if y == ignore_index:
            continue
        c[r, y] += (1 - eps) * w[y]
        c[r] += eps / num_classes * w
        row_weight[r] = w[y]
    return c, row_weight


def loss_and_grad(z, target, name, weight=None, label_smoothing=0.0, ignore_index=-100, **params):
    """Per-row values (N,) and gradients (N, K) of catalogue loss ``name`` on float64 logits against
    index targets (N,) or probability targets (N, K), as the expectation over labels y of the
    one-label formulas above (sum_y c[y] L(z, y), c of :func:`coefficients`); and the magnitude
    (N, K) of the terms each gradient element sums (``|h[i]| + p[i] sum |h|``, with the terms of h
    itself taken apart): in a confident row ``h[y] - p[y] h[y]`` cancels, and rounding errors are
    relative to the terms, not to their small difference; each value's sensitivity (N,)
    ``sum_j |dL/dlp[j]|`` to rounding errors in ``lp``; and the size (N,) of the terms each value
    is a difference of (``1 - V[y] / D`` near 0 is as exact as 1, not as its value)."""
    z = np.asarray(z, dtype=np.float64)
    c, _ = coefficients(target, z.shape[1], weight, label_smoothing, ignore_index)
    values = np.zeros(z.shape[0])
    sensitivities = np.zeros(z.shape[0])
    grads = np.zeros_like(z)
    magnitudes = np.zeros_like(z)
    value_terms = np.zeros(z.shape[0])
    for r in range(z.shape[0]):
        for y in np.flatnonzero(c[r]):
            for base, base_weight in members(name, params):
                kw = dict(DEFAULTS, **BASE_DEFAULTS.get(base, {}))
                own = OWN_NAMES.get(base, {})
                kw.update({own.get(k, k): params[k] for k in ("gamma", "q", "a", "min_prob", *own) if k in params})
                value, h, p, h_terms, terms = row_value_and_h(z[r], int(y), base, official=params.get("official_grad", False),
                                                       **kw)
                scale = c[r, y] * base_weight
                values[r] += scale * value
                grads[r] += scale * (h - p * h.sum())
                magnitudes[r] += abs(scale) * (h_terms + p * h_terms.sum())
                sensitivities[r] += abs(scale) * h_terms.sum()
                value_terms[r] += abs(scale) * terms
        # The reverse family is formed as sum_j (C - c[j]) p̂[j] (the reference, the kernels): where
        # c[j] is neither 0 nor C (a dense row), C - c[j] rounds relative to C, not to its size, and
        # so do the value's and h[j]'s terms with it.
        total = c[r].sum()
        rounded = (c[r] != 0) & (c[r] != total)
        for base, base_weight in members(name, params):
            if base in ("rce", "nrce") and rounded.any():
                size = abs(base_weight) * _reverse_norm(base, z.shape[1]) * total * rounded
                mask = p >= EPS
                value_terms[r] += (size * np.clip(p, EPS, 1.0)).sum()
                h_terms = size * p * mask
                magnitudes[r] += h_terms + p * h_terms.sum()
            if base == "anorm" and rounded.any():  # its other classes' terms: p̂^q / q times C - c
                q = params.get("p", BASE_DEFAULTS["anorm"]["q"])
                powered = np.clip(p, ANORM_EPS, 1.0) ** q
                size = abs(base_weight) * total * rounded
                value_terms[r] += (size * powered / q).sum()
                h_terms = size * powered * (p >= ANORM_EPS)
                magnitudes[r] += h_terms + p * h_terms.sum()
    return values, grads, magnitudes, sensitivities, value_terms
