"""Functional forms: ``apl_kernels.functional.nce_mae(logits, target, alpha, beta)``.

Every loss of the catalogue has a function named after it (``+`` written ``_``) with
``torch.nn.functional.cross_entropy``'s options: ``(input, target, *params, weight=None,
reduction="mean", ignore_index=-100, label_smoothing=0.0, backend="auto")``; ``apl_loss`` takes
any loss by name. The functions are made from the catalogue (their signatures and docstrings
too); functional.pyi spells them out for editors and type checkers (``write_stub()`` regenerates it;
tests check it matches).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from . import backends
from .backends import fused
from .catalogue import (
    BASE, NAMED_PAIRS, PARAMETER_TEXT, SCE_FORMULA, LossSpec, accepted_params, available_losses, canonical_name,
    check_classes, make_spec, members,
)
from .distributed import dtensor
from .options import ACCUMULATION_DTYPES, DEFAULTS, CallOptions, accumulation_dtype, check_inputs, check_target_range

OPTION_TEXT = f"""\
    weight: class weights (K,), as ``nn.CrossEntropyLoss``'s: a row's loss is scaled by the weight
        of its label (of each label, for probability targets), and ``mean`` divides by the sum of
        the weights of the counted rows. Default: None
    reduction: ``'mean'`` (over the rows not ignored), ``'sum'`` or ``'none'``. Default: {DEFAULTS.reduction!r}
    ignore_index: a target value whose rows give 0 and count nowhere (index targets only).
        Default: {DEFAULTS.ignore_index}
    label_smoothing: ε in [0, 1]: the target becomes ``(1 - ε) · target + ε / K``. Default: {DEFAULTS.label_smoothing}
    backend: ``'auto'`` (the C++ kernel for CPU tensors, Triton for CUDA tensors, or the CUDA
        C++ kernel without Triton, else the reference), ``'torch'`` (the PyTorch reference),
        ``'cpp'``, ``'cuda'`` or ``'triton'``. Default: {DEFAULTS.backend!r}
"""

SHAPES_TEXT = """\
Shapes:
    input: logits (N, K) or (N, K, d1, ...), float16, bfloat16, float32 or float64.
    target: class indices (N) or (N, d1, ...) in [0, K) or ``ignore_index`` (any integer dtype), or
        class probabilities of the input's shape (floating; rows need not sum to 1).
    output: a scalar for ``'mean'`` and ``'sum'``; (N) or (N, d1, ...) for ``'none'``. In the input's
        dtype (float32 for half inputs under ``torch.autocast``, as ``F.cross_entropy``).
