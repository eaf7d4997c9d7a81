"""The PyTorch reference against the spec: formulas, anchors, gradients, call semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import apl_kernels as ak
from apl_kernels.catalogue import FOCAL, SINGLES, available_losses, members
from cases import LOSS_CASES, LOSS_IDS, case_id, random_logits, random_probabilities, random_target, random_weight
from formulas import loss_and_grad, row_value_and_h

F = ak.functional


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """|actual - expected| <= rel * max|expected|: for results that differ only in the order of
    rounding, where entries that cancel to ~0 have no relative accuracy of their own."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rel * scale, f"max error {error:.3g} > {rel:g} * max|expected| = {rel * scale:.3g}"


def value_and_grad(logits, target, name, params, reduction="none", backend="torch", upstream=None, **kw):
    x = logits.detach().clone().requires_grad_()
    loss = F.apl_loss(x, target, name, reduction=reduction, backend=backend, **params, **kw)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), x.grad


# ---------------------------------------------------------------- the spec's formulas


def assert_matches_formulas(z, y, name, params, **options):
    values, grads = value_and_grad(z, y, name, params, **options)
    np_options = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    want_v, want_g, magnitude, sensitivity, value_terms = loss_and_grad(z.numpy(), y.numpy(), name, **np_options,
                                                                        **params)
    # log_softmax rounds lp to about eps * (1 + |z|) absolutely; a value can be no more exact
    # than that times its sensitivity (this matters only where lp[y] ~ 0 in confident rows), nor
    # more exact than the terms it is the difference of.
    lp_rounding = 1e-14 * (1 + np.abs(z.numpy()).max(axis=1))
    tolerance = 1e-10 * value_terms + sensitivity * lp_rounding
    assert np.all(np.abs(values.numpy() - want_v) <= tolerance), np.abs(values.numpy() - want_v) / tolerance
    # Relative to the largest term the row's gradient sums: dL/dz = h - p sum(h) cancels in
    # confident rows, where both sides carry rounding of that size (not of the small result).
    scale = magnitude.max(axis=1, keepdims=True)
    error = np.abs(grads.numpy() - want_g)
    assert np.all(error <= 1e-10 * scale), (error / scale).max()


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_values_and_gradients_match_formulas(case, seed):
    name, params = case
    for k in (2, 3, 10, 37):
        z = random_logits(9, k, seed + k)
        y = random_target(9, k, seed + k)
        assert_matches_formulas(z, y, name, params)
        # Smoothed and weighted labels, and weighted probability targets (the formulas' expectation
        # over labels, written out independently of the reference).
        weight = random_weight(k, seed + k)
        assert_matches_formulas(z, y, name, params, weight=weight, label_smoothing=0.2)
        assert_matches_formulas(z, random_probabilities(9, k, seed + k), name, params, weight=weight)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    name=st.sampled_from(["nce+rce", "nfl+mae", "ngce+nce", "nfl", "fl", "gce+rce", "sce", "nrce", "nce+nnce",
                          "nfl+nnfl", "nce+agce", "nce+aul", "ael"]),
    official=st.booleans(),
)
def test_formulas_on_arbitrary_logits(data, name, official):
    n = data.draw(st.integers(1, 4))
    k = data.draw(st.integers(2, 12))
    z = data.draw(hnp.arrays(np.float64, (n, k), elements=st.floats(-60, 60, allow_subnormal=False)))
    y = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, k - 1)))
    params = {"official_grad": True} if official and FOCAL & set(members(name)) else {}
    assert_matches_formulas(torch.from_numpy(z), torch.from_numpy(y), name, params)


@pytest.mark.parametrize("gap", [30.0, 37.2, 37.5, 38.0, 45.0])
def test_formulas_keep_one_minus_p_below_float64_epsilon(gap):
    # A confident row: 1 - p at the max is rest / (1 + rest), below float64's epsilon here. The
    # formulas' magnitudes scale the parity tolerance, so they must not round it to 0 (a fused
    # float32 kernel's 0 there once failed against a reference that kept 2.2e-16).
    z = np.zeros(11)
    z[7] = gap
    rest = 10 * math.exp(-gap)
    u, lp = rest / (1 + rest), -math.log1p(rest)
    value = row_value_and_h(z, 7, "fl", gamma=0.5)[0]
    assert value == pytest.approx(u ** 0.5 * -lp, rel=1e-12, abs=0)


