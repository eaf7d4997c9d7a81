"""The options every loss call takes (one home for their defaults), and the checks of its inputs.

The options are ``torch.nn.CrossEntropyLoss``'s: ``weight``, ``reduction``, ``ignore_index``,
``label_smoothing``, plus ``backend``. Checks here read no tensor data (no host synchronization);
the label range check, which must read the labels, is :func:`check_target_range`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .catalogue import check_ignore_index, check_number

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACCUMULATION_DTYPES = (torch.float32, torch.float64)  # those that accumulation_dtype keeps


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss is computed and returned in for inputs of ``dtype``: float64 for float64,
    float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class CallOptions:
    """How a loss is applied (not which loss): the same meaning as in ``nn.CrossEntropyLoss``."""

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {self.reduction!r}")
        check_ignore_index(self.ignore_index)
        object.__setattr__(self, "label_smoothing", check_number("label_smoothing", self.label_smoothing, 0.0, 1.0))
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a string, got {self.backend!r}")


DEFAULTS = CallOptions()


def check_weight(weight: Tensor | None, input: Tensor | None = None) -> None:
    """A class-weight tensor: 1-D floating, K entries, on the input's device (when given)."""
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a tensor of class weights or None, got {type(weight).__name__}")
    if weight.dim() != 1 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 1-D floating tensor of class weights; got {weight.dtype} of "
                         f"shape {tuple(weight.shape)}")
    if input is not None:
        if weight.shape[0] != input.shape[1]:
            raise ValueError(f"weight has {weight.shape[0]} entries but the input has K = {input.shape[1]} "
                             f"classes: give one weight per class")
        if weight.device != input.device:
            raise ValueError(f"weight is on {weight.device} but the input is on {input.device}: move it with "
                             f".to(input.device) (a loss module's weight moves with module.to())")


def check_inputs(input: Tensor, target: Tensor, weight: Tensor | None = None) -> None:
    """Shape, dtype and device checks every backend relies on (no data is read)."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"input and target must be tensors, got {type(input).__name__} and {type(target).__name__}"
        )
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input (logits) must be float16, bfloat16, float32 or float64; got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"input must have shape (N, K) or (N, K, d1, ...); got shape {tuple(input.shape)}")
    if input.size(1) < 2:
        raise ValueError(f"the number of classes K = input.shape[1] must be >= 2; got {input.shape[1]}")
    if target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices or class probabilities; got {target.dtype}")
    # (N, K) logits and N labels, the common case, is told without making shapes (slicing and joining
    # torch.Size objects took ~1 us of a call at 128 x 10).
    if not (input.dim() == 2 and target.dim() == 1 and not target.is_floating_point()
            and target.size(0) == input.size(0)):
        check_target_shape(input, target)
    if input.device != target.device:
        raise ValueError(f"input is on {input.device} but target is on {target.device}")
    check_weight(weight, input)


def check_target_shape(input: Tensor, target: Tensor) -> None:
    """Targets of the input's shape (class probabilities, floating) or of its shape less dim 1
    (class indices)."""
    shape = input.shape
    index_shape = shape[:1] + shape[2:]  # (torch.Size compares with tuples)
    if target.is_floating_point():
        if target.shape != shape:
            hint = (" (class indices must be an integer tensor: use target.long())"
                    if tuple(target.shape) == index_shape else "")
            raise ValueError(f"probability targets must have the input's shape {tuple(input.shape)}; got "
                             f"{tuple(target.shape)}{hint}")
    elif target.shape == shape:
        raise TypeError(f"target has the input's shape {tuple(input.shape)}, as class probabilities do, but "
                        f"is {target.dtype}: probability targets must be floating point (use "
                        f"target.to(input.dtype)); class indices have shape {tuple(index_shape)}")
    elif target.shape != index_shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}: "
                         f"expected {tuple(index_shape)} (class indices) or {tuple(input.shape)} (class probabilities)")


def check_target_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise if a label outside [0, K) is not ``ignore_index`` (reads the labels: a sync on GPUs).
    Under ``torch.func.vmap`` the labels of every sample are checked at once, on the batched
    tensor's storage (a data-dependent check of the per-sample view is not allowed there)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(target):
        target = torch._C._functorch.get_unwrapped(target)
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target {int(target[position])} at flat position {position} is outside [0, {num_classes}) "
            f"and is not ignore_index ({ignore_index})"
        )