"""


def formula(name: str) -> str:
    """The value of loss ``name`` (a canonical name), in the notation of docs/losses.md."""
    name = canonical_name(name)
    if name == "sce":
        return f"{SCE_FORMULA}, ce = {BASE['ce'].formula}, rce = {BASE['rce'].formula}"
    parts = members(name)
    if len(parts) == 1:
        return f"scale · {BASE[name].formula}"
    return f"α · {parts[0]} + β · {parts[1]}, " + ", ".join(f"{m} = {BASE[m].formula}" for m in parts)


def describe(name: str, heading: str, example: str) -> str:
    """The docstring of a public form of loss ``name``: formula, parameters, options, shapes, example."""
    params = "\n".join(f"    {p}: {PARAMETER_TEXT[p]}. Default: {d!r}" for p, d in accepted_params(name).items())
    return (f"{heading}\n\nOne row's loss (label y; notation of docs/losses.md): {formula(name)}.\n"
            f"Class probabilities as targets give the expectation over labels.\n\nArgs:\n{params}\n"
            f"{OPTION_TEXT}\n{SHAPES_TEXT}\nExample::\n\n{example}\n")


def compute(spec: LossSpec, input: Tensor, target: Tensor, weight: Tensor | None = None,
            options: CallOptions = DEFAULTS) -> Tensor:
    """The loss ``spec`` of ``input`` against ``target``; the one path every public form takes (the
    fused linear + loss shares its steps: :func:`choose_backend`, :func:`check_labels`,
    :func:`result_dtype`)."""
    if not torch.compiler.is_compiling() and dtensor.is_dtensor(input):  # logits sharded by class
        return dtensor.dtensor_loss(spec, input, target, weight, options)
    check_inputs(input, target, weight)
    num_classes = input.size(1)
    check_classes(spec, num_classes)
    chosen = choose_backend(options, "cpu" if input.is_cpu else input.device.type)  # (.device makes an object)
    spatial = input.dim() > 2
    probabilities = target.is_floating_point()

    def rows(x: Tensor) -> Tensor:  # (N, K, d1, ...) -> (N d1 ..., K); 2-D passes as it is
        return x.movedim(1, -1).reshape(-1, num_classes) if spatial else x

    logits = rows(input)
    labels = rows(target) if probabilities else (target.reshape(-1) if spatial else target).long()
    check_labels(labels, num_classes, options.ignore_index, chosen)
    loss = chosen.load()(logits, labels, weight, spec, options)
    dtype = result_dtype(input)
    if loss.dtype != dtype:  # (a call of .to that changes nothing costs a microsecond: 128 x 10 takes ~40)
        loss = loss.to(dtype)
    return loss.reshape(target.shape[:1] + target.shape[2:] if probabilities else target.shape) \
        if spatial and options.reduction == "none" else loss


def choose_backend(options: CallOptions, device_type: str) -> backends.Backend:
    """The backend that computes a call on ``device_type`` tensors (``backends.resolve``)."""
    return backends.resolve(options.backend, device_type)


def check_labels(labels: Tensor, num_classes: int, ignore_index: int, backend: backends.Backend,
                 chunked: bool = False) -> None:
    """The label range check, where it is free (CPU tensors) or asked for (the reference on a GPU
    synchronizes for it), unless the backend checks them itself: fused GPU kernels give a row with
    such a label a NaN loss instead (README). A ``chunked`` call (the fused linear + loss) checks
    CPU labels whatever the backend, so that an error names a position in the whole batch, not in a
    chunk; it leaves them to its op under a torch.func transform. Never while traced: labels have
    no values then."""
    if (backend.checks_labels and not chunked) or labels.is_floating_point() or labels.device.type == "meta" \
            or torch.compiler.is_compiling():
        return
    if chunked and fused.in_transform():
        return
    if (backend.name == "torch" or labels.device.type == "cpu") and (chunked or not backend.checks_labels):
        check_target_range(labels, num_classes, ignore_index)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on ``device_type``, or None where it is off."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def result_dtype(input: Tensor) -> torch.dtype:
    """A loss is returned in the input's dtype, or in float32 (float64) under autocast, as
    ``F.cross_entropy``'s."""
    dtype = input.dtype
    if dtype in ACCUMULATION_DTYPES:  # its own accumulation dtype: the same with autocast or without
        return dtype
    return dtype if autocast_dtype(input.device.type) is None else accumulation_dtype(dtype)


def bind(name: str, args: tuple, kwargs: dict) -> dict:
    """Positional parameters in the order of :func:`accepted_params`, merged with keywords."""
    order = list(accepted_params(name))
    if len(args) > len(order):
        raise TypeError(f"loss {name!r} takes at most {len(order)} parameters ({', '.join(order)}); got {len(args)}")
    params = dict(zip(order, args))
    twice = set(params) & set(kwargs)
    if twice:
        raise TypeError(f"loss {name!r} got multiple values for {', '.join(sorted(twice))}")
    return {**params, **kwargs}


def apl_loss(input: Tensor, target: Tensor, name: str, *, weight: Tensor | None = None,
             reduction: str = DEFAULTS.reduction, ignore_index: int = DEFAULTS.ignore_index,
             label_smoothing: float = DEFAULTS.label_smoothing, backend: str = DEFAULTS.backend,
             **params) -> Tensor:
    """Any catalogue loss by name: ``apl_loss(logits, target, "nce+mae", alpha=1.0, beta=1.0)``.

    ``name`` is a name of ``apl_kernels.available_losses()``; ``params`` its parameters; the
    options are those of every loss (see ``help(apl_kernels.functional.nce_mae)``).
    """
    options = CallOptions(reduction, ignore_index, label_smoothing, backend)
    return compute(make_spec(name, **params), input, target, weight, options)


