"""The exact mean of a loss over the global batch of a process group (DistributedDataParallel).

Under DDP each rank computes its loss on its part of the batch and the gradients are averaged
over the ``W`` ranks. With ``reduction="mean"`` on every rank that is

    (1/W) Σ_r S_r / D_r          (S_r: the rank's sum of losses, D_r: what its mean divides by)

which is the global mean ``Σ_r S_r / Σ_r D_r`` only when every ``D_r`` is the same. It is not
where the divisor depends on the data: ``ignore_index`` rows (D_r counts the rows kept) or class
weights (D_r = Σ w[y] over the rows kept). The exact form needs one all-reduce of the divisors:

    share_r = W · S_r / D,   D = Σ_r D_r    (D detached: it is a count, not a function of θ)

DDP's average of the shares' gradients is then ``(1/W) Σ_r W ∇S_r / D = ∇(Σ_r S_r / D)``, the
gradient of the global mean, and the average of the shares' values is the global mean itself
(:func:`average`). With one process (no process group) the share is the ordinary mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def mean_divisor(target: Tensor, weight: Tensor | None = None, ignore_index: int = -100,
                 num_classes: int | None = None) -> Tensor:
    """What ``reduction="mean"`` divides by on this rank's batch, torch's rules (docs/losses.md):
    for class indices the number of elements not ``ignore_index`` (with ``weight``, the sum of
    their classes' weights); for probability targets (floating, classes in dimension 1) the number
    of rows. Float64, on the target's device."""
    if target.is_floating_point():
        classes = num_classes or target.shape[1]
        return torch.tensor(target.numel() / classes, dtype=torch.float64, device=target.device)
    keep = target != ignore_index
    if weight is None:
        return keep.sum().to(torch.float64)
    picked = weight.to(torch.float64)[target.masked_fill(~keep, 0)]
    return torch.where(keep, picked, torch.zeros_like(picked)).sum()


def global_divisor(local_divisor: Tensor, group=None) -> Tensor:
    """``Σ_r D_r`` over ``group`` (one all-reduce; the local divisor alone without a group)."""
    total = local_divisor.detach().to(torch.float64).clone()
    if _group_size(group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def global_mean(local_sum: Tensor, local_divisor: Tensor, group=None, gradient_average: bool = True) -> Tensor:
    """This rank's share of the exact global mean ``Σ_r S_r / Σ_r D_r`` (module docstring).

    ``local_sum``: the rank's loss with ``reduction="sum"``; ``local_divisor``: its
    :func:`mean_divisor`. ``gradient_average`` (DDP's behaviour): the share is scaled by the group
    size so that the averaged gradients are the global mean's; without it (gradients summed over
    ranks, e.g. a manual all-reduce SUM) the share is ``S_r / D``. A divisor of 0 (every row of
    every rank ignored) gives 0 with zero gradient, as the library's ``mean`` does.
    """
    total = global_divisor(local_divisor, group)
    scale = _group_size(group) if gradient_average else 1
    safe = torch.where(total > 0, total, torch.ones_like(total))
    share = local_sum * (scale / safe).to(local_sum.dtype)
    return torch.where(total > 0, share, torch.zeros_like(share))


def average(value: Tensor, group=None) -> Tensor:
    """The mean over ``group`` of a detached per-rank value (e.g. the shares: the global mean)."""
    total = value.detach().clone()
    size = _group_size(group)
    if size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total / size


class GlobalMeanLoss(nn.Module):
    """A loss whose ``mean`` is over the global batch of ``group``: wraps ``criterion_sum``, a loss
    module with ``reduction="sum"`` (any apl_kernels loss or ``nn.CrossEntropyLoss``), and takes its
    ``weight`` and ``ignore_index`` for the divisor::

        criterion = GlobalMeanLoss(apl_kernels.NCERCE(50.0, 0.1, reduction="sum", ignore_index=-1))
        loss = criterion(ddp_model(x), y)       # this rank's share
        loss.backward()                         # DDP averages: the global mean's gradient
        logged = global_mean.average(loss)      # the global mean's value (one more all-reduce)
    """

    def __init__(self, criterion_sum: nn.Module, group=None, gradient_average: bool = True) -> None:
        super().__init__()
        if getattr(criterion_sum, "reduction", "sum") != "sum":
            raise ValueError(f"GlobalMeanLoss needs the loss with reduction='sum' (it divides by the global "
                             f"divisor itself); got reduction={criterion_sum.reduction!r}")
        self.criterion_sum = criterion_sum
        self.group = group
        self.gradient_average = gradient_average

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        divisor = mean_divisor(target, getattr(self.criterion_sum, "weight", None),
                               getattr(self.criterion_sum, "ignore_index", -100), input.shape[1])
        return global_mean(self.criterion_sum(input, target), divisor, self.group, self.gradient_average)
