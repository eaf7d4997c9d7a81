"""Every parameter that validation accepts gives an accurate loss and gradient (docs/losses.md,
"Numerical range"): the losses with q or a, across their whole accepted range, on every backend and
in float32 and float64, against an oracle in 90-digit arithmetic (mpmath) of the published formulas,
within the suite's tolerance rule (cases.assert_parity). The published forms cancel (1 - p^q for
small q, (a + 1)^q - (a + p)^q for large a): the reference and the kernels use forms that do not.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from apl_kernels.backends.triton import rowmath
from apl_kernels.catalogue import AUL_MIN_EXCESS, BASE, BASES, LIMITS, PAIRS, make_spec, members, slot_names
from test_cuda_kernel import BACKEND as EMULATED, emulated  # noqa: F401 (a fixture)
from cases import FUSED, FUSED_IDS, assert_result, clamp_levels, coefficients, is_interpreted, make_target, \
    off_kinks, random_logits, run

CLAMP_MIN = mpmath.mpf(1e-7)  # the float64 1e-7 the clamps compare with
ANORM_CLAMP_MIN = mpmath.mpf(1e-5)  # anorm's
DIGITS = 90  # cancellation of the published forms is at most ~1e-60 (a = 1e30, q = 1e-30)
ISSUE_Z = torch.randn(4, 7, generator=torch.Generator().manual_seed(3))  # issue 26's logits
ISSUE_T = torch.tensor([0, 6, 3, 2])



def kernel_parameters(base: str) -> set:
    """The kernels' parameters (catalogue.PARAMETERS) that base takes."""
    return {BASE[base].slots.get(name, name) for name in BASE[base].defaults}


# Every base with q or a, and its pair with nce (the pair's second term and its validation).
RANGED = tuple(b.name for b in BASES if kernel_parameters(b.name) & {"q", "a"})
LOSSES = RANGED + tuple(next(p for p in PAIRS if set(members(p)) == {b, "nce"}) for b in RANGED)
# And the CUDA C++ row math through its host emulation (test_cuda_kernel.py's backend).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs on CPU tensors
BACKENDS = [("cpu", "torch")] + FUSED + [("cpu", EMULATED)]
BACKEND_IDS = ["torch-cpu"] + FUSED_IDS + [EMULATED]


def _element(base, p, lp, params):
    """V and dV/dlp of a local base at one element, from the published formulas."""
    q, a = params.get("q"), params.get("a")
    if base == "gce":
        clamped = p >= CLAMP_MIN
        powered = (p if clamped else CLAMP_MIN) ** q
        return (1 - powered) / q, -powered if clamped else mpmath.mpf(0)
    if base == "agce":
        return ((a + 1) ** q - (a + p) ** q) / q, -((a + p) ** (q - 1)) * p
    if base == "aul":
        return ((a - p) ** q - (a - 1) ** q) / q, -((a - p) ** (q - 1)) * p
    if base == "ael":
        e = mpmath.exp(-p / a)
        return e, -e * p / a
    if base in ("anorm", "anorm off"):  # at the label (V) or off it (W), at p̂ = clamp(p, 1e-5, 1)
        kept = p >= ANORM_CLAMP_MIN
        clamped = p if kept else ANORM_CLAMP_MIN
        dp = p if kept else mpmath.mpf(0)
        if base == "anorm":
            return ((a - clamped) ** q - (a - 1) ** q) / q, -((a - clamped) ** (q - 1)) * dp
        return clamped**q / q, clamped ** (q - 1) * dp
    raise KeyError(base)


