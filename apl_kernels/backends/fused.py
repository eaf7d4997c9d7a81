"""What every fused backend shares: the fused ops' autograd and vmap rules, and their registration.

The ops' contract (their arguments, outputs and fakes) is contract.py's.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import torch
from torch import Tensor

from ..catalogue import LossSpec
from ..options import CallOptions
from . import contract
from .contract import (
    GRAD_IN_BACKWARD, GRAD_IN_FORWARD, GRAD_MODE, IGNORE_INDEX, NO_GRAD, REDUCTION, REDUCTION_CODES, STATS,
    TARGET_GRAD, mean_divisor, op_arguments,
)


def _setup_context(ctx, inputs, output, saved_is_constant: bool = True) -> None:
    logits, target, weight, bases, coefficients, options = inputs
    # The library's own path (FusedFunction) keeps the saved output differentiable, so that a
    # second derivative taken through the first (which reads it) reaches _backward and is refused
    # there: marked constant, it would make every second derivative silently zero. The ops called
    # directly (opcheck, whose checks send a gradient into every differentiable output) mark it
    # constant. With materialized gradients off, no tensor of zeros is made for its upstream.
    if saved_is_constant:
        ctx.mark_non_differentiable(output[1])
    ctx.saved_is_constant = saved_is_constant
    ctx.set_materialize_grads(False)
    ctx.mode = options[GRAD_MODE]
    ctx.reduced = options[REDUCTION] != 0
    # With target_grad each gradient is the pair (2, R, K) of contract.gradient_output: each half
    # goes back in its input's dtype.
    ctx.dtypes = (logits.dtype, target.dtype) if options[TARGET_GRAD] else None
    if ctx.mode == GRAD_IN_BACKWARD:
        ctx.save_for_backward(logits, target, weight, output[1])
        ctx.arguments = (bases, coefficients, options)
    else:
        ctx.save_for_backward(output[1])


def in_transform() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running."""
    return torch._C._functorch.maybe_current_level() is not None


def traced(tensor: Tensor) -> bool:
    """Whether ``tensor`` is being traced (fake, functional, a dispatch mode, a torch.func
    transform): no value is real, and nothing may be done in place."""
    return (
        torch.compiler.is_compiling()  # first: Dynamo traces no further
        or type(tensor) is not Tensor  # fake and functional tensors are subclasses
        or torch._C._len_torch_dispatch_stack() != 0
        or in_transform()
    )


def released_after_this_backward(upstream: Tensor) -> bool:
    """Whether the graph's saved tensors are freed once this backward returns (no retain_graph):
    only then may backward hand out, or overwrite, the gradient it saved."""
    return not traced(upstream) and not torch._C._autograd._get_current_graph_task_keep_graph()


def is_exactly_one(upstream: Tensor) -> bool:
    """True for a CPU scalar equal to 1 (never reads GPU memory)."""
    return upstream.is_cpu and upstream.dim() == 0 and upstream.item() == 1.0


SECOND_DERIVATIVE = ("fused apl_kernels backends give first derivatives only: a derivative of their gradient "
                     "(double backward, hessian, jacrev of grad) needs backend='torch'")


def signature_kept(function_class: type) -> type:
    """Function.apply binds each call's arguments to ``forward``'s signature (for setup_context),
    and inspect.signature builds that anew on every call unless the function carries it as
    ``__signature__``: kept, a loss call at 128 x 10 takes about 15 us less (of 75). Binding costs
    per parameter too, so the hot ``forward`` takes ``*arguments`` (5 us more)."""
    function_class.forward.__signature__ = inspect.signature(function_class.forward)
    return function_class


@signature_kept
class FirstDerivativeOnly(torch.autograd.Function):
    """``apply(backward_op, *arguments)``: the ``<op>_backward`` call as a Function whose own
    derivative is refused, for a gradient that is being differentiated (create_graph=True, and
    torch.func's grad and vjp, which always differentiate so): a derivative of it, taken by an
    outer transform or a second backward, must see an error, not a constant."""

    generate_vmap_rule = True

    @staticmethod
    def forward(backward_op, *arguments):
        return backward_op(*arguments)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(SECOND_DERIVATIVE)


