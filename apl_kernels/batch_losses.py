"""Losses of a whole batch, not of each row: ANL-CE-ER, the Active Negative Loss with NCE and a
batch entropy term (Ye et al., NeurIPS 2023, ``ANL_CE_ER`` of the official ``loss.py``).

    L = α · NCE + β · NNCE' + λ · (ln K + Σ_c q̄[c] ln q̄[c])

* ``NCE = ln p[y] / Σ_k ln p[k]`` per row, averaged over the batch;
* ``NNCE' = 1 − V[y] / Σ_k V[k]``, ``V = −ln m + ln clamp(p, m, 1 − m)``: the catalogue's ``nnce``
  but for the upper clamp ``1 − m``, as the official ER class writes it;
* ``q̄ = clamp(Σ_i p̃_i / Σ_{i,c} p̃[i, c], m, 1 − m)``, ``p̃ = clamp(p, m, 1 − m)``: the batch's mean
  prediction; the term is ``ln K`` minus its entropy, 0 when the batch predicts every class
  equally often. It is a function of the whole batch, so there is no per-row loss:
  ``reduction="none"`` is refused, and ``"sum"`` is the batch size times the loss.

Every clamp passes no gradient where active (torch's ``clamp``), as in the official code; the
values and gradients match its formulas (tests/test_batch_losses.py, the spec's anchors).

Under DistributedDataParallel each rank holds part of the batch. The official code trains on one
process (one GPU, or ``nn.DataParallel``, which gathers the outputs on one device before the loss),
so its q̄ is over the whole batch. ``sync=True`` reproduces that on several processes: the column
sums of p̃ are all-reduced (differentiably: the backward all-reduces their gradient) and q̄ is the
global batch's; with DDP's average of the gradients the result is the gradient of the global loss
(for equal per-rank batches). ``sync=False`` gives each rank its own batch's q̄ (another loss).
The ANL L1 term ``δ · Σ|θ|`` stays the trainer's, as for ANL-CE.

Computed with torch operations (autograd) on any device and dtype; ``backend`` is accepted for
the interface of the other losses and does not change the computation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check(input: Tensor, target: Tensor, min_prob: float, reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"anl-ce-er has no reduction={reduction!r}: its entropy term is of the whole batch, "
                         f"not of each row; use 'mean' (or 'sum', the batch size times the mean)")
    if input.dim() != 2 or target.dim() != 1 or target.shape[0] != input.shape[0] or target.is_floating_point():
        raise ValueError(f"anl-ce-er takes logits (N, K) and class indices (N); got {tuple(input.shape)} and "
                         f"{tuple(target.shape)} {target.dtype}")
    if not 0.0 < min_prob < 0.5:
        raise ValueError(f"anl-ce-er min_prob must be in (0, 0.5) (the clamp [m, 1 - m] must not be empty); "
                         f"got {min_prob}")
    if input.shape[0] == 0:
        raise ValueError("anl-ce-er needs a batch of at least one row (its entropy term is of the batch)")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= input.shape[1]):
        raise ValueError(f"anl-ce-er target out of range: class indices must be in [0, {input.shape[1]}) "
                         f"(ignore_index is not supported)")


def entropy_term(probabilities: Tensor, min_prob: float, sync: bool = False, group=None) -> Tensor:
    """``ln K + Σ_c q̄[c] ln q̄[c]`` of the batch's clamped probabilities (N, K); with ``sync``, of
    the global batch of ``group`` (all ranks must call it)."""
    clamped = probabilities.clamp(min_prob, 1 - min_prob)
    columns = clamped.sum(dim=0)
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.nn.functional import all_reduce

        columns = all_reduce(columns, group=group or torch.distributed.group.WORLD)
    mean_prediction = (columns / columns.sum()).clamp(min_prob, 1 - min_prob)
    return math.log(probabilities.shape[1]) + (mean_prediction * mean_prediction.log()).sum()


def anl_ce_er(input: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 1.0, lamb: float = 1.0,
              min_prob: float = 1e-7, reduction: str = "mean", sync: bool = False, group=None) -> Tensor:
    """ANL-CE-ER of logits ``input`` (N, K) and class indices ``target`` (N) (module docstring)."""
    _check(input, target, min_prob, reduction)
    z = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    log_p = F.log_softmax(z, dim=1)
    picked = target[:, None].long()
    nce = (log_p.gather(1, picked).squeeze(1) / log_p.sum(dim=1)).mean()
    p = log_p.exp()
    v = p.clamp(min_prob, 1 - min_prob).log() - math.log(min_prob)
    nnce = (1 - v.gather(1, picked).squeeze(1) / v.sum(dim=1)).mean()
    loss = alpha * nce + beta * nnce + lamb * entropy_term(p, min_prob, sync, group)
    loss = loss * target.shape[0] if reduction == "sum" else loss
    return loss.to(input.dtype)


class ANLCEER(nn.Module):
    """ANL-CE-ER as a module: ``ANLCEER(alpha=5.0, beta=5.0, lamb=2.0)`` (see :func:`anl_ce_er`)."""

    batch_loss = True  # not a per-row loss: no reduction="none", no ignore_index
    loss_name = "anl-ce-er"

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, lamb: float = 1.0, min_prob: float = 1e-7,
                 reduction: str = "mean", sync: bool = False, group=None, backend: str = "auto") -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("beta", beta), ("lamb", lamb)):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"anl-ce-er {name} must be a finite number, got {value!r}")
        _check(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), min_prob, reduction)
        self.alpha, self.beta, self.lamb, self.min_prob = float(alpha), float(beta), float(lamb), float(min_prob)
        self.reduction, self.sync, self.group, self.backend = reduction, sync, group, backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return anl_ce_er(input, target, self.alpha, self.beta, self.lamb, self.min_prob, self.reduction,
                         self.sync, self.group)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, lamb={self.lamb}, min_prob={self.min_prob}"
                + (f", reduction={self.reduction!r}" if self.reduction != "mean" else "")
                + (", sync=True" if self.sync else ""))


DEFAULTS = {"alpha": 1.0, "beta": 1.0, "lamb": 1.0, "min_prob": 1e-7}
BATCH_LOSSES = {"anl-ce-er": ANLCEER}


def batch_loss_name(name: object) -> str | None:
    """The batch loss ``name`` names (case and spaces ignored), or ``None``."""
    key = name.strip().lower().replace(" ", "").replace("_", "-") if isinstance(name, str) else None
    return key if key in BATCH_LOSSES else None
