"""What every fused backend shares: the op's contract, its autograd and its fake.

A fused op reads each row of logits once and returns the reduced loss and
``d loss / d logits`` for an upstream gradient of 1::

    apl::<op>(Tensor logits, Tensor target, int[] bases, float[] coefficients,
              int[] options) -> (Tensor loss, Tensor grad)

* ``logits`` (R, K) with any strides, float16/bfloat16/float32/float64;
  ``target`` (R,) int64.
* ``bases``: the LossSpec's base losses (indices of ``catalogue.BASE_LOSSES``);
  ``coefficients``: one weight per base, then ``gamma``, then ``q``;
  ``options``: ``ignore_index``, the reduction's code (0 none, 1 mean, 2 sum),
  ``official_grad`` and ``compute_grad`` (0 or 1). :func:`op_arguments` makes
  them. (Three lists rather than ten arguments: torch.library's autograd wrapper
  spends time per argument on every call, which dominates small batches.)
* ``loss``: float32 (float64 for float64 logits), shape () for ``mean``/``sum``
  and (R,) for ``none``; ignored rows count 0.
* ``grad``: (R, K) contiguous, in the logits' dtype, already divided by the
  number of non-ignored rows for ``mean``; empty when ``compute_grad`` is 0.

Backward only scales the saved ``grad`` by the upstream gradient: nothing else
is saved. When the upstream gradient of a reduced loss is exactly 1 (a plain
``loss.backward()``), eager CPU code returns the saved gradient itself and
moves no memory at all.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..catalogue import LossSpec
from ..reference import accumulation_dtype

REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
# Positions in the op's `options` list.
IGNORE_INDEX, REDUCTION, OFFICIAL_GRAD, COMPUTE_GRAD = range(4)


def op_arguments(spec: LossSpec, reduction: str, ignore_index: int, compute_grad: bool) -> tuple:
    """The op's ``bases, coefficients, options`` for ``spec`` and the call's options."""
    return (
        spec.base_indices,
        spec.weights + (spec.gamma, spec.q),
        (ignore_index, REDUCTION_CODES[reduction], int(spec.official_grad), int(compute_grad)),
    )


def _fake(logits, target, bases, coefficients, options):
    rows, classes = logits.shape
    loss = logits.new_empty((rows,) if options[REDUCTION] == 0 else (), dtype=accumulation_dtype(logits.dtype))
    grad = logits.new_empty((rows, classes) if options[COMPUTE_GRAD] else (0,))
    return loss, grad


def _setup_context(ctx, inputs, output) -> None:
    # The gradient output is a constant for autograd: no (N, K) tensor of zeros is made
    # for its upstream gradient in backward.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    options = inputs[4]
    ctx.reduced = options[REDUCTION] != 0
    ctx.computed_grad = bool(options[COMPUTE_GRAD])


def _is_exactly_one(upstream: Tensor) -> bool:
    """True for a real (not fake, not traced) CPU scalar equal to 1; never reads GPU memory."""
    return (
        type(upstream) is Tensor  # fake and functional tensors are subclasses
        and torch._C._len_torch_dispatch_stack() == 0  # no tracing mode would bake its value in
        and upstream.is_cpu
        and upstream.dim() == 0
        and not torch.compiler.is_compiling()
        and upstream.item() == 1.0
    )


def _backward(ctx, grad_loss: Tensor, _grad_of_grad: Tensor):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fused apl_kernels backends do not support double backward (create_graph=True); "
            "use backend='torch'"
        )
    (grad,) = ctx.saved_tensors
    if not ctx.computed_grad:
        raise RuntimeError("the fused loss was computed without its gradient (compute_grad=False)")
    if ctx.reduced:
        grad_logits = grad if _is_exactly_one(grad_loss) else grad * grad_loss.to(grad.dtype)
    else:
        grad_logits = grad * grad_loss.to(grad.dtype)[:, None]
    return grad_logits, None, None, None, None


def register(qualname: str, fake: bool = True) -> None:
    """Give fused op ``qualname`` its autograd (and its fake, unless the op brings one)."""
    if fake:
        torch.library.register_fake(qualname)(_fake)
    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)


def backend_function(op: Callable) -> Callable:
    """The backend function ``(logits, target, spec, reduction, ignore_index) -> loss`` of ``op``."""

    def fused_loss(logits: Tensor, target: Tensor, spec: LossSpec, reduction: str, ignore_index: int) -> Tensor:
        compute_grad = logits.requires_grad and torch.is_grad_enabled()
        loss, _ = op(logits, target, *op_arguments(spec, reduction, ignore_index, compute_grad))
        return loss if loss.dtype == logits.dtype else loss.to(logits.dtype)

    return fused_loss
