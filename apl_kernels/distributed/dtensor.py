"""DTensor logits sharded on the class dimension: the ordinary loss functions and modules run the
explicit class-parallel form (class_parallel.py) on each rank's shard."""

from __future__ import annotations

import sys

from torch import Tensor

from ..catalogue import LossSpec
from ..options import CallOptions
from .class_parallel import run_loss


def is_dtensor(x) -> bool:
    """Whether ``x`` is a DTensor (without importing torch.distributed.tensor where no one has)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _local(x):
    """A replicated DTensor's local tensor (a plain tensor as it is)."""
    if is_dtensor(x):
        if not all(p.is_replicate() for p in x.placements):
            raise ValueError(f"a target or weight given as a DTensor must be replicated; got {x.placements}")
        return x.to_local()
    return x


def dtensor_loss(spec: LossSpec, input, target, weight, options: CallOptions) -> Tensor:
    """The ordinary loss functions' and modules' path for DTensor logits sharded on the class
    dimension (``Shard(1)``, or ``Shard(-1)`` of (N, K) logits) over a 1-D device mesh: the
    explicit form on the local shard. Returns the loss as a plain tensor, the same on every rank."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    explicit = ("use apl_kernels.distributed.class_parallel_loss(logits.to_local(), target, name, class_offset=..., "
                "num_classes=...) on each rank's shard")
    mesh, placements = input.device_mesh, input.placements
    class_dim = 1 if input.dim() > 1 else None
    sharded = [p.is_shard() and (p.dim % input.dim()) == class_dim for p in placements]
    if mesh.ndim != 1 or not all(sharded):
        raise ValueError(f"DTensor logits are accepted sharded on the class dimension (Shard(1)) over a 1-D mesh; "
                         f"got placements {placements} on a {mesh.ndim}-D mesh: {explicit}")
    shape, offsets = compute_local_shape_and_global_offset(input.shape, mesh, placements)
    class_offset, local_classes, num_classes = offsets[1], shape[1], input.shape[1]
    if is_dtensor(target) and not all(p.is_replicate() for p in target.placements):
        target = target.to_local()  # probabilities sharded as the logits are
    else:
        target = _local(target)
        if isinstance(target, Tensor) and target.is_floating_point() and target.dim() > 1 \
                and target.shape[1] == num_classes:
            target = target.narrow(1, class_offset, local_classes)  # global probabilities: this rank's columns
    weight = _local(weight)
    if weight is not None:
        if weight.shape[0] != num_classes:
            raise ValueError(f"weight must have one entry per class ({num_classes}); got {weight.shape[0]}")
        weight = weight.narrow(0, class_offset, local_classes)
    return run_loss(spec, options, input.to_local(), target, class_offset=class_offset, num_classes=num_classes,
                     group=mesh.get_group(), weight=weight)