def refuse_gradients_of_saved(*grads_of_saved: Tensor | None) -> None:
    """A gradient reaching a saved output (a saved gradient or row statistics) comes from a
    derivative taken of the gradient that backward gave: refused. (AOT autograd sends zeros.)"""
    if any(g is not None for g in grads_of_saved) and not torch.compiler.is_compiling():
        raise NotImplementedError(SECOND_DERIVATIVE)


def gradient_is_differentiated() -> bool:
    """Whether the gradient backward is computing is itself being differentiated: grad mode is on
    in backward for create_graph=True and under torch.func's grad and vjp, which always
    differentiate so (not for torch.compile's trace of backward outside a transform). The gradient
    is then given, and a derivative of it refused when one is taken: through a saved output kept
    differentiable (:func:`refuse_gradients_of_saved`) or through :class:`FirstDerivativeOnly`."""
    return torch.is_grad_enabled() and (in_transform() or not torch.compiler.is_compiling())


def _gradients(ctx, grad: Tensor) -> tuple:
    """The op's gradient as the gradients of (logits, target, ...): the logits' only, or both halves
    of the pair (contract.gradient_output) in their inputs' dtypes."""
    if ctx.dtypes is None:
        return grad, None, None, None, None, None
    return grad[0].to(ctx.dtypes[0]), grad[1].to(ctx.dtypes[1]), None, None, None, None


def _backward(ctx, grad_loss: Tensor | None, grad_of_saved: Tensor | None):
    refuse_gradients_of_saved(grad_of_saved)
    if grad_loss is None:  # an undefined upstream gradient is zero: so is the logits' gradient
        return None, None, None, None, None, None
    # The ops called directly mark their saved output constant (_setup_context), so a derivative
    # could not be refused later: there create_graph=True is refused at once.
    differentiated = gradient_is_differentiated()
    if differentiated and ctx.saved_is_constant and not in_transform():
        raise RuntimeError(SECOND_DERIVATIVE)
    if ctx.mode == NO_GRAD:
        raise RuntimeError("the fused loss was computed without its gradient")
    if ctx.mode == GRAD_IN_BACKWARD:
        logits, target, weight, stats = ctx.saved_tensors
        arguments = (logits, target, weight, stats, grad_loss, *ctx.arguments)
        if differentiated:
            grad = FirstDerivativeOnly.apply(ctx.backward_op, *arguments)
        else:
            grad = ctx.backward_op(*arguments)
        return _gradients(ctx, grad)
    (saved_grad,) = ctx.saved_tensors
    released = released_after_this_backward(grad_loss)
    # Nothing reads a released saved gradient after this: hand it out, scaled in place if need be.
    # (With retain_graph=True a later backward of this graph reads it: never alias it then.)
    if released and ctx.reduced and is_exactly_one(grad_loss):
        return _gradients(ctx, saved_grad)  # (before the scale's .to(), a microsecond at 128 x 10)
    scale = grad_loss.to(saved_grad.dtype) if ctx.reduced else grad_loss.to(saved_grad.dtype)[:, None]
    return _gradients(ctx, saved_grad.mul_(scale) if released else saved_grad * scale)