def test_formulas_allow_the_rounding_of_a_dense_reverse_row():
    # A seed's row that once failed: rce forms sum_j (C - c[j]) p̂[j], and C - c[0] (5e-8 of C)
    # rounds relative to C, an error of 3.5e-10 of this small value, which the formulas' value
    # terms now include.
    z = torch.tensor([[-0.5724059955759757, -43.42020973765032]], dtype=torch.float64)
    target = torch.tensor([[0.9999999491233992, 5.08766008587188e-08]], dtype=torch.float64)
    weight = torch.tensor([1.5567319986833772, 0.7782621211968722], dtype=torch.float64)
    assert_matches_formulas(z, target, "nrce", {"scale": 2.5}, weight=weight)


EXACT_CASES = [c for c in LOSS_CASES if not c[1].get("official_grad")]


# official_grad is by design not the derivative of the value: the formula test above and
# test_official_grad_is_the_published_codes_gradient hold it to its own definition.
@pytest.mark.parametrize("case", EXACT_CASES, ids=[case_id(c) for c in EXACT_CASES])
def test_gradcheck_float64(case, seed):
    name, params = case
    z = random_logits(5, 7, seed).requires_grad_()
    # Index targets in both reductions, and one kind of target on every label (rotating by case).
    dense = [(random_target(5, 7, seed), {"weight": random_weight(7, seed), "label_smoothing": 0.1}),
             (random_probabilities(5, 7, seed), {"weight": random_weight(7, seed)})][EXACT_CASES.index(case) % 2]
    for (y, options), reduction in (((random_target(5, 7, seed), {}), "none"), ((random_target(5, 7, seed), {}), "mean"),
                                    (dense, "mean")):
        assert torch.autograd.gradcheck(
            lambda x: F.apl_loss(x, y, name, reduction=reduction, backend="torch", **params, **options), (z,)
        )


NORMALIZED = ["nce", "nfl", "ngce", "nmae", "nrce"]


@pytest.mark.parametrize("name,params", [(n, {}) for n in NORMALIZED] + [("nfl", {"gamma": 2.0}), ("ngce", {"q": 0.1})])
def test_normalized_losses_sum_to_one_over_labels(name, params, seed):
    k = 11
    z = random_logits(12, k, seed)
    total = sum(F.apl_loss(z, torch.full((12,), label), name, reduction="none", **params) for label in range(k))
    # Exactly one without clamps. The clamps of ngce/nrce move it by at most (K - 1) * 1e-7 (every
    # class but one clamped), a bound rows of one certain class reach: plus float64 rounding.
    tol = (k - 1) * 1e-7 + 1e-12 if name in ("ngce", "nrce") else 1e-12
    torch.testing.assert_close(total, torch.ones(12, dtype=torch.float64), rtol=0, atol=tol)
    if name in ("nce", "nfl", "nmae"):
        return
    # Without active clamps (near-uniform rows) ngce and nrce are exact too.
    z = random_logits(4, k, seed, spread=False) * 0.1
    total = sum(F.apl_loss(z, torch.full((4,), label), name, reduction="none", **params) for label in range(k))
    torch.testing.assert_close(total, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,params", [("nnce", {}), ("nnce", {"min_prob": 1e-3}), ("nnfl", {}),
                                         ("nnfl", {"gamma": 2.0, "min_prob": 1e-4})])
