"""The per-shard math of the class-parallel losses: each rank's part of a loss's per-row sums over
the classes, their derivatives, and its columns' gradient, in two formulations.

* PyTorch (``partial_sums`` on a :class:`ShardRow`): the reference's own per-element functions
  (reference.Row's methods and its base functions) on this rank's columns; autograd gives the
  derivatives. Any device, and the definition of correctness.
* Fused C++ (``fused_sums``, ``fused_gradient``; csrc/apl_cpu.cpp's shard ops): the CPU kernel's
  row passes on a shard's columns, given the row's global max and log s. One pass over a chunk gives
  every sum and its derivative; one more writes the gradient (over the chunk's logits, when asked),
  so a chunk holds one chunk-sized tensor where autograd's graph held 7 to 20.

The sums, for each term of the loss: a "local" or "reverse" base is a row sum of per-label terms,
one sum ``h``; a "normalized" or "negative" base divides two such sums, ``N = Σ c V`` and
``D = Σ V``. Their derivatives with respect to the row's ``lse`` are ``-Σ ∂h/∂lp`` (``lp = z - lse``),
and with respect to the row's total ``C`` (probability targets' gradient) ``Σ V`` for a reverse term
(``h = Σ (C - c) V``), ``Σ W`` for a split one (``h = Σ c V + (C - c) W``), 0 for the others.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..backends import contract
from ..catalogue import BASE, LossSpec
from ..options import CallOptions
from ..reference import BASE_FUNCTIONS, Row, gce_elements, expectation


def _ratio_terms(base: str, r: Row) -> tuple[Tensor, Tensor]:
    """A normalized or negative base's per-element numerator and denominator terms (reference.py)."""
    if base == "nce":
        return r.lp, r.lp
    if base == "nfl":
        f = r.focal(r.lp)
        return f, f
    if base == "ngce":  # gce's V = (1 - p̂^q) / q over its sum, as the reference's (no cancellation)
        v = gce_elements(r)
        return v, v
    if base == "nnce":
        s = -math.log(r.spec.param("min_prob")) + r.clamped_lp()
        return s, s
    m, gamma = r.spec.param("min_prob"), r.spec.param("gamma")
    g = -(1 - m) ** gamma * math.log(m) - r.focal(r.clamped_lp())  # nnfl: B - f̂
    # Where the clamp holds, f̂ = f(ln m) = B exactly; in float32 the two roundings differ by ~1e-7 B,
    # which a label of such a class turns into a numerator (and a gradient) that should be 0.
    g = torch.where(r.lp > math.log(m), g, 0)
    return g, g


def _ratio_value(base: str, numerator: Tensor, denominator: Tensor, total_c: Tensor) -> Tensor:
    if base in ("nnce", "nnfl"):
        return total_c - numerator / denominator
    return numerator / denominator


def _is_ratio(base: str) -> bool:
    return BASE[base].family in ("normalized", "negative")


def num_sums(spec: LossSpec) -> int:
    """How many per-row sums over classes loss ``spec`` exchanges (the second all-reduce's width / 2)."""
    return sum(2 if _is_ratio(base) else 1 for base, _ in spec.terms)


class ShardRow(Row):
    """reference.Row on this rank's columns, with the global log-softmax and the global K and C."""

    def __init__(self, lp: Tensor, c: Tensor, total_c: Tensor, num_classes: int, spec: LossSpec) -> None:
        self.lp, self.p, self.c, self.total_c, self.K, self.spec = lp, lp.exp(), c, total_c, num_classes, spec


def partial_sums(spec: LossSpec, r: ShardRow) -> Tensor:
    """(R, n): this rank's part of each per-row sum loss ``spec`` needs."""
    sums = []
    for base, _ in spec.terms:
        if _is_ratio(base):
            numerator, denominator = _ratio_terms(base, r)
            sums += [expectation(r.c, numerator), denominator.sum(1)]
        else:  # a sum of per-label terms: the reference's value on these columns is this rank's part
            sums.append(BASE_FUNCTIONS[base](r))
    return torch.stack(sums, 1)


def row_values(spec: LossSpec, sums: Tensor, total_c: Tensor) -> Tensor:
    """The rows' losses from the global sums (R, n)."""
    rows, k = 0, 0
    for base, weight in spec.terms:
        if _is_ratio(base):
            value = _ratio_value(base, sums[:, k], sums[:, k + 1], total_c)
            k += 2
        else:
            value = sums[:, k]
            k += 1
        rows = rows + weight * value
    return rows


