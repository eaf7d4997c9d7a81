"""Phase 2: every loss case on every fused backend of the device against the reference."""

from __future__ import annotations

import time

import torch

from apl_kernels.testing.cases import (
    LOSS_CASES, TARGET_MODES, case_id, check_parity, gradient_roundings, make_target, random_logits,
)
from .common import (
    Check, DTYPES, INTERPRETED_KS, INTERPRETED_ROWS, KS, LAYOUTS, Progress, ROWS, UPSTREAMS, dtype_name, short,
)


# ---------------------------------------------------------------- 2. parity


def parity_plan(check: Check, backend: str) -> list[tuple]:
    """(case index, dtype, rows, K, target mode, upstream, layout, ignore_index) of every check."""
    ks = INTERPRETED_KS if check.interpreted(backend) else KS
    plan = []
    for r, dtype in enumerate(DTYPES):
        for i in range(len(LOSS_CASES)):
            k = ks[(i + r) % len(ks)]
            if check.quick and k == KS[-1] and (r or i % 4):
                k = 1000  # --quick: the vocabulary size for a few cases (its float64 truth takes ~1 s here)
            mode = TARGET_MODES[(i // 4 + r) % len(TARGET_MODES)]
            if k > 100 and mode in ("smoothed", "probabilities"):
                mode = ("index", "weighted")[(i + r) % 2]  # the formulas are O(K^2) per row for those
            upstream = list(UPSTREAMS)[(i // 2 + r) % len(UPSTREAMS)]
            rows = INTERPRETED_ROWS if check.interpreted(backend) else ROWS[k]
            plan.append((i, dtype, rows, k, mode, upstream, LAYOUTS[(i // 3 + r) % 2], (-100, 0)[r % 2]))
    return plan


def parity_check(check: Check, backend: str, item: tuple, seed: int) -> None:
    i, dtype, n, k, mode, upstream_name, layout, ignore_index = item
    name, params = LOSS_CASES[i]
    z = random_logits(n, k, seed, dtype=dtype)
    if layout == "column-major":
        z = z.t().contiguous().t()
    target, options = make_target(mode, n, k, seed)
    if not target.is_floating_point():
        target[::5] = ignore_index  # with ignore_index 0, every label 0 is ignored too
        options["ignore_index"] = ignore_index
    reduction, upstream = UPSTREAMS[upstream_name]
    if upstream is None:
        upstream = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    elif not isinstance(upstream, str):
        upstream = torch.tensor(upstream, dtype=dtype)
    roundings = gradient_roundings(check.device.type, backend, dtype, upstream)
    check_parity(z, target, name, params, backend, str(check.device), reduction, upstream, roundings, **options)


def parity(check: Check, deadline: float) -> None:
    """Each backend in turn, with an equal share of the time left (a fast one leaves its rest to the
    next; the Triton kernels compile each specialization on first use)."""
    for position, backend in enumerate(check.fused):
        plan = parity_plan(check, backend)
        own_deadline = time.monotonic() + (deadline - time.monotonic()) / (len(check.fused) - position)
        progress = Progress(f"parity {backend}", len(plan))
        cases = check.parity[backend] = {}
        for j, (i, dtype, n, k, mode, upstream, layout, ignore_index) in enumerate(plan):
            if time.monotonic() > own_deadline or check.lost_device:
                check.parity_not_run[backend] = len(plan) - j
                break
            counts = cases.setdefault(case_id(LOSS_CASES[i]), [0, 0])
            failed = True
            try:
                parity_check(check, backend, plan[j], check.seed + j)
                failed = False
            except Exception as err:  # noqa: BLE001 - every failure is reported, then the next case runs
                check.fail(f"parity {backend} {case_id(LOSS_CASES[i])} {dtype_name(dtype)} ({n}, {k}) {layout}, "
                           f"{mode} targets, ignore_index {ignore_index}, upstream {upstream} "
                           f"(APL_TEST_SEED={check.seed}): {short(err)}", progress)
            counts[failed] += 1
            progress.step(case_id(LOSS_CASES[i]), failed)
        progress.close()