def test_negative_losses_sum_to_k_minus_one_over_labels(name, params, seed):
    """sum_y (1 - V[y] / sum V) = K - 1 for every row, clamps active or not (V is normalized by its
    own sum), as Ye et al. define NNCE and NNFL."""
    k = 11
    z = random_logits(12, k, seed)  # confident rows: the clamps are active there
    total = sum(F.apl_loss(z, torch.full((12,), label), name, reduction="none", **params) for label in range(k))
    torch.testing.assert_close(total, torch.full((12,), k - 1.0, dtype=torch.float64), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- targets as distributions


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_probability_targets_are_the_expectation_over_labels(case, seed):
    """The loss of a target distribution t is sum_y t[y] L(z, y): the explicit sum over labels of
    the index-target losses; label smoothing is the smoothed target; class weights weigh each term."""
    name, params = case
    n, k = 6, 5
    z = random_logits(n, k, seed)
    t = random_probabilities(n, k, seed)
    w = random_weight(k, seed)
    per_label = torch.stack([F.apl_loss(z, torch.full((n,), y), name, reduction="none", **params)
                             for y in range(k)], dim=1)  # (N, K): L(z, y)
    expect = (per_label * t).sum(1)
    got = F.apl_loss(z, t, name, reduction="none", **params)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    weighted = F.apl_loss(z, t, name, reduction="none", weight=w, **params)
    torch.testing.assert_close(weighted, (per_label * t * w).sum(1), rtol=1e-12, atol=1e-12)
    # Smoothing eps: (1 - eps) onehot + eps / K for labels, (1 - eps) t + eps / K for probabilities.
    y = random_target(n, k, seed)
    onehot = torch.nn.functional.one_hot(y, k).double()
    for target, soft in ((y, onehot), (t, t)):
        smoothed = F.apl_loss(z, target, name, reduction="none", label_smoothing=0.3, **params)
        torch.testing.assert_close(smoothed, (per_label * (0.7 * soft + 0.3 / k)).sum(1), rtol=1e-12, atol=1e-12)
    # Index targets with weights: each row's loss times w[y]; a mean divides by the sum of w[y].
    torch.testing.assert_close(F.apl_loss(z, y, name, reduction="none", weight=w, **params),
                               per_label.gather(1, y[:, None])[:, 0] * w[y], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.apl_loss(z, y, name, weight=w, **params),
                               (per_label.gather(1, y[:, None])[:, 0] * w[y]).sum() / w[y].sum(), rtol=1e-12, atol=0)


# ---------------------------------------------------------------- anchors of the published code

ANCHOR_LOGITS = torch.tensor(
    [
        [2.0, 0.5, -1.0, 0.0, 1.0, -0.5, 0.3, -2.0, 0.8, 0.1],
        [-1.0, 3.0, 0.2, 0.1, -0.3, 0.0, 1.5, -0.7, 0.4, 2.2],
        [0.0] * 10,
        [8.0] + [-4.0] * 9,
    ],
    dtype=torch.float64,
)
ANCHOR_TARGET = torch.tensor([0, 9, 3, 0])
# name, params, mean loss, sum |grad| exact, sum |grad| official_grad
ANCHORS = [
    ("ce", {}, 1.178048, 1.138055, None),
    ("fl", {"gamma": 0.5}, 1.052207, 1.200593, 1.000990),
    ("gce", {"q": 0.7}, 0.686733, 0.384286, None),
    ("mae", {}, 0.569028, 0.252202, None),
    ("rce", {}, 5.240937, 2.322866, None),
    ("nce", {}, 0.045038, 0.045275, None),
    ("nfl", {"gamma": 0.5}, 0.042278, 0.049236, 0.041612),
    ("ngce", {"q": 0.7}, 0.058942, 0.033405, None),
    ("ngce", {"q": 0.1}, 0.047233, 0.043823, None),
    ("nmae", {}, 0.063225, 0.028022, None),
    ("nrce", {}, 0.063225, 0.028022, None),
    ("nce+mae", {"alpha": 1.0, "beta": 1.0}, 0.614066, 0.297477, None),
    # The later families (values and the official-gradient column from the official ANL code).
    ("nnce", {}, 0.842500, 0.035971, None),
    ("nnfl", {"gamma": 0.5}, 0.842154, 0.036448, 0.034947),
    ("agce", {"a": 6.0, "q": 1.5}, 1.462822, 0.632259, None),
    ("aul", {"a": 6.3, "q": 1.5}, 1.356958, 0.618490, None),
    ("ael", {"a": 5.0}, 0.919561, 0.047655, None),
    ("nce+agce", {"alpha": 1.0, "beta": 4.0, "a": 6.0, "q": 1.5}, 5.896327, 2.574312, None),
    ("nce+nnce", {"alpha": 5.0, "beta": 5.0}, 4.437694, 0.406229, None),
    ("nfl+nnfl", {"alpha": 5.0, "beta": 5.0, "gamma": 0.5}, 4.422161, None, 0.382485),
    ("anorm", {"a": 1.5, "p": 0.9}, 1.360013, 0.560523, None),
    ("anorm", {"a": 5.0, "p": 1.5}, 1.339005, 0.644944, None),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,params,value,grad_exact,grad_official", ANCHORS, ids=[f"{a[0]}{a[1]}" for a in ANCHORS])
def test_anchor_table(name, params, value, grad_exact, grad_official, dtype):
    # The table has six decimals: half a unit in the last place, plus float32 rounding.
    tol = 5e-7 + (2e-6 * abs(value) if dtype == torch.float32 else 0)
    modes = ([({}, grad_exact)] if grad_exact else []) + ([({"official_grad": True}, grad_official)] if grad_official else [])
    for extra, grad_sum in modes:
        loss, grad = value_and_grad(ANCHOR_LOGITS.to(dtype), ANCHOR_TARGET, name, {**params, **extra}, reduction="mean")
        assert abs(loss.item() - value) <= tol, (loss.item(), value)
        assert abs(grad.abs().sum().item() - grad_sum) <= tol, (grad.abs().sum().item(), grad_sum)


# ---------------------------------------------------------------- official_grad = the published code


def published_fl(z, y, gamma):
    """FocalLoss of the published code (``.data`` written as ``.detach()``)."""
    logpt = torch.log_softmax(z, dim=1).gather(1, y[:, None]).view(-1)
    pt = logpt.detach().exp()
    return -1 * (1 - pt) ** gamma * logpt


def published_nfl(z, y, gamma):
    """NormalizedFocalLoss of the published code (scale 1)."""
    logpt = torch.log_softmax(z, dim=1)
    normalizor = torch.sum(-1 * (1 - logpt.detach().exp()) ** gamma * logpt, dim=1)
    logpt = logpt.gather(1, y[:, None]).view(-1)
    pt = logpt.detach().exp()
    return -1 * (1 - pt) ** gamma * logpt / normalizor


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name,published", [("fl", published_fl), ("nfl", published_nfl)])
def test_official_grad_is_the_published_codes_gradient(name, published, gamma, seed):
    z = random_logits(16, 10, seed)
    y = random_target(16, 10, seed)
    x = z.clone().requires_grad_()
    published(x, y, gamma).sum().backward()
    values, grads = value_and_grad(z, y, name, {"gamma": gamma, "official_grad": True})
    # The published 1 - pt loses ~1e-16 absolutely where pt ~ 1; ours uses expm1.
    torch.testing.assert_close(values, published(z, y, gamma).detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grads, x.grad, rtol=1e-10, atol=1e-14)
    # ... and it is not the exact gradient.
    _, exact = value_and_grad(z, y, name, {"gamma": gamma})
    assert (exact - grads).abs().max() > 1e-3


def test_official_grad_applies_to_pairs(seed):
    z = random_logits(8, 10, seed)
    y = random_target(8, 10, seed)
    _, pair = value_and_grad(z, y, "nfl+rce", {"official_grad": True, "alpha": 2.0, "beta": 0.5})
    _, nfl = value_and_grad(z, y, "nfl", {"official_grad": True, "scale": 2.0})
    _, rce = value_and_grad(z, y, "rce", {"scale": 0.5})
    torch.testing.assert_close(pair, nfl + rce, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- call semantics


@pytest.mark.parametrize("case", LOSS_CASES[::3], ids=LOSS_IDS[::3])
def test_spatial_input_equals_flattened(case, seed):
    name, params = case
    n, k, d1, d2 = 3, 5, 4, 2
    z = random_logits(n * d1 * d2, k, seed).reshape(n, d1, d2, k).movedim(-1, 1)  # (N, K, d1, d2)
    y = random_target(n * d1 * d2, k, seed).reshape(n, d1, d2)
    for reduction in ("none", "mean", "sum"):
        v, g = value_and_grad(z, y, name, params, reduction=reduction)
        flat_z = z.movedim(1, -1).reshape(-1, k)
        fv, fg = value_and_grad(flat_z, y.reshape(-1), name, params, reduction=reduction)
        assert v.shape == (y.shape if reduction == "none" else ())
        torch.testing.assert_close(v.reshape(-1), fv.reshape(-1), rtol=1e-13, atol=0)
        torch.testing.assert_close(g.movedim(1, -1).reshape(-1, k), fg, rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", ["nce+rce", "nfl+mae", "ngce", "sce"])
def test_non_contiguous_and_transposed_inputs(name, seed):
    k, n = 9, 6
    base = random_logits(k, 2 * n, seed)  # (K, 2N): columns are rows
    y = random_target(n, k, seed)
    strided = base.t()[::2]  # (N, K), strides (1, ...) and a step
    assert not strided.is_contiguous()
    for z in (strided, random_logits(n, 2 * k, seed)[:, ::2]):
        v, g = value_and_grad(z, y, name, {})
        cv, cg = value_and_grad(z.contiguous(), y, name, {})
        torch.testing.assert_close(v, cv, rtol=0, atol=0)
        torch.testing.assert_close(g, cg, rtol=0, atol=0)


@pytest.mark.parametrize("ignore_index", [-100, -1, 255])
@pytest.mark.parametrize("name", ["nce+mae", "nfl+rce", "gce", "nrce"])
def test_ignore_index(name, ignore_index, seed):
    n, k = 10, 7
    z = random_logits(n, k, seed)
    y = random_target(n, k, seed)
    ignored = torch.zeros(n, dtype=torch.bool)
    ignored[::3] = True
    y_ignored = torch.where(ignored, ignore_index, y)
    z = z.clone()
    z[0] = float("nan")  # an ignored row's logits never reach the result
    v, g = value_and_grad(z, y_ignored, name, {}, ignore_index=ignore_index)
    assert torch.all(v[ignored] == 0) and torch.all(g[ignored] == 0)
    # The kept rows as they would be with every row counted, at the same positions: bit-equal (a
    # batch of the kept rows alone would move rows between the vector lanes and the scalar tails of
    # torch's elementwise kernels, whose pow, exp and log round differently in the last bit).
    z_counted = torch.where(ignored[:, None], 0.0, z)
    kv, kg = (x[~ignored] for x in value_and_grad(z_counted, y, name, {}))
    torch.testing.assert_close(v[~ignored], kv, rtol=0, atol=0)
    torch.testing.assert_close(g[~ignored], kg, rtol=0, atol=0)
    mean, mean_grad = value_and_grad(z, y_ignored, name, {}, reduction="mean", ignore_index=ignore_index)
    torch.testing.assert_close(mean, kv.mean(), rtol=1e-14, atol=0)
    assert_close_to_scale(mean_grad[~ignored], kg / (~ignored).sum(), 1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_not_nan(reduction):
    z = torch.randn(4, 5)
    v, g = value_and_grad(z, torch.full((4,), -100), "nce+rce", {}, reduction=reduction)
    assert torch.all(v == 0) and torch.all(g == 0)


@pytest.mark.parametrize("name", ["nce+mae", "nfl+rce", "ce", "ngce+nce"])
def test_reductions(name, seed):
    z = random_logits(12, 6, seed)
    y = random_target(12, 6, seed)
    upstream = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    none, none_grad = value_and_grad(z, y, name, {}, upstream=upstream)
    for reduction, want in (("sum", none.sum()), ("mean", none.mean())):
        v, g = value_and_grad(z, y, name, {}, reduction=reduction, upstream=torch.tensor(2.0, dtype=torch.float64))
        torch.testing.assert_close(v, want, rtol=1e-14, atol=0)
        _, unit = value_and_grad(z, y, name, {})
        assert_close_to_scale(g, 2.0 * unit / (12 if reduction == "mean" else 1), 1e-14)
    _, unit = value_and_grad(z, y, name, {})
    # A random upstream gradient scales each row.
    assert_close_to_scale(none_grad, unit * upstream[:, None], 1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["nce+rce", "nfl+mae", "ngce", "sce"])
def test_low_precision_computes_in_float32(name, dtype, seed):
    z = random_logits(8, 10, seed, dtype=dtype)
    y = random_target(8, 10, seed)
    for reduction in ("none", "mean"):
        v, g = value_and_grad(z, y, name, {}, reduction=reduction)
        assert v.dtype == dtype and g.dtype == dtype
        fv, fg = value_and_grad(z.float(), y, name, {}, reduction=reduction)
        assert torch.equal(v, fv.to(dtype))
        assert torch.equal(g, fg.to(dtype))


@pytest.mark.parametrize("name", ["ce", "nce", "nfl", "ngce", "rce", "nce+rce", "nfl+mae", "gce+nce", "nnce", "nfl+nnfl",
                                  "agce", "aul", "ael"])
def test_masked_classes_and_extreme_logits_stay_finite(name, seed):
    z = random_logits(6, 8, seed, dtype=torch.float32)
    z[:, 3] = float("-inf")  # a masked class, never the label
    z[1, 0], z[2, 1] = 1e4, -1e4
    z[4] = torch.tensor([30.0, -30.0, 0, float("-inf"), 0, 0, 0, 0])  # p[y] == 1 in float32
    y = torch.tensor([0, 0, 2, 4, 0, 7])
    for params in ({}, {"official_grad": True}) if FOCAL & set(members(name)) else ({},):
        v, g = value_and_grad(z, y, name, params)
        assert torch.isfinite(v).all() and torch.isfinite(g).all()
        assert torch.all(g[:, 3] == 0)


def test_nan_logits_give_nan():
    z = torch.randn(3, 5)
    z[1, 2] = float("nan")
    v = F.nce_rce(z, torch.tensor([0, 1, 2]), reduction="none")
    assert torch.isnan(v[1]) and torch.isfinite(v[[0, 2]]).all()


def test_singles_cover_the_spec():
    assert set(SINGLES) == {"ce", "fl", "gce", "sce", "mae", "rce", "nce", "nfl", "ngce", "nmae", "nrce", "nnce", "nnfl",
                            "agce", "aul", "ael", "anorm"}
    assert {"nce+agce", "nce+aul", "nce+ael", "nce+nnce", "nfl+nnfl", "nce+anorm"} <= set(available_losses())