# -- the fused C++ formulation --------------------------------------------------------------------
# apl::shard_sums gives each term's TermSums (apl_rowmath.h) over the shard's columns: weighted
# (Σ omega V), its derivative sum (Σ omega V'), plain (Σ V) and its derivative sum (Σ V'); plain is
# gathered for the ratio families, and for reverse and split terms when the targets' gradient is asked.
WEIGHTED, WEIGHTED_DERIVATIVE, PLAIN, PLAIN_DERIVATIVE = range(4)


def _op_arguments(spec: LossSpec, options: CallOptions, target_grad: bool) -> tuple:
    return contract.op_arguments(spec, options, contract.GRAD_IN_FORWARD, target_grad)


def fused_sums(spec: LossSpec, options: CallOptions, z: Tensor, target: Tensor, weight: Tensor | None,
               record: Tensor, counted: Tensor, num_classes: int, target_grad: bool) -> Tensor:
    """(R, 2n), or (R, 3n) with ``target_grad``: the partial sums, their ``∂/∂lse`` and ``∂/∂C``, as
    the PyTorch formulation lays them out (class_parallel._Problem.sums). ``target``: the rows' label
    columns on this shard (-1 elsewhere) or this shard's probabilities; ``record`` (R, 9) float64
    holds the rows' global max, log s and C (contract.RECORD)."""
    term_sums = torch.ops.apl.shard_sums(z, target, weight, record, counted, *_op_arguments(spec, options, target_grad),
                                         num_classes)
    sums, lse_derivatives, total_derivatives = [], [], []
    zero = term_sums.new_zeros(term_sums.shape[0])
    for t, (base, _) in enumerate(spec.terms):
        s = term_sums[:, t]
        if _is_ratio(base):
            sums += [s[:, WEIGHTED], s[:, PLAIN]]
            lse_derivatives += [-s[:, WEIGHTED_DERIVATIVE], -s[:, PLAIN_DERIVATIVE]]
            total_derivatives += [zero, zero]
        else:
            sums.append(s[:, WEIGHTED])
            lse_derivatives.append(-s[:, WEIGHTED_DERIVATIVE])
            total_derivatives.append(s[:, PLAIN] if BASE[base].family in ("reverse", "split") else zero)
    return torch.stack(sums + lse_derivatives + (total_derivatives if target_grad else []), 1)


def gradient_record(spec: LossSpec, record: Tensor, grad_sums: Tensor, grad_lse: Tensor,
                    grad_total: Tensor | None) -> Tensor:
    """``record`` with the rows' gradient coefficients (RowRecord's alpha_t, beta_t, H, G) from
    ``∂F/∂sums`` (R, n), ``∂F/∂lse`` and ``∂F/∂C``: a term's beta is ``∂F/∂N`` (of its one sum ``h``
    for a local, reverse or split term), its alpha ``∂F/∂D``, and ``H = -∂F/∂lse``
    (apl_rowmath.h: grad = Σ_t (alpha_t + beta_t omega_t) V'_t - p H)."""
    record = record.clone()
    alpha, beta = contract.RECORD.index("alpha0"), contract.RECORD.index("beta0")
    k = 0
    for t, (base, _) in enumerate(spec.terms):
        record[:, beta + 2 * t] = grad_sums[:, k]
        if _is_ratio(base):
            record[:, alpha + 2 * t] = grad_sums[:, k + 1]
        k += 2 if _is_ratio(base) else 1
    record[:, contract.RECORD.index("total_h")] = -grad_lse
    if grad_total is not None:
        record[:, contract.RECORD.index("target_g")] = grad_total
    return record


def fused_gradient(spec: LossSpec, options: CallOptions, z: Tensor, target: Tensor, weight: Tensor | None,
                   record: Tensor, counted: Tensor, num_classes: int, grad: Tensor,
                   target_grad: Tensor | None) -> None:
    """This shard's columns' gradient into ``grad`` (contiguous, the accumulation dtype; it may be
    ``z`` itself), and the probability targets' into ``target_grad`` unless it is None; ``record``
    from :func:`gradient_record`."""
    torch.ops.apl.shard_gradient(z, target, weight, record, counted,
                                 *_op_arguments(spec, options, target_grad is not None), num_classes, grad,
                                 target_grad)