@signature_kept
class FusedFunction(torch.autograd.Function):
    """The fused ops' autograd as a Function the torch.func transforms accept (the one that
    ``torch.library.register_autograd`` generates for the ops has no ``setup_context`` of its
    own): ``FusedFunction.apply(op, backward_op, logits, target, weight, bases, coefficients,
    options)``. Under ``vmap`` it runs the op batched through the ops' vmap rules."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*arguments):  # op, backward_op, then the op's arguments (see signature_kept)
        op, _, *op_arguments = arguments
        return op(*op_arguments)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs[2:], output, saved_is_constant=False)
        ctx.backward_op = inputs[1]

    @staticmethod
    def backward(ctx, grad_loss, grad_of_saved):
        return (None, None) + _backward(ctx, grad_loss, grad_of_saved)


# Dispatching below autograd has no public API (torch.library calls no kernel below autograd;
# op.redispatch takes a torch._C.DispatchKeySet): torch's private binding of C++'s
# at::AutoDispatchBelowAutograd guard, or, should a torch drop it, no guard: the op then goes through
# its autograd kernel, which hands the call on (grad mode is off in a Function's forward), the same
# result ~5 us slower at 128 x 10 (tests/test_api.py runs both).
below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


class EagerFunction(torch.autograd.Function):
    """FusedFunction for an eager call (no tracing, no torch.func transform: :func:`traced` is
    false), with the same forward, saved output and backward, less what only those need: an old-style
    Function (``forward(ctx, ...)``, no ``setup_context``), whose ``apply`` does not bind its
    arguments to a signature, and the op dispatched below autograd (inside a Function's forward, the
    op's own autograd kernel, Python from torch.library, would only hand it on). At 128 x 10 these
    took about half of a fused loss's forward plus backward (bench/results/small-cpu.md)."""

    @staticmethod
    def forward(ctx, op, backward_op, logits, target, weight, bases, coefficients, options):
        with below_autograd():
            output = op(logits, target, weight, bases, coefficients, options)
        _setup_context(ctx, (logits, target, weight, bases, coefficients, options), output, saved_is_constant=False)
        ctx.backward_op = backward_op
        return output

    backward = staticmethod(FusedFunction.backward)


# ---------------------------------------------------------------- vmap rules
# Under vmap the samples' rows are rows of one call: the batch is flattened into the rows, the op
# runs once with reduction "none", and each sample's reduction (and a mean's divisor, and the
# gradient's 1/divisor) is applied to its own rows.


def _batch_first(x: Tensor | None, dim: int | None, batch: int) -> Tensor | None:
    if x is None:
        return None
    return x.movedim(dim, 0) if dim is not None else x.expand(batch, *x.shape)


def _vmap_forward(op):
    def rule(info, in_dims, logits, target, weight, bases, coefficients, options):
        if in_dims[2] is not None:
            raise NotImplementedError("apl_kernels: vmap over class weights is not supported; batch the logits "
                                      "and targets, not the weight")
        batch = info.batch_size
        logits, target = _batch_first(logits, in_dims[0], batch), _batch_first(target, in_dims[1], batch)
        rows, classes = logits.shape[1:]
        flat_options = list(options)
        flat_options[REDUCTION] = REDUCTION_CODES["none"]
        flat_target = target.reshape(batch * rows, *target.shape[2:])
        loss, saved = op(logits.reshape(batch * rows, classes), flat_target, weight, bases, coefficients,
                         flat_options)
        loss = loss.view(batch, rows)
        divisor = mean_divisor(target, weight, options[IGNORE_INDEX], loss.dtype)  # each sample's (B,)
        if options[REDUCTION] != REDUCTION_CODES["none"]:
            loss = loss.sum(1)
            if options[REDUCTION] == REDUCTION_CODES["mean"]:
                loss = loss / divisor
        mode = options[GRAD_MODE]
        saved_dim = 0
        if mode == GRAD_IN_FORWARD:  # (B R, K), or the pair (2, B R, K) batched in its dim 1
            saved_dim = saved.dim() - 2
            saved = saved.view(*saved.shape[:-2], batch, rows, classes)
            if options[REDUCTION] == REDUCTION_CODES["mean"]:
                saved = saved / divisor.to(saved.dtype)[:, None, None]
        elif mode == GRAD_IN_BACKWARD:  # each sample's rows, then a record holding its divisor
            record = torch.zeros(batch, 1, STATS, dtype=saved.dtype, device=saved.device)
            record[:, 0, 0] = divisor
            saved = torch.cat([saved[:-1].view(batch, rows, STATS), record], dim=1)
        return (loss, saved), (0, saved_dim if mode != NO_GRAD else None)

    return rule


def _vmap_backward(backward_op):
    def rule(info, in_dims, logits, target, weight, stats, grad_loss, bases, coefficients, options):
        batch = info.batch_size
        logits, target = _batch_first(logits, in_dims[0], batch), _batch_first(target, in_dims[1], batch)
        stats, grad_loss = _batch_first(stats, in_dims[3], batch), _batch_first(grad_loss, in_dims[4], batch)
        rows, classes = logits.shape[1:]
        # Each row's upstream gradient: its own (reduction "none"), or its sample's, divided by the
        # sample's divisor for a mean.
        if options[REDUCTION] != REDUCTION_CODES["none"]:
            if options[REDUCTION] == REDUCTION_CODES["mean"]:
                grad_loss = grad_loss / stats[:, -1, 0].to(grad_loss.dtype)
            grad_loss = grad_loss[:, None].expand(batch, rows)
        flat_options = list(options)
        flat_options[REDUCTION] = REDUCTION_CODES["none"]
        # The flat call's divisor is 1: each sample's own was applied to grad_loss above.
        unit_divisor = torch.eye(1, STATS, dtype=stats.dtype, device=stats.device)
        flat_stats = torch.cat([stats[:, :-1].reshape(batch * rows, STATS), unit_divisor], dim=0)
        grad = backward_op(logits.reshape(batch * rows, classes), target.reshape(batch * rows, *target.shape[2:]),
                           weight, flat_stats, grad_loss.reshape(batch * rows), bases, coefficients, flat_options)
        return grad.view(*grad.shape[:-2], batch, rows, classes), grad.dim() - 2  # the pair: batched in dim 1

    return rule


BACKWARD_OPS: dict = {}  # each registered fused op's <op>_backward (or None)


def _op(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def register(qualname: str, backward_qualname: str | None = None, fake: bool = True) -> None:
    """Give fused op ``qualname`` its autograd, vmap rules (and fakes, unless the ops bring their
    own); ``backward_qualname`` is its ``<op>_backward`` if it has one (GRAD_IN_BACKWARD)."""
    if fake:
        torch.library.register_fake(qualname)(contract.fake)
        if backward_qualname:
            torch.library.register_fake(backward_qualname)(contract.fake_backward)
    backward_op = _op(backward_qualname) if backward_qualname else None
    BACKWARD_OPS[_op(qualname)] = backward_op

    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.backward_op = backward_op

    torch.library.register_autograd(qualname, _backward, setup_context=setup_context)
    torch.library.register_vmap(qualname, _vmap_forward(_op(qualname)))
    if backward_qualname:
        torch.library.register_vmap(backward_qualname, _vmap_backward(backward_op))


def refuse_weight_gradient(weight: Tensor | None, where: str = "backends give") -> None:
    """The fused ops differentiate the logits and the probability targets, not the class weights: a
    ``weight`` that asks for a gradient gets an error, not a gradient of None that reads as "no
    dependence" (evaluation under no_grad asks for none)."""
    if torch.is_grad_enabled() and weight is not None and weight.requires_grad:
        raise ValueError(f"fused apl_kernels {where} no gradient of the class weights: detach them, or use "
                         f"backend='torch'")


def backend_function(op: Callable, grad_mode: int, inplace_op: Callable | None = None) -> Callable:
    """The backend function ``(logits, target, weight, spec, options) -> loss`` of registered op
    ``op``; its gradient is computed in forward or backward (by its ``<op>_backward``) as
    ``grad_mode`` says, probability targets' too when they require grad. ``inplace_op``, if the
    backend has one, is ``op`` in ``GRAD_IN_FORWARD`` mode writing the logits' gradient over its
    (contiguous) logits and returning the loss alone."""
    backward_op = BACKWARD_OPS[op]

    def fused_loss(logits: Tensor, target: Tensor, weight: Tensor | None, spec: LossSpec,
                   options: CallOptions) -> Tensor:
        refuse_weight_gradient(weight)
        # Probability targets that require grad get theirs from the same pass (target_grad).
        target_grad = torch.is_grad_enabled() and target.requires_grad
        wants_grad = torch.is_grad_enabled() and (logits.requires_grad or target_grad)
        arguments = op_arguments(spec, options, grad_mode if wants_grad else NO_GRAD, target_grad)
        function = FusedFunction if traced(logits) else EagerFunction
        loss, _ = function.apply(op, backward_op, logits, target, weight, *arguments)
        return loss

    fused_loss.op = op  # for callers that drive the op themselves (the fused linear + loss)
    fused_loss.inplace_op = inplace_op
    return fused_loss