def oracle(z: torch.Tensor, c: np.ndarray, name: str, params: dict, lp_error: float = 0.0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row values and gradients d(sum of rows)/dz of loss ``name`` at float64 logits ``z`` with
    target coefficients ``c`` (formulas.coefficients), in DIGITS-digit arithmetic:
    dL/dz[i] = h[i] - p[i] sum_j h[j], h[j] = dL/dlp[j] (docs/losses.md). ``lp_error``: every lp
    moved by lp_error (1 + |lp|), as a rounding of the log-softmax would move it."""
    weights = {"alpha": 1.0, "beta": 1.0, "scale": 1.0, **params}
    terms = list(zip(members(name), [weights["scale"]] if "+" not in name else [weights["alpha"], weights["beta"]]))
    spec = make_spec(name, **params)
    mp_params = {k: mpmath.mpf(spec.param(k)) for k in ("q", "a")}
    values, grads = [], []
    with mpmath.workdps(DIGITS):
        for row, coef in zip(z.tolist(), c.tolist()):
            zs = [mpmath.mpf(x) for x in row]
            log_s = mpmath.log(mpmath.fsum(mpmath.exp(x) for x in zs))
            lp = [x - log_s for x in zs]
            lp = [min(x + lp_error * (1 + abs(x)), 0) if mpmath.isfinite(x) else x for x in lp]  # p <= 1
            p = [mpmath.exp(x) for x in lp]
            cs = [mpmath.mpf(x) for x in coef]
            value, h = mpmath.mpf(0), [mpmath.mpf(0)] * len(zs)
            for base, weight in terms:
                if base in ("nce", "ngce"):  # N / D: value and h = (dN D - N dD) / D^2
                    if base == "nce":
                        v, dv = lp, [mpmath.mpf(1)] * len(zs)
                    else:  # (1 - P[y]) / (K - sum P), P = p̂^q: dP/dlp = q P mask
                        v, dv = zip(*(_element("gce", pj, lj, mp_params) for pj, lj in zip(p, lp)))
                        v, dv = [x * mp_params["q"] for x in v], [x * mp_params["q"] for x in dv]
                    n, d = mpmath.fsum(cj * vj for cj, vj in zip(cs, v)), mpmath.fsum(v)
                    value += weight * n / d
                    h = [hj + weight * (cj * dvj * d - n * dvj) / d**2 for hj, cj, dvj in zip(h, cs, dv)]
                elif BASE[base].family == "split":  # sum c V + (C - c) W, h = c V' + (C - c) W'
                    v, dv = zip(*(_element(base, pj, lj, mp_params) for pj, lj in zip(p, lp)))
                    w, dw = zip(*(_element(base + " off", pj, lj, mp_params) for pj, lj in zip(p, lp)))
                    total = mpmath.fsum(cs)
                    value += weight * mpmath.fsum(cj * vj + (total - cj) * wj for cj, vj, wj in zip(cs, v, w))
                    h = [hj + weight * (cj * dvj + (total - cj) * dwj) for hj, cj, dvj, dwj in zip(h, cs, dv, dw)]
                else:
                    v, dv = zip(*(_element(base, pj, lj, mp_params) for pj, lj in zip(p, lp)))
                    value += weight * mpmath.fsum(cj * vj for cj, vj in zip(cs, v))
                    h = [hj + weight * cj * dvj for hj, cj, dvj in zip(h, cs, dv)]
            total = mpmath.fsum(h)
            values.append(float(value))
            grads.append([float(hj - pj * total) for hj, pj in zip(h, p)])
    return torch.tensor(values, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)


def lp_rounding(z: torch.Tensor, c: np.ndarray, name: str, params: dict, grad: torch.Tensor) -> torch.Tensor:
    """How much the exact gradient moves when lp moves by 4 units of z's dtype (times 1 + |lp|): the
    error every backend inherits from its log-softmax (log s rounds, z - m rounds relative to its
    size), which no form of the element math can undo. It matters only where the gradient is
    ill-conditioned in lp: ael with p / a large (exp(-p / a) p / a changes by p / a times lp's
    relative error), aul with a - 1 below float32's resolution of 1 - p near p = 1 ((a - p)^(q-1)).
    Elsewhere it is of the order of an ulp of the gradient's terms."""
    error = 4 * torch.finfo(z.dtype).eps
    moved = [oracle(z.double(), c, name, params, sign * error)[1] for sign in (-1, 1)]
    # And the C++ kernel's exp flushes results below the smallest normal to 0 (as GPUs' fast exp
    # does): ael's V' = -exp(-x) x, x = p / a, multiplies such a result by up to x ~ 88.
    flushed = 100 * torch.finfo(z.dtype).tiny
    return torch.maximum(*((g - grad).abs() for g in moved)).nan_to_num(0.0) + flushed


def accepted_points(name: str, rng: np.random.Generator) -> list[dict]:
    """Parameter points across the accepted range: q log-spaced from its lower bound to its upper
    (both included, the points between drawn within their decade), a likewise up to its bound
    (aul: a - 1 from its bound up), and the points of issue 26."""
    parts = set(members(name))
    used = set().union(*(kernel_parameters(b) for b in parts))
    uses_q, uses_a = "q" in used, "a" in used
    above_one = any(BASE[b].a_above_one for b in parts)

    def spread(low, high, count):
        inner = np.linspace(math.log10(low), math.log10(high), count)[1:-1]
        inner = inner + rng.uniform(-0.5, 0.5, len(inner)) * (inner[1] - inner[0] if len(inner) > 1 else 1)
        return [low, *(10.0 ** inner), high]

    qs = spread(*LIMITS["q"], 9) + [0.7, 1.0, 2.0] if uses_q else [None]
    if above_one:
        a_values = [1 + x for x in spread(AUL_MIN_EXCESS, 1.0, 5)] + spread(3.0, LIMITS["a"][1], 6)
    else:
        a_values = spread(*LIMITS["a"], 11) if uses_a else [None]
    names = slot_names(tuple(parts))  # the members' own names of q and a
    points = [{names[k]: v for k, v in (("q", q), ("a", a)) if v is not None} for q in qs for a in a_values]
    issue = {"ngce": {"q": 1e-8}, "gce": {"q": 1e-8}, "agce": {"a": 1e8, "q": 1.0}, "aul": {"a": 1e6}}
    return points + [issue[b] for b in parts if b in issue] + ([{"a": 1e30}] if above_one else [])


def refused(name: str, params: dict) -> bool:
    """Whether validation refuses ``params`` (then with its bound, which the test checks)."""
    try:
        make_spec(name, **params)
    except ValueError as err:
        assert f"need {slot_names(members(name))['q']} · ln(a + 1) <= 88" in str(err), err
        return True
    return False


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy on unused where sides
@pytest.mark.parametrize("device,backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("name", LOSSES)
def test_every_accepted_parameter_is_accurate(name, device, backend, seed, request):
    if backend == EMULATED:
        request.getfixturevalue("emulated")
    rng = np.random.default_rng(seed)
    points = [params for params in accepted_points(name, rng) if not refused(name, params)]
    # Only q ln(a + 1) > 88 is refused: (a + 1)^q overflows float32 there.
    q = slot_names(members(name))["q"]
    assert all(p.get(q, 1) * math.log1p(p.get("a", 0)) <= 88 for p in points)
    # Each run takes the range's corners and points drawn from the grid (fewer for the slow interpreter):
    # a sweep of seeds covers the whole grid.
    corners = {0, len(points) - 1}
    drawn = rng.choice(len(points), min(len(points), 4 if is_interpreted(device, backend) else 10), replace=False)
    points = [points[i] for i in sorted(corners | set(drawn))]
    for i, params in enumerate(points):
        for dtype in (torch.float32, torch.float64):
            mode = ("index", "probabilities")[(i + (dtype == torch.float64)) % 2]
            target, options = make_target(mode, 6, 7, seed + i)
            z = off_kinks(random_logits(6, 7, seed + i, dtype=dtype), clamp_levels(params))
            got = run(z.to(device), target.to(device), name, params, backend, **options)
            weight = options.get("weight")
            c, _ = coefficients(target.double().numpy() if mode == "probabilities" else target.numpy(), 7,
                                None if weight is None else weight.double().numpy(), options.get("label_smoothing", 0.0))
            truth = oracle(z.double(), c, name, params)
            assert_result(got, truth, z, target, name, params, where=f"{backend} {name} {params} {dtype} {mode}",
                          grad_floor=lp_rounding(z, c, name, params, truth[1]), **options)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=BACKEND_IDS)
def test_issue_26_examples(device, backend, request):
    """The audit's cases: NGCE q = 1e-8 was NaN or 0 (exact 0.162 in row 0), AGCE a = 1e8 q = 1 was 0
    or -24 (0.92), AUL a = 1e30 was 0 or -1.6e21 (9.2e-4), AUL a = 1e6 was 0.104 (0.231), and
    GCE, AGCE, AUL at q = 1e-8 were 0."""
    if backend == EMULATED:
        request.getfixturevalue("emulated")
    cases = [("ngce", {"q": 1e-8}), ("agce", {"a": 1e8, "q": 1.0}), ("aul", {"a": 1e30}), ("aul", {"a": 1e6}),
             ("gce", {"q": 1e-8}), ("agce", {"q": 1e-8}), ("aul", {"q": 1e-8})]
    for name, params in cases:
        got = run(ISSUE_Z.to(device), ISSUE_T.to(device), name, params, backend)
        truth = oracle(ISSUE_Z.double(), coefficients(ISSUE_T.numpy(), 7)[0], name, params)
        assert_result(got, truth, ISSUE_Z, ISSUE_T, name, params, where=f"{backend} {name} {params}")
        assert torch.isfinite(got[1]).all() and got[0].abs().min() > 0, (name, params, got[0])


@triton.jit
def _log1p_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)
    tl.store(out_ptr + offsets, rowmath.log1p(x), mask=offsets < n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1p_matches_torch(dtype):
    # Both branches (series for |w| < 1/4, ln(1 + w) beyond), their boundaries, tiny w, up to -1 and 1e30.
    tiny = -37 if dtype == torch.float32 else -300
    magnitudes = torch.logspace(tiny, -0.01, 1500, dtype=torch.float64)
    w = torch.cat([magnitudes, -magnitudes, torch.logspace(0, 30, 200, dtype=torch.float64),
                   torch.linspace(0.24, 0.26, 100, dtype=torch.float64), -torch.linspace(0.24, 0.26, 100, dtype=torch.float64),
                   torch.tensor([0.0, 0.25, -0.25, -0.5], dtype=torch.float64)]).to(dtype).to(TRITON_DEVICE)
    out = torch.empty_like(w)
    _log1p_kernel[(1,)](w, out, len(w), BLOCK=triton.next_power_of_2(len(w)))
    w, out = w.cpu(), out.cpu()
    want = torch.log1p(w.double())
    # Series: Horner rounding and s = w / (2 + w), a few ulp; beyond: 1 + w's rounding over |ln(1 + w)| > 0.22.
    error = (out.double() - want).abs() / want.abs().clamp_min(torch.finfo(dtype).tiny)
    assert error.max() <= 8 * torch.finfo(dtype).eps, (error.max(), w[error.argmax()])
