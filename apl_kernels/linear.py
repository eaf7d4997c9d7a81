"""The fused linear + loss: ``loss(hidden @ weight.T + bias, target)`` without the (N, K) logits.

At vocabulary scale the logits and their gradient dominate memory (8,192 rows of a 128,000-class
head: 8 GB in float32). Here the rows go in chunks: per chunk a matmul forms the chunk's logits,
the fused op of the backend (backends/fused.py, mode ``GRAD_IN_FORWARD``) turns them into the rows'
losses and the gradient in one pass (on CPU written over the logits), and matmuls accumulate the
gradients of ``hidden``, ``weight`` and ``bias``; the next chunk reuses the logits' buffer. Probability targets
that require grad get theirs from the same op (the pair of contract.gradient_output), copied chunk by
chunk into their (N, K) gradient. The ideas are those of
Liger-Kernel's fused linear cross entropy and Apple's Cut Cross-Entropy, for every loss of the
catalogue.

* ``mean`` / ``sum``: the whole gradient is computed in forward (the mean's divisor is known from
  the targets up front) and only the three input gradients are kept; backward scales them by the
  upstream gradient (and hands them over untouched when it is exactly 1).
* ``none``: the upstream gradient is per row and only known in backward, so backward recomputes
  the logits chunk by chunk (forward computes the losses only).
* Both passes are ``torch.library`` custom ops (``apl::linear_loss`` and
  ``apl::linear_loss_backward``) with fakes, so ``torch.compile(fullgraph=True)`` sees one opaque op
  and the loop never enters a graph; and with vmap rules (one call per batch element), so that
  ``torch.func.vmap`` runs through them. Their autograd is an ``autograd.Function`` with
  ``setup_context``, which ``torch.func.grad`` (and ``vmap`` of it: per-sample gradients) requires.
"""

from __future__ import annotations

import inspect
import mmap

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from .backends import contract, fused
from .catalogue import (
    NAMED_PAIRS, PARAMETER_TEXT, LossSpec, accepted_params, canonical_name, check_classes, make_spec,
)
from .functional import (
    autocast_dtype, bind, check_labels, choose_backend, compute, formula, result_dtype, signature_of, title,
)
from .options import DEFAULTS, FLOAT_DTYPES, CallOptions, accumulation_dtype, check_weight

# CPU chunks: a fixed number of rows, chosen by matmul efficiency, not by cache. Each chunk's three
# matmuls stream the whole weight (K x H) and its gradient (read and written) for 6 R K H flops: about
# 0.4 R flops per byte whatever K is, so the rows, not the bytes, decide; and at such K no chunk worth
# computing fits the 32 MiB L3 (256 rows of logits and gradient take 2 KiB per class). The measured
# trade-off is bench/results/linear-cpu.md, "Chunk size" (time and peak memory against
# materializing the logits, 64 to 1024 rows): below 256 rows the weight traffic shows; 256 rows
# keeps within ~7 % of the materialized time with a fraction of its memory.
CPU_CHUNK_ROWS = 256
# CUDA chunks: Liger-Kernel's bound, the chunk's logits no larger than the hidden states (N x H
# elements, so the transient memory is of the order of the input whatever K is), but at least
# GPU_MIN_ROWS rows: each chunk's three matmuls move about 8 K H bytes of the weight and its
# gradient (bf16) for 6 R K H flops, and below ~256 rows an H100 (~700 TFLOP/s, ~3 TB/s) would
# wait on memory rather than compute. Not measured: no GPU was at hand.
GPU_MIN_ROWS = 256


