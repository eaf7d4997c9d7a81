"""One source of test inputs: the loss cases and random logits every test file draws from."""

from __future__ import annotations

import torch

from apl_kernels.catalogue import FOCAL, available_losses

# Non-default parameters worth their own case (gamma > 1, gamma = 0, small q, weights).
PARAM_VARIANTS = [
    ("fl", {"gamma": 2.0}),
    ("nfl", {"gamma": 0.0}),
    ("nfl", {"gamma": 1.5, "official_grad": True}),
    ("gce", {"q": 0.3}),
    ("ngce", {"q": 0.1}),
    ("nce", {"scale": 3.0}),
    ("nrce", {"scale": 2.5}),
    ("sce", {"alpha": 0.5, "beta": 2.0}),
    ("nce+rce", {"alpha": 2.0, "beta": 0.5}),
    ("ngce+mae", {"q": 0.1, "alpha": 0.3}),
    ("nfl+rce", {"gamma": 0.2, "official_grad": True, "alpha": 0.7}),
]


def loss_cases() -> list[tuple[str, dict]]:
    """Every catalogue loss with default parameters, both gradient modes where they apply."""
    cases = []
    for name in available_losses():
        cases.append((name, {}))
        if any(member in FOCAL for member in name.split("+")):
            cases.append((name, {"official_grad": True}))
    return cases + PARAM_VARIANTS


def case_id(case) -> str:
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())


LOSS_CASES = loss_cases()
LOSS_IDS = [case_id(c) for c in LOSS_CASES]


def random_logits(n: int, k: int, seed: int, dtype=torch.float64, spread: bool = True) -> torch.Tensor:
    """Logits with rows of every character: moderate, confident (p < 1e-7 somewhere), near-uniform."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    if spread and n >= 3:
        z[1::3] *= 8  # confident rows: some clamps are active
        z[2::3] *= 0.05  # near-uniform rows
    return z.to(dtype)


def random_target(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, k, (n,), generator=g)


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """|actual - expected| <= rel * max|expected|: for results that differ only in the order of
    rounding (a reduction applied before or after a step), where entries that cancel to ~0 have
    no relative accuracy of their own."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rel * scale, f"max error {error:.3g} > {rel:g} * max|expected| = {rel * scale:.3g}"


def assert_parity(fused: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor,
                  magnitude: torch.Tensor, rtol: float, factor: float = 2.0, floor: float = 0.0) -> None:
    """A fused result is as exact as its dtype allows, and as the reference in that dtype.

    ``truth`` is the reference in float64 on the same (rounded) inputs; ``magnitude`` (per row,
    or per element) the size of the terms the result is computed from (see
    formulas.loss_and_grad): where the math cancels (confident rows, sums over many classes),
    rounding is relative to the terms, not to their small difference. Each row may be off by
    ``rtol`` times its largest magnitude (float32 arithmetic: ~100 ulps), or by ``factor``
    times the reference's own error on that row (half types: both round to the same grid),
    or by ``floor``: the dtype's smallest normal number, below which it has no relative
    precision at all (gradients of rows whose probabilities underflow).
    """
    rows = truth.shape[0] if truth.dim() else 1
    fused, reference, truth, magnitude = (
        torch.as_tensor(t).double().reshape(rows, -1) for t in (fused, reference, truth, magnitude)
    )
    reference_error = (reference - truth).abs().amax(dim=1, keepdim=True)
    allowed = torch.maximum(rtol * magnitude.amax(dim=1, keepdim=True), factor * reference_error).clamp_min(floor)
    error = (fused - truth).abs()
    bad = error > allowed
    if bad.any():
        row = int(bad.any(dim=1).nonzero()[0, 0])
        raise AssertionError(
            f"row {row}: fused error {error[row].max().item():.3g} > allowed {allowed[row, 0].item():.3g} "
            f"(reference error {reference_error[row, 0].item():.3g}, magnitude "
            f"{magnitude[row].max().item():.3g}); {int(bad.any(dim=1).sum())} of {bad.shape[0]} rows"
        )
