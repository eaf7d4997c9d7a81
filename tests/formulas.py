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
DEFAULTS = {"gamma": 0.5, "q": 0.7}


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


def row_value_and_h(z, y, base, gamma=0.5, q=0.7, official=False):
    """One row: (value, h) of base loss ``base`` with logits ``z`` (K,) and label ``y``."""
    K = z.shape[0]
    m = z.max()
    lp = z - m - math.log(np.exp(z - m).sum())
    p = np.exp(lp)
    ph = np.clip(p, EPS, 1.0)
    mask = (p >= EPS).astype(float)
    onehot = np.zeros(K)
    onehot[y] = 1.0
    h = np.zeros(K)
    h_terms = None  # where h[j] sums terms of both signs: their absolute sum
    if base == "ce":
        value = -lp[y]
        h[y] = -1.0
    elif base == "fl":
        u = -math.expm1(lp[y])
        value = -(u ** gamma) * lp[y]
        h[y] = _focal_h(u, p[y], lp[y], gamma, official)
    elif base == "gce":
        value = (1 - ph[y] ** q) / q
        h[y] = -(ph[y] ** q) * mask[y]
    elif base in ("mae", "nmae"):
        norm = 1.0 if base == "mae" else K - 1.0
        value = (1 - p[y]) / norm
        h[y] = -p[y] / norm
    elif base in ("rce", "nrce"):
        norm = A if base == "rce" else 1.0 / (K - 1)
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
        P = ph ** q
        num, den = 1 - P[y], K - P.sum()
        value = num / den
        h = -onehot * q * P[y] * mask[y] / den + num * q * P * mask / den**2
        h_terms = onehot * q * P[y] * mask[y] / den + num * q * P * mask / den**2
    else:
        raise KeyError(base)
    return value, h, p, np.abs(h) if h_terms is None else h_terms


def members(name, params):
    """The spec's decomposition of a catalogue name into (base, weight) terms."""
    if name == "sce":
        return [("ce", params.get("alpha", 0.1)), ("rce", params.get("beta", 1.0))]
    parts = name.split("+")
    if len(parts) == 1:
        return [(parts[0], params.get("scale", 1.0))]
    return [(parts[0], params.get("alpha", 1.0)), (parts[1], params.get("beta", 1.0))]


def loss_and_grad(z, y, name, **params):
    """Per-row values (N,) and gradients (N, K) of catalogue loss ``name`` on float64 logits,
    and the magnitude (N, K) of the terms each gradient element sums (``|h[i]| + p[i] sum |h|``,
    with the terms of h itself taken apart): in a confident row ``h[y] - p[y] h[y]`` cancels,
    and rounding errors are relative to the terms, not to their small difference; and each
    value's sensitivity (N,) ``sum_j |dL/dlp[j]|`` to rounding errors in ``lp``."""
    z = np.asarray(z, dtype=np.float64)
    values = np.zeros(z.shape[0])
    sensitivities = np.zeros(z.shape[0])
    grads = np.zeros_like(z)
    magnitudes = np.zeros_like(z)
    kw = dict(gamma=params.get("gamma", DEFAULTS["gamma"]), q=params.get("q", DEFAULTS["q"]),
              official=params.get("official_grad", False))
    for r in range(z.shape[0]):
        for base, weight in members(name, params):
            value, h, p, h_terms = row_value_and_h(z[r], int(y[r]), base, **kw)
            values[r] += weight * value
            grads[r] += weight * (h - p * h.sum())
            magnitudes[r] += abs(weight) * (h_terms + p * h_terms.sum())
            sensitivities[r] += abs(weight) * h_terms.sum()
    return values, grads, magnitudes, sensitivities