def default_chunk_size(rows: int, hidden_size: int, num_classes: int, device_type: str) -> int:
    """The rows per chunk ``linear_loss`` uses when ``chunk_size`` is None (see the comments above)."""
    if device_type == "cuda":
        bound = 1 << max(0, (rows * hidden_size // max(num_classes, 1)).bit_length() - 1)  # a power of 2
        return max(1, min(rows, max(bound, GPU_MIN_ROWS)))
    return max(1, min(rows, CPU_CHUNK_ROWS))


def _workspace(shape: tuple[int, int], like: Tensor) -> Tensor:
    """An uninitialized ``shape`` tensor of ``like``'s dtype and device. On CPU its memory is its own
    anonymous mapping, returned to the system when the tensor is freed: from the C heap, a block of
    up to 32 MiB (glibc's largest mmap threshold) stays with the process after it is freed, and
    between training steps the process holds it beside the gradients (bench/run_linear.py --rss)."""
    count = shape[0] * shape[1]
    if like.device.type != "cpu" or count == 0:
        return like.new_empty(shape)
    return torch.frombuffer(mmap.mmap(-1, count * like.element_size()), dtype=like.dtype, count=count).view(shape)


def _chunk_loop(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, class_weight: Tensor | None,
                backend: str, bases: list[int], coefficients: list[float], options: list[int], chunk_size: int,
                needs: list[bool], row_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The rows' summed (or per-row) losses and the gradients of hidden, weight, bias and the
    probability targets for an upstream gradient of 1 (of ``row_scale`` per row, when given),
    ``chunk_size`` rows at a time (0: the default); a gradient not in ``needs`` is an empty tensor.
    Never holds more than one chunk of logits (one workspace, reused) and their gradient; the
    targets' gradient, when needed, is the one (N, K) output (the size of the targets)."""
    function = backends.REGISTRY[backend].load()  # the backend _linear_loss chose
    op, inplace_op = function.op, function.inplace_op
    rows, classes = hidden.shape[0], weight.shape[0]
    chunk_size = chunk_size or default_chunk_size(rows, hidden.shape[1], classes, hidden.device.type)
    acc = accumulation_dtype(hidden.dtype)
    reduced = options[contract.REDUCTION] != contract.REDUCTION_CODES["none"]
    grad_mode = contract.GRAD_IN_FORWARD if any(needs) else contract.NO_GRAD
    # Each chunk's op sums (or keeps) its rows: the mean's divisor is the whole batch's, applied here.
    # With the targets' gradient (options' target_grad) the op's gradient is the pair (2, R, K) of
    # contract.gradient_output: [0] the logits', [1] the targets' (a new tensor: the in-place CPU op
    # writes the logits' gradient alone).
    chunk_options = [*options]
    chunk_options[contract.GRAD_MODE] = grad_mode
    chunk_options[contract.TARGET_GRAD] = int(needs[3])
    if reduced:
        chunk_options[contract.REDUCTION] = contract.REDUCTION_CODES["sum"]
    loss = hidden.new_zeros((), dtype=acc) if reduced else hidden.new_empty(rows, dtype=acc)
    # Gradients not needed are empty tensors (distinct ones: a custom op's outputs must not alias).
    grad_hidden = hidden.new_empty(hidden.shape if needs[0] else 0)  # contiguous
    grad_weight = weight.new_zeros(weight.shape if needs[1] else 0)
    grad_bias = weight.new_zeros(classes if needs[2] else 0)
    # (contiguous, in the targets' dtype; else an empty one in hidden's: class indices are integers)
    grad_target = target.new_empty(target.shape) if needs[3] else hidden.new_empty(0)
    ones = weight.new_ones(min(chunk_size, rows) if needs[2] else 0)  # the bias' gradient as a matmul (GEMV)
    # One chunk's logits, allocated once (outside the C heap: _workspace) and overwritten by each
    # chunk, and the op's gradient written over them where the backend can (the CPU op,
    # apl::fused_loss_): chunk-sized blocks freed and allocated again beside the large gradients
    # fragment the C heap, and the process then holds hundreds of MiB more than the allocator's peak
    # (bench/run_linear.py --rss). (The GPU ops return a new gradient, which the CUDA caching
    # allocator hands back to the next chunk as it is.)
    workspace = _workspace((min(chunk_size, rows), classes), hidden)
    for start in range(0, rows, chunk_size):
        end = min(start + chunk_size, rows)
        chunk = hidden[start:end]
        logits = workspace[:end - start]  # rows of a contiguous tensor: contiguous
        if bias is None:
            torch.mm(chunk, weight.t(), out=logits)
        else:
            torch.addmm(bias, chunk, weight.t(), out=logits)
        if grad_mode == contract.GRAD_IN_FORWARD and inplace_op is not None and not needs[3]:
            chunk_loss, grad = inplace_op(logits, target[start:end], class_weight, bases, coefficients,
                                          chunk_options), logits
        else:
            chunk_loss, grad = op(logits, target[start:end], class_weight, bases, coefficients, chunk_options)
        if reduced:
            loss += chunk_loss
        else:
            loss[start:end] = chunk_loss
        if grad_mode == contract.NO_GRAD:
            continue
        if row_scale is not None:
            grad.mul_(row_scale[start:end, None].to(grad.dtype))  # (both halves of a pair)
        if needs[3]:
            grad_target[start:end] = grad[1]
            grad = grad[0].to(logits.dtype)  # (the pair is in the promoted dtype of logits and targets)
        if needs[0]:
            torch.mm(grad, weight, out=grad_hidden[start:end])
        if needs[1]:
            grad_weight.addmm_(grad.t(), chunk)
        if needs[2]:  # (4 times as fast as grad.sum(0) here)
            grad_bias.addmv_(grad.t(), ones[:end - start])
        del grad  # before the next chunk's: one chunk's logits and gradient at a time
    if options[contract.REDUCTION] == contract.REDUCTION_CODES["mean"]:
        divisor = contract.mean_divisor(target, class_weight, options[contract.IGNORE_INDEX], acc)
        loss = loss / divisor
        # (N + K) H elements, against the loop's 6 N K H flops. (In a half type the divisor is rounded
        # to it: one rounding of the result, as an upstream gradient in that type would make.)
        for grad in (grad_hidden, grad_weight, grad_bias, grad_target):
            grad.div_(divisor)
    return loss, grad_hidden, grad_weight, grad_bias, grad_target


@torch.library.custom_op("apl::linear_loss", mutates_args=())
def _linear_loss_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, class_weight: Tensor | None,
                    backend: str, bases: list[int], coefficients: list[float], options: list[int], chunk_size: int,
                    needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss (reduced, or per row for ``none``) and, for ``mean``/``sum``, the gradients of hidden,
    weight, bias and the probability targets for an upstream gradient of 1 (those not in ``needs``,
    and all for ``none``, are empty)."""
    reduced = options[contract.REDUCTION] != contract.REDUCTION_CODES["none"]
    if needs[3] and not reduced:
        # ``none`` computes its gradients in backward: the ops' check of the targets' gradient (a loss
        # whose kernels give none) runs now, with the options backward will use, on no rows.
        gradient_options = [*options]
        gradient_options[contract.GRAD_MODE], gradient_options[contract.TARGET_GRAD] = contract.GRAD_IN_FORWARD, 1
        contract.decode(hidden.new_empty((0, weight.shape[0])), target[:0], class_weight, bases, coefficients,
                        gradient_options)
    with torch.no_grad():
        return _chunk_loop(hidden, weight, bias, target, class_weight, backend, bases, coefficients, options,
                           chunk_size, needs if reduced else [False] * 4)


@torch.library.custom_op("apl::linear_loss_backward", mutates_args=())
def _linear_loss_backward_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                             class_weight: Tensor | None, grad_rows: Tensor, backend: str, bases: list[int],
                             coefficients: list[float], options: list[int], chunk_size: int,
                             needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of hidden, weight, bias and the probability targets of ``reduction="none"`` for
    the upstream ``grad_rows`` (N,): the logits are recomputed chunk by chunk."""
    with torch.no_grad():
        return _chunk_loop(hidden, weight, bias, target, class_weight, backend, bases, coefficients, options,
                           chunk_size, needs, row_scale=grad_rows)[1:]


def _fake_gradients(hidden, weight, target, needs, reduced=True):
    """_chunk_loop's gradients: each its input's shape and dtype where needed, else empty in hidden's."""
    inputs = (hidden, weight, weight[:, 0], target)
    return tuple(x.new_empty(x.shape) if need and reduced else hidden.new_empty(0) for x, need in zip(inputs, needs))


@_linear_loss_op.register_fake
def _(hidden, weight, bias, target, class_weight, backend, bases, coefficients, options, chunk_size, needs):
    reduced = options[contract.REDUCTION] != contract.REDUCTION_CODES["none"]
    loss = hidden.new_empty(() if reduced else hidden.shape[:1], dtype=accumulation_dtype(hidden.dtype))
    return (loss, *_fake_gradients(hidden, weight, target, needs, reduced))


@_linear_loss_backward_op.register_fake
def _(hidden, weight, bias, target, class_weight, grad_rows, backend, bases, coefficients, options, chunk_size,
      needs):
    return _fake_gradients(hidden, weight, target, needs)


def _loop_vmap(op):
    """A vmap rule for ``op``: one call per batch element (each with its own mean divisor), stacked.
    Simple rather than fast; it lets torch.func.vmap (per-sample gradients) run through the op."""

    def rule(info, in_dims, *args):
        def element(i):
            return [a.select(d, i) if isinstance(a, Tensor) and d is not None else a for a, d in zip(args, in_dims)]

        outputs = [op(*element(i)) for i in range(info.batch_size)]
        return tuple(torch.stack(column) for column in zip(*outputs)), (0,) * len(outputs[0])

    torch.library.register_vmap(op, rule)


_loop_vmap(_linear_loss_op)
_loop_vmap(_linear_loss_backward_op)


@fused.signature_kept
class _LinearLoss(torch.autograd.Function):
    """Autograd of the ops: an autograd.Function (rather than the ops' register_autograd) because
    torch.func transforms need its setup_context; the ops' vmap rules give its vmap rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden, weight, bias, target, class_weight, arguments):
        return _linear_loss_op(hidden, weight, bias, target, class_weight, *arguments)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        hidden, weight, bias, target, class_weight, ctx.arguments = inputs
        # The saved gradients stay differentiable outputs (never returned to the caller), so that a
        # derivative taken of the gradients they give reaches backward and is refused there, as in
        # backends/fused.py: marked constant, it would be a silent zero.
        ctx.set_materialize_grads(False)
        ctx.reduced = ctx.arguments[3][contract.REDUCTION] != contract.REDUCTION_CODES["none"]
        if ctx.reduced:
            ctx.save_for_backward(*output[1:])
        else:  # recomputed in backward from the inputs (nothing of N x K is kept)
            ctx.save_for_backward(hidden, weight, bias, target, class_weight)

    @staticmethod
    def backward(ctx, grad_loss, *grads_of_saved):
        fused.refuse_gradients_of_saved(*grads_of_saved)
        if grad_loss is None:
            return (None,) * 6
        if ctx.reduced:
            grads = ctx.saved_tensors
            if fused.released_after_this_backward(grad_loss):
                # Nothing reads the saved gradients after this: hand them out, scaled in place if need be.
                if not fused.is_exactly_one(grad_loss):
                    grads = tuple(g.mul_(grad_loss.to(g.dtype)) for g in grads)
            else:
                grads = tuple(g * grad_loss.to(g.dtype) for g in grads)
        else:
            arguments = (*ctx.saved_tensors, grad_loss, *ctx.arguments)
            if fused.gradient_is_differentiated():
                grads = fused.FirstDerivativeOnly.apply(_linear_loss_backward_op, *arguments)
            else:
                grads = _linear_loss_backward_op(*arguments)
        return (*(g if need else None for g, need in zip(grads, ctx.arguments[-1])), None, None)


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def _check_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                  class_weight: Tensor | None) -> None:
    """Shapes, dtypes and devices of every input (no data is read)."""
    for name, value in (("hidden", hidden), ("weight", weight), ("target", target), ("bias", bias)):
        if not isinstance(value, Tensor) and not (name == "bias" and value is None):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape (N, H); got shape {tuple(hidden.shape)} (flatten leading "
                         f"dimensions with hidden.flatten(0, -2) and target.flatten(0, -2 or -1))")
    rows, classes = hidden.shape[0], weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or classes < 2:
        raise ValueError(f"weight must have shape (K, H) = (K, {hidden.shape[1]}) with K >= 2 for hidden of shape "
                         f"{tuple(hidden.shape)}; got {tuple(weight.shape)}")
    if hidden.dtype not in FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must have one floating dtype (float16, bfloat16, float32 or float64); "
                        f"got {hidden.dtype} and {weight.dtype}")
    if bias is not None and (bias.shape != (classes,) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be None or of shape ({classes},) and dtype {weight.dtype}; got {bias.dtype} of "
                         f"shape {tuple(bias.shape)}")
    if target.is_floating_point():
        if target.shape != (rows, classes):
            raise ValueError(f"probability targets must have shape (N, K) = {(rows, classes)}; got "
                             f"{tuple(target.shape)}")
    elif target.shape != (rows,) or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must be N = {rows} class indices (an integer tensor of shape ({rows},)) or "
                         f"probabilities (N, K); got {target.dtype} of shape {tuple(target.shape)}")
    check_weight(class_weight)
    if class_weight is not None and class_weight.shape[0] != classes:
        raise ValueError(f"class_weight has {class_weight.shape[0]} entries but weight has K = {classes} rows "
                         f"(classes): give one weight per class")
    for name, value in (("weight", weight), ("bias", bias), ("target", target), ("class_weight", class_weight)):
        if value is not None and value.device != hidden.device:
            raise ValueError(f"{name} is on {value.device} but hidden is on {hidden.device}")


@torch.compiler.assume_constant_result
def _constant_call(name: str, params: tuple, reduction: str, ignore_index: int, label_smoothing: float,
                   backend: str) -> tuple[LossSpec, CallOptions]:
    """The spec and options of a call, for code that torch.compile traces: Dynamo cannot trace their
    checks, so it calls this once and keeps both as constants."""
    return make_spec(name, **dict(params)), CallOptions(reduction, ignore_index, label_smoothing, backend)


@torch.compiler.assume_constant_result
def _backend_name(backend: str, device_type: str) -> str:
    """The name of the backend that computes for ``device_type`` (choose_backend), a constant to
    torch.compile (a backend must be loaded before a compiled first call: backends.preload, or
    LinearLoss)."""
    return choose_backend(CallOptions(backend=backend), device_type).name


def linear_loss(hidden: Tensor, weight: Tensor, target: Tensor, name: str, *, bias: Tensor | None = None,
                class_weight: Tensor | None = None, reduction: str = DEFAULTS.reduction,
                ignore_index: int = DEFAULTS.ignore_index, label_smoothing: float = DEFAULTS.label_smoothing,
                chunk_size: int | None = None, backend: str = DEFAULTS.backend, **params) -> Tensor:
    """Loss ``name`` of the logits ``hidden @ weight.T + bias`` against ``target``, without ever
    holding the (N, K) logits or their gradient.

    The value and the gradients of ``hidden``, ``weight`` and ``bias`` are those of
    ``apl_loss(F.linear(hidden, weight, bias), target, name, ...)``; the rows are processed in
    chunks of ``chunk_size`` (module docstring), so the memory beyond the inputs and their
    gradients is one chunk's logits and gradient.

    Args:
        hidden: the last hidden states (N, H), the linear layer's input.
        weight: the linear layer's weight (K, H) (any strides), e.g. ``lm_head.weight``.
        target: class indices (N) in [0, K) or ``ignore_index``, or class probabilities (N, K).
        name: a loss of ``apl_kernels.available_losses()``, e.g. ``"nce+rce"``; ``params`` are its
            parameters as keywords (``alpha``, ``beta``, ``gamma``, ...; ``help(apl_kernels.get_loss(name))``).
        bias: the linear layer's bias (K) or None. Default: None
        class_weight: class weights (K), the ``weight`` of ``nn.CrossEntropyLoss`` (renamed: ``weight``
            is the linear layer's). Default: None
        reduction: ``'mean'`` (over the rows not ignored), ``'sum'`` or ``'none'``. Default: 'mean'
        ignore_index: a target value whose rows give 0 and count nowhere. Default: -100
        label_smoothing: ε in [0, 1]: the target becomes ``(1 - ε) · target + ε / K``. Default: 0.0
        chunk_size: rows per chunk; None picks it: 256 rows on CPU (measured, see
            ``default_chunk_size``), on CUDA chunk logits no larger than the hidden states and at
            least 256 rows. Default: None
        backend: ``'auto'`` (the C++ kernel for CPU tensors, Triton for CUDA tensors, or the CUDA C++
            kernel without Triton), ``'cpp'``, ``'cuda'``, ``'triton'``, or ``'torch'``: materialize
            the logits with ``F.linear`` and apply the PyTorch reference (the yardstick; it holds
            the (N, K) logits, and it supports double backward). Default: 'auto'

    Shapes:
        output: a scalar for ``'mean'`` and ``'sum'``, (N) for ``'none'``, in hidden's dtype.
        The loss math runs in float32 (float64 for float64 inputs); the matmuls run in the inputs'
        dtype (bf16 matmuls accumulate in float32 and feed bf16 logits to the loss, whose
        arithmetic is float32), as ``F.linear`` followed by a fused loss would; under
        ``torch.autocast`` in the autocast dtype, and the loss is float32.

    Gradients flow to ``hidden``, ``weight``, ``bias`` and to probability targets that require grad
    (as the fused ops give them, options' ``target_grad``; that gradient is then the one (N, K)
    tensor made), not to ``class_weight``; fused backends support no double backward. Works under
    ``torch.compile(fullgraph=True)`` (with ``dynamic=True``, use the module form: the functional
    form's options must be constants), ``torch.func.grad`` and ``torch.func.vmap`` of it
    (per-sample gradients).

    Example::

        >>> import torch, apl_kernels.linear as AL
        >>> hidden = torch.randn(64, 32, requires_grad=True)
        >>> head = torch.nn.Linear(32, 1000)
        >>> loss = AL.linear_loss(hidden, head.weight, torch.randint(0, 1000, (64,)), "nce+rce",
        ...                       bias=head.bias, alpha=1.0, beta=1.0)
        >>> loss.backward()
    """
    _check_chunk_size(chunk_size)
    _check_inputs(hidden, weight, bias, target, class_weight)
    spec, options = _constant_call(name, tuple(params.items()), reduction, ignore_index, label_smoothing, backend)
    return _linear_loss(spec, hidden, weight, bias, target, class_weight, options, chunk_size)


def _linear_loss(spec: LossSpec, hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                 class_weight: Tensor | None, options: CallOptions, chunk_size: int | None) -> Tensor:
    check_classes(spec, weight.shape[0])
    chosen = backends.REGISTRY[_backend_name(options.backend, hidden.device.type)]
    if chosen.name == "torch":
        return compute(spec, F.linear(hidden, weight, bias), target, class_weight, options)
    if not target.is_floating_point():
        target = target.long()
        check_labels(target, weight.shape[0], options.ignore_index, chosen, chunked=True)
    # Under autocast, as F.linear then a loss: matmuls in the autocast dtype, the loss in float32.
    dtype = autocast_dtype(hidden.device.type)
    if dtype is not None:
        hidden, weight, bias = (x if x is None else x.to(dtype) for x in (hidden, weight, bias))
    result = result_dtype(hidden)
    fused.refuse_weight_gradient(class_weight, "linear + loss gives")
    grad = torch.is_grad_enabled()
    needs = [grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad,
             grad and target.is_floating_point() and target.requires_grad]  # (the ops' target_grad)
    # (0: the op picks the default from the real shapes, which a compiled graph may only know symbolically.)
    arguments = (chosen.name, *contract.op_arguments(spec, options, contract.GRAD_IN_FORWARD), chunk_size or 0, needs)
    loss = _LinearLoss.apply(hidden, weight, bias, target, class_weight, arguments)[0]
    return loss.to(result)


class LinearLoss(nn.Module):
    """A catalogue loss of a linear layer's output, fused: ``LinearLoss("nce+rce", 1.0, 1.0)``.

    ``forward(hidden, weight, target, bias=None)`` returns ``linear_loss(hidden, weight, target, name,
    bias=bias, ...)`` (see ``help(apl_kernels.linear.linear_loss)``): the loss of
    ``hidden @ weight.T + bias`` without the (N, K) logits. ``name`` is any name of
    ``apl_kernels.available_losses()``; positional and keyword parameters are the loss's, followed by
    the options as keywords: ``class_weight`` (a buffer, moved by ``module.to()``), ``reduction``,
    ``ignore_index``, ``label_smoothing``, ``chunk_size`` and ``backend``. The named pairs have
    classes of their own (``LinearNCERCE(alpha, beta)``, ...) and :func:`get_linear_loss`.

    Example::

        >>> import torch, apl_kernels.linear as AL
        >>> head = torch.nn.Linear(32, 1000)
        >>> criterion = AL.LinearLoss("nce+rce", alpha=1.0, beta=1.0)
        >>> loss = criterion(torch.randn(64, 32), head.weight, torch.randint(0, 1000, (64,)), head.bias)
    """

    def __init__(self, name: str, *args, class_weight: Tensor | None = None, reduction: str = DEFAULTS.reduction,
                 ignore_index: int = DEFAULTS.ignore_index, label_smoothing: float = DEFAULTS.label_smoothing,
                 chunk_size: int | None = None, backend: str = DEFAULTS.backend, **params) -> None:
        super().__init__()
        self.options = CallOptions(reduction, ignore_index, label_smoothing, backend)
        backends.check_name(backend)
        backends.preload(backend)  # now rather than in a first call that torch.compile may trace
        check_weight(class_weight)
        _check_chunk_size(chunk_size)
        name = canonical_name(name)
        self.spec: LossSpec = make_spec(name, **bind(name, args, params))
        self.chunk_size = chunk_size
        self.register_buffer("class_weight", class_weight)

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
        _check_inputs(hidden, weight, bias, target, self.class_weight)
        return _linear_loss(self.spec, hidden, weight, bias, target, self.class_weight, self.options,
                            self.chunk_size)

    def extra_repr(self) -> str:
        parts = [repr(self.spec.name)] + [f"{k}={v!r}" for k, v in self.spec.accepted]
        parts += [f"{k}={getattr(self.options, k)!r}" for k in ("reduction", "ignore_index", "label_smoothing",
                                                               "backend")
                  if getattr(self.options, k) != getattr(DEFAULTS, k)]
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        if self.class_weight is not None:
            parts.append(f"class_weight=<{self.class_weight.shape[0]} class weights>")
        return ", ".join(parts)


def _signature(name: str) -> inspect.Signature:
    """The loss's parameters, then LinearLoss's options (``class_weight`` for ``weight``, ``chunk_size``)."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [p.replace(name="class_weight") if p.name == "weight" else p
              for p in signature_of(name, []).parameters.values()]
    return inspect.Signature(params[:-1] + [inspect.Parameter("chunk_size", keyword, default=None), params[-1]])


def _named_class(name: str, module: str) -> type:
    def __init__(self, *args, **kwargs):
        LinearLoss.__init__(self, name, *args, **kwargs)

    params = "\n".join(f"    {p}: {PARAMETER_TEXT[p]}. Default: {d!r}" for p, d in accepted_params(name).items())
    doc = (f"{title(name)} of a linear layer's output, fused: ``LinearLoss({name!r}, ...)``.\n\n"
           f"One row's loss: {formula(name)}.\n\nArgs:\n{params}\n    and the options of ``LinearLoss`` "
           f"(``class_weight``, ``reduction``, ``ignore_index``, ``label_smoothing``, ``chunk_size``, ``backend``)."
           f"\n\nExample::\n\n    >>> import torch, apl_kernels.linear as AL\n"
           f"    >>> head = torch.nn.Linear(32, 1000)\n    >>> criterion = AL.Linear{module}(1.0, 1.0)\n"
           f"    >>> loss = criterion(torch.randn(64, 32), head.weight, torch.randint(0, 1000, (64,)), head.bias)\n")
    cls = type(f"Linear{module}", (LinearLoss,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})
    cls.__signature__ = _signature(name)
    return cls


# The named pairs (the APL paper's and the later families'), alpha and beta first: LinearNCERCE, ...
NAMED_LINEAR_MODULES = {name: _named_class(name, module) for name, module in NAMED_PAIRS.items()}
globals().update({cls.__name__: cls for cls in NAMED_LINEAR_MODULES.values()})


def get_linear_loss(name: str, *args, **kwargs) -> LinearLoss:
    """The fused linear + loss module of loss ``name``: ``get_linear_loss("nce+rce", alpha=1.0, beta=1.0)``
    (the named pair's class, e.g. ``LinearNCERCE``, when it has one)."""
    name = canonical_name(name)
    cls = NAMED_LINEAR_MODULES.get(name)
    return cls(*args, **kwargs) if cls else LinearLoss(name, *args, **kwargs)


__all__ = ["LinearLoss", "default_chunk_size", "get_linear_loss", "linear_loss",
           *(cls.__name__ for cls in NAMED_LINEAR_MODULES.values())]