OPTION_PARAMETERS = [
    inspect.Parameter("weight", inspect.Parameter.KEYWORD_ONLY, default=None),
    *(inspect.Parameter(option, inspect.Parameter.KEYWORD_ONLY, default=getattr(DEFAULTS, option))
      for option in ("reduction", "ignore_index", "label_smoothing", "backend")),
]


def signature_of(name: str, leading: list[inspect.Parameter]) -> inspect.Signature:
    """The signature of a public form of loss ``name``: ``leading``, its parameters, the options."""
    params = [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
              for p, d in accepted_params(name).items()]
    return inspect.Signature(leading + params + OPTION_PARAMETERS)


def function_name(name: str) -> str:
    return canonical_name(name).replace("+", "_")


def title(name: str) -> str:
    """A one-line name of the loss: its module's class name, or 'the ... pair'."""
    module = BASE[name].module if name in BASE else NAMED_PAIRS.get(name, "SCE" if name == "sce" else None)
    return f"The {module} loss" if module else f"The Active Passive pair {name}"


def _make_function(name: str):
    def loss_function(input, target, *args, weight=None, reduction=DEFAULTS.reduction,
                      ignore_index=DEFAULTS.ignore_index, label_smoothing=DEFAULTS.label_smoothing,
                      backend=DEFAULTS.backend, **kwargs):
        spec = make_spec(name, **bind(name, args, kwargs))
        return compute(spec, input, target, weight, CallOptions(reduction, ignore_index, label_smoothing, backend))

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    loss_function.__name__ = loss_function.__qualname__ = function_name(name)
    loss_function.__module__ = __name__
    loss_function.__signature__ = signature_of(
        name, [inspect.Parameter("input", positional), inspect.Parameter("target", positional)]
    )
    example = (f"    >>> import torch, apl_kernels.functional as AF\n"
               f"    >>> AF.{function_name(name)}(torch.randn(8, 10), torch.randint(0, 10, (8,)))")
    loss_function.__doc__ = describe(name, f"{title(name)} of logits against targets.", example)
    return loss_function


for _name in available_losses():
    globals()[function_name(_name)] = _make_function(_name)

__all__ = ["apl_loss", "compute"] + [function_name(n) for n in available_losses()]


def stub() -> str:
    """The text of functional.pyi: every generated function's signature, for editors."""
    lines = ['"""Generated by apl_kernels.functional.write_stub() from the catalogue; tests check it matches."""',
             "", "from torch import Tensor", "",
             "def compute(spec, input: Tensor, target: Tensor, weight: Tensor | None = ..., options=...) -> Tensor: ...",
             "def apl_loss(input: Tensor, target: Tensor, name: str, *, weight: Tensor | None = ..., "
             "reduction: str = ..., ignore_index: int = ..., label_smoothing: float = ..., backend: str = ..., "
             "**params: float | bool) -> Tensor: ..."]
    for name in available_losses():
        params = ", ".join(f"{p}: {type(d).__name__} = {d!r}" for p, d in accepted_params(name).items())
        lines.append(f"def {function_name(name)}(input: Tensor, target: Tensor, {params}, *, weight: Tensor | None = None, "
                     f"reduction: str = {DEFAULTS.reduction!r}, ignore_index: int = {DEFAULTS.ignore_index}, "
                     f"label_smoothing: float = {DEFAULTS.label_smoothing}, backend: str = {DEFAULTS.backend!r}) "
                     f"-> Tensor: ...")
    return "\n".join(lines) + "\n"


def write_stub() -> None:
    """Regenerate functional.pyi after a change of the catalogue (CONTRIBUTING.md)."""
    from pathlib import Path

    Path(__file__).with_suffix(".pyi").write_text(stub())
