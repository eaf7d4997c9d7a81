"""What every fused backend shares: the op's contract, its autograd and its fake.

A fused op reads each row of logits once and returns the reduced loss and
``d loss / d logits`` for an upstream gradient of 1::

    apl::<op>(Tensor logits, Tensor target, int[] bases, float[] weights,
              float gamma, float q, bool official_grad, int ignore_index,
              int reduction, bool compute_grad) -> (Tensor loss, Tensor grad)

* ``logits`` (R, K) with any strides, float16/bfloat16/float32/float64;
  ``target`` (R,) int64; ``bases``/``weights``: the LossSpec's terms (base
  indices of ``catalogue.BASE_LOSSES``).
* ``loss``: float32 (float64 for float64 logits), shape () for ``mean``/``sum``
  (codes 1/2) and (R,) for ``none`` (code 0); ignored rows count 0.
* ``grad``: (R, K) contiguous, in the logits' dtype, already divided by the
  number of non-ignored rows for ``mean``; empty when ``compute_grad`` is false.

Backward only scales the saved ``grad`` by the upstream gradient: nothing else
is saved. When the upstream gradient of a reduced loss is exactly 1 (a plain
``loss.backward()``), eager CPU code returns the saved gradient itself and
moves no memory at all.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .catalogue import LossSpec
from .reference import accumulation_dtype

REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}


def _fake(logits, target, bases, weights, gamma, q, official_grad, ignore_index, reduction, compute_grad):
    rows, classes = logits.shape
    loss = logits.new_empty(() if reduction else (rows,), dtype=accumulation_dtype(logits.dtype))
    grad = logits.new_empty((rows, classes) if compute_grad else (0,))
    return loss, grad


def _setup_context(ctx, inputs, output) -> None:
    # The gradient output is a constant for autograd: no (N, K) tensor of zeros is made
    # for its upstream gradient in backward.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    ctx.reduced = inputs[8] != REDUCTION_CODES["none"]
    ctx.computed_grad = inputs[9]


def _is_exactly_one(upstream: Tensor) -> bool:
    """True for a real (not traced) CPU scalar equal to 1; never reads GPU memory."""
    if upstream.device.type != "cpu" or upstream.dim() != 0 or torch.compiler.is_compiling():
        return False
    return not torch._subclasses.fake_tensor.is_fake(upstream) and upstream.item() == 1.0


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
    return grad_logits, None, None, None, None, None, None, None, None, None


def register(qualname: str, fake: bool = True) -> None:
    """Give fused op ``qualname`` its autograd (and its fake, unless the op brings one)."""
    if fake:
        torch.library.register_fake(qualname)(_fake)
    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)


def backend_function(op: Callable) -> Callable:
    """The backend function ``(logits, target, spec, reduction, ignore_index) -> loss`` of ``op``."""

    def fused_loss(logits: Tensor, target: Tensor, spec: LossSpec, reduction: str, ignore_index: int) -> Tensor:
        compute_grad = torch.is_grad_enabled() and logits.requires_grad
        loss, _ = op(
            logits, target, spec.base_indices, spec.weights, spec.gamma, spec.q, spec.official_grad,
            ignore_index, REDUCTION_CODES[reduction], compute_grad,
        )
        return loss.to(logits.dtype)

    return fused_loss
