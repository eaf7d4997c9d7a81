"""Functional forms: ``apl_kernels.functional.nce_mae(logits, target, alpha, beta)``.

Every function takes ``(input, target, *params, reduction="mean",
ignore_index=-100, backend="auto", **params)`` like
``torch.nn.functional.cross_entropy``: input ``(N, K)`` or ``(N, K, d1, ...)``,
integer target ``(N)`` or ``(N, d1, ...)``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from . import backends
from .catalogue import LossSpec, accepted_params, available_losses, canonical_name, make_spec

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_options(reduction: str, ignore_index: int) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def check_inputs(input: Tensor, target: Tensor) -> None:
    """Shape, dtype and device checks every backend relies on (no data is read)."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"input and target must be tensors, got {type(input).__name__} and {type(target).__name__}"
        )
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"input (logits) must be float16, bfloat16, float32 or float64; got {input.dtype}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices; got {target.dtype}")
    if input.dim() < 2:
        raise ValueError(
            f"input must have shape (N, K) or (N, K, d1, ...); got shape {tuple(input.shape)}"
        )
    if input.shape[1] < 2:
        raise ValueError(f"the number of classes K = input.shape[1] must be >= 2; got {input.shape[1]}")
    expected = (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}: "
            f"expected {expected}"
        )
    if input.device != target.device:
        raise ValueError(f"input is on {input.device} but target is on {target.device}")


def check_target_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise if a label outside [0, K) is not ``ignore_index`` (reads the labels: a sync on GPUs)."""
    if torch.compiler.is_compiling():
        return  # compiled code bounds-checks its own gather
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target {int(target[position])} at flat position {position} is outside [0, {num_classes}) "
            f"and is not ignore_index ({ignore_index})"
        )


def compute(
    spec: LossSpec,
    input: Tensor,
    target: Tensor,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
) -> Tensor:
    """The loss ``spec`` of ``input`` against ``target``; the one path every public form takes."""
    check_options(reduction, ignore_index)
    check_inputs(input, target)
    chosen = backends.resolve(backend, input.device.type)
    num_classes = input.shape[1]
    spatial = input.dim() > 2
    # (N, K, d1, ...) -> rows of K classes. 2-D input passes as it is, whatever its strides.
    logits = input.movedim(1, -1).reshape(-1, num_classes) if spatial else input
    labels = (target.reshape(-1) if spatial else target).long()
    # Labels are checked here for the reference (a synchronization on GPUs) and wherever it is
    # free (CPU tensors); the C++ CPU kernel checks them itself, raising the same ValueError.
    # Fused GPU kernels give a row with such a label a NaN loss instead (README).
    if chosen.name == "torch" or (labels.device.type == "cpu" and chosen.name != "cpp"):
        check_target_range(labels, num_classes, ignore_index)
    loss = chosen.load()(logits, labels, spec, reduction, ignore_index)
    return loss.reshape(target.shape) if spatial and reduction == "none" else loss


def _bind(name: str, args: tuple, kwargs: dict) -> dict:
    """Positional parameters in the order of :func:`accepted_params`, merged with keywords."""
    order = list(accepted_params(name))
    if len(args) > len(order):
        raise TypeError(f"loss {name!r} takes at most {len(order)} parameters ({', '.join(order)}); got {len(args)}")
    params = dict(zip(order, args))
    twice = set(params) & set(kwargs)
    if twice:
        raise TypeError(f"loss {name!r} got multiple values for {', '.join(sorted(twice))}")
    return {**params, **kwargs}


def apl_loss(
    input: Tensor,
    target: Tensor,
    name: str,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
    **params,
) -> Tensor:
    """Any catalogue loss by name: ``apl_loss(logits, target, "nce+mae", alpha=1.0, beta=1.0)``."""
    return compute(make_spec(name, **params), input, target, reduction, ignore_index, backend)


def signature_of(name: str, leading: list[inspect.Parameter]) -> inspect.Signature:
    """The signature of a public form of loss ``name``: ``leading``, its parameters, the options."""
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
        for p, d in accepted_params(name).items()
    ]
    options = [
        inspect.Parameter("reduction", kw, default="mean"),
        inspect.Parameter("ignore_index", kw, default=-100),
        inspect.Parameter("backend", kw, default="auto"),
    ]
    return inspect.Signature(leading + params + options)


def function_name(name: str) -> str:
    return canonical_name(name).replace("+", "_")


def _make_function(name: str):
    def loss_function(input, target, *args, reduction="mean", ignore_index=-100, backend="auto", **kwargs):
        spec = make_spec(name, **_bind(name, args, kwargs))
        return compute(spec, input, target, reduction, ignore_index, backend)

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    loss_function.__name__ = loss_function.__qualname__ = function_name(name)
    loss_function.__signature__ = signature_of(
        name, [inspect.Parameter("input", positional), inspect.Parameter("target", positional)]
    )
    loss_function.__doc__ = f"The {name!r} loss (formulas in the README's loss table); see apl_kernels.functional."
    return loss_function


for _name in available_losses():
    globals()[function_name(_name)] = _make_function(_name)

__all__ = ["apl_loss", "compute"] + [function_name(n) for n in available_losses()]
