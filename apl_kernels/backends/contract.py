"""The fused ops' contract: the one home of their argument layout, codes, fakes and mean divisor.

A fused op reads each row of logits once and returns the reduced loss and what backward needs::

    apl::<op>(Tensor logits, Tensor target, Tensor? weight, int[] bases, float[] coefficients,
              int[] options) -> (Tensor loss, Tensor saved)
    apl::<op>_backward(Tensor logits, Tensor target, Tensor? weight, Tensor stats, Tensor grad_loss,
                       int[] bases, float[] coefficients, int[] options) -> Tensor grad
    apl::<op>_(Tensor(a!) logits, Tensor target, Tensor? weight, int[] bases, float[] coefficients,
               int[] options) -> Tensor loss          (the CPU op only: apl::fused_loss_)

* ``logits`` (R, K) with any strides, float16/bfloat16/float32/float64; ``target`` (R,) int64
  class indices or (R, K) floating class probabilities (any strides); ``weight`` None or (K,)
  floating class weights.
* ``bases``: the LossSpec's base losses (indices of ``catalogue.BASE_LOSSES``); ``coefficients``:
  one weight per base, then :data:`COEFFICIENTS` (the values of ``catalogue.PARAMETERS``, then
  ``label_smoothing``); ``options``: :data:`OPTIONS` (``ignore_index``, the reduction's code of
  :data:`REDUCTION_CODES`, ``official_grad`` 0 or 1, the gradient mode :data:`NO_GRAD`,
  :data:`GRAD_IN_FORWARD` or :data:`GRAD_IN_BACKWARD`, and ``target_grad`` 1 for the gradient of
  probability targets too, else 0). :func:`op_arguments` packs them and
  :func:`decode` reads them back as a :class:`Call` of named fields; ``csrc/apl_catalogue.h`` holds
  the same positions for C++, generated from here (:func:`write_header`). (Three lists rather than
  a dozen arguments: torch.library's autograd wrapper spends time per argument on every call,
  which dominates small batches.)
* ``loss``: float32 (float64 for float64 logits), shape () for ``mean``/``sum`` and (R,) for
  ``none``; ignored rows count 0; a ``mean`` divides by :func:`mean_divisor`.
* ``saved``: empty for ``NO_GRAD``. ``GRAD_IN_FORWARD`` (the CPU kernel, which is bound by its
  exponentials and must not compute them twice): the (R, K) contiguous gradient for an upstream
  gradient of 1, in the logits' dtype, already divided by the mean's divisor. ``GRAD_IN_BACKWARD``
  (the GPU kernels, bound by memory): (R + 1, STATS) accumulation-dtype row records
  (:data:`RECORD`: per row max, log-sum-exp, C and the gradient coefficients of docs/kernels.md);
  the last row holds the mean's divisor — from which ``<op>_backward`` computes the gradient times
  the upstream gradient (a device scalar, or (R,) with any stride, stride 0 included) in one pass:
  the logits are read twice and the gradient written once, with no host synchronization.
* ``<op>_``: ``GRAD_IN_FORWARD`` only, with the gradient written over the (contiguous) logits
  instead of into a new tensor, and the loss returned: for the fused linear + loss, whose chunks'
  logits exist only to give that gradient (a new chunk-sized tensor per chunk fragments the C heap).
* ``target_grad`` 1: each gradient above (GRAD_IN_FORWARD's saved one, ``<op>_backward``'s) is
  the pair (2, R, K) of :func:`gradient_output`: ``[0]`` the logits', ``[1]`` the probability
  targets', written by the same pass (every loss is linear in the target row, so its gradient is a
  per-class term of the row: ``apl_rowmath.h``, "Targets' gradient").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..catalogue import BASES, FAMILIES, PARAMETERS, LossSpec
from ..options import FLOAT_DTYPES, CallOptions, accumulation_dtype

# ---------------------------------------------------------------- the layout of the three lists

MAX_TERMS = 2  # bases per call: a single loss or a pair
COEFFICIENTS = PARAMETERS + ("label_smoothing",)  # after the terms' weights
OPTIONS = ("ignore_index", "reduction", "official_grad", "grad_mode", "target_grad")
IGNORE_INDEX, REDUCTION, OFFICIAL_GRAD, GRAD_MODE, TARGET_GRAD = (OPTIONS.index(name) for name in OPTIONS)
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
GRAD_MODES = ("no_grad", "grad_in_forward", "grad_in_backward")
NO_GRAD, GRAD_IN_FORWARD, GRAD_IN_BACKWARD = range(len(GRAD_MODES))
# What GRAD_IN_BACKWARD saves per row (apl_op.h's RowRecord, the Triton kernels' Record):
# max, log s, C, alpha and beta of each term, H (docs/kernels.md), and the constant G of the
# probability targets' gradient (apl_rowmath.h, "Targets' gradient"; 0 unless target_grad).
RECORD = ("max_z", "log_s", "total_c", "alpha0", "beta0", "alpha1", "beta1", "total_h", "target_g")
STATS = len(RECORD)


def op_arguments(spec: LossSpec, options: CallOptions, grad_mode: int, target_grad: bool = False) -> tuple:
    """The op's ``bases, coefficients, options`` for ``spec`` and the call's options;
    ``target_grad``: the gradient of the probability targets too (see :func:`gradient_dtype`)."""
    return (
        spec.base_indices,
        spec.weights + spec.param_values + (options.label_smoothing,),
        (options.ignore_index, REDUCTION_CODES[options.reduction], int(spec.official_grad), grad_mode,
         int(target_grad)),
    )


class Call(NamedTuple):
    """A call of the ops, decoded from their lists and checked (apl_op.h's OpCall)."""
    bases: tuple
    weights: tuple
    gamma: float
    q: float
    a: float
    min_prob: float
    label_smoothing: float
    ignore_index: int
    reduction: int
    official_grad: bool
    grad_mode: int
    target_grad: bool  # the probability targets' gradient too
    probabilities: bool  # (R, K) class probabilities, not (R,) labels
    dense: bool  # coefficients on every label: probabilities, or label smoothing


def decode(logits: Tensor, target: Tensor, weight: Optional[Tensor], bases, coefficients, options) -> Call:
    """The op's arguments checked with apl_op.h's decode_call's rules, errors and messages (so that
    every backend's op raises the same exception for the same bad input)."""
    if logits.dim() != 2:
        raise ValueError(f"apl: logits must be 2-D (rows, classes); got {logits.dim()} dims")
    if logits.shape[1] < 2:
        raise ValueError(f"apl: the number of classes must be >= 2; got {logits.shape[1]}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"apl: logits must be float16, bfloat16, float32 or float64; got {logits.dtype}")
    probabilities = target.dim() == 2
    if probabilities:
        if target.shape != logits.shape or target.dtype not in FLOAT_DTYPES:
            raise ValueError(f"apl: probability targets must be floating with the logits' shape {list(logits.shape)}; "
                             f"got {target.dtype} of shape {list(target.shape)}")
    else:
        if target.dim() != 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(f"apl: target must be 1-D with one label per row of logits, or 2-D probabilities; got "
                             f"shape {list(target.shape)} for logits of shape {list(logits.shape)}")
        if target.dtype != torch.int64:
            raise TypeError(f"apl: labels must be int64; got {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"apl: logits are on {logits.device} but target is on {target.device}")
    if weight is not None:
        if weight.dim() != 1 or weight.shape[0] != logits.shape[1] or weight.dtype not in FLOAT_DTYPES:
            raise ValueError(f"apl: weight must be 1-D floating with one weight per class ({logits.shape[1]}); got "
                             f"{weight.dtype} of shape {list(weight.shape)}")
        if weight.device != logits.device:
            raise ValueError(f"apl: weight is on {weight.device} but logits are on {logits.device}")
    terms = len(bases)
    if not 1 <= terms <= MAX_TERMS or len(coefficients) != terms + len(COEFFICIENTS):
        raise ValueError(f"apl: a loss has 1 or 2 terms, and coefficients holds one weight per term, then "
                         f"{', '.join(COEFFICIENTS[:-1])} and {COEFFICIENTS[-1]}; got {terms} bases and "
                         f"{len(coefficients)} coefficients")
    if len(options) != len(OPTIONS):
        raise ValueError(f"apl: options must be [{', '.join(OPTIONS)}]; got {len(options)} values")
    for base, w in zip(bases, coefficients):
        if not 0 <= base < len(BASES):
            raise ValueError(f"apl: unknown base loss index {base}")
        if not math.isfinite(w):
            raise ValueError(f"apl: weights must be finite, got {w}")
    gamma, q, a, min_prob, label_smoothing = (float(x) for x in coefficients[terms:])
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"apl: gamma must be finite and >= 0, got {gamma}")
    if not (math.isfinite(q) and q >= 1e-30):
        raise ValueError(f"apl: q must be finite and >= 1e-30, got {q}")
    if not (math.isfinite(a) and a > 0):
        raise ValueError(f"apl: a must be finite and > 0, got {a}")
    if not 0 < min_prob < 1:
        raise ValueError(f"apl: min_prob must be in (0, 1), got {min_prob}")
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"apl: label_smoothing must be in [0, 1], got {label_smoothing}")
    for base in bases:
        if BASES[base].a_above_one and a <= 1:
            raise ValueError(f"apl: {BASES[base].name} needs a > 1, got {a}")
    ignore_index, reduction, official_grad, grad_mode, target_grad = (
        int(options[i]) for i in (IGNORE_INDEX, REDUCTION, OFFICIAL_GRAD, GRAD_MODE, TARGET_GRAD))
    if reduction not in REDUCTION_CODES.values():
        raise ValueError(f"apl: reduction code must be 0 (none), 1 (mean) or 2 (sum); got {reduction}")
    if official_grad not in (0, 1):
        raise ValueError(f"apl: official_grad (options[{OFFICIAL_GRAD}]) must be 0 or 1; got {official_grad}")
    if grad_mode not in range(len(GRAD_MODES)):
        raise ValueError(f"apl: the gradient mode (options[{GRAD_MODE}]) must be 0, 1 or 2; got {grad_mode}")
    if target_grad not in (0, 1) or (target_grad and (not probabilities or grad_mode == NO_GRAD)):
        raise ValueError(f"apl: target_grad (options[{TARGET_GRAD}]) must be 0, or 1 for probability targets with a "
                         f"gradient mode; got {target_grad}")
    return Call(tuple(int(b) for b in bases), tuple(float(w) for w in coefficients[:terms]), gamma, q, a, min_prob,
                label_smoothing, ignore_index, reduction, bool(official_grad), grad_mode, bool(target_grad),
                probabilities,
                probabilities or label_smoothing != 0)


# ---------------------------------------------------------------- the mean's divisor


def mean_divisor(target: Tensor, weight: Optional[Tensor], ignore_index: int, dtype: torch.dtype) -> Tensor:
    """What a ``mean`` divides by, as ``F.cross_entropy``: the summed class weight of the counted
    rows (their number without weights), the number of rows for probability targets, and 1 when
    that is 0 (every row ignored: the mean is 0). Over the last row dimension, so a batch of
    targets (B, R) or (B, R, K) gives (B,). A device tensor: no host synchronization. A label
    outside [0, K) (a NaN row of a GPU kernel) weighs 1: it is never used as an address."""
    if target.is_floating_point():
        rows = target.shape[-2]
        return torch.full(target.shape[:-2], float(rows) if rows else 1.0, dtype=dtype, device=target.device)
    counted = target != ignore_index
    if weight is None:
        total = counted.to(dtype).sum(-1)
    else:
        in_range = (target >= 0) & (target < weight.shape[0])
        w = torch.where(in_range, weight.to(dtype)[torch.where(in_range, target, 0)], 1)
        total = torch.where(counted, w, 0).sum(-1)
    return torch.where(total != 0, total, 1)


# ---------------------------------------------------------------- fakes (shapes for tracing)


def fake(logits, target, weight, bases, coefficients, options):
    rows, classes = logits.shape
    acc = accumulation_dtype(logits.dtype)
    loss = logits.new_empty((rows,) if options[REDUCTION] == REDUCTION_CODES["none"] else (), dtype=acc)
    return loss, saved_output(logits, options[GRAD_MODE], target if options[TARGET_GRAD] else None)


def gradient_dtype(logits: Tensor, target: Optional[Tensor]) -> torch.dtype:
    """The dtype of a gradient output: the logits' or, with the targets' gradient (``target`` given),
    the promoted dtype of both, so that neither gradient is rounded to the other's narrower dtype."""
    return logits.dtype if target is None else torch.promote_types(logits.dtype, target.dtype)


def gradient_output(logits: Tensor, target: Optional[Tensor]) -> Tensor:
    """A gradient output, uninitialized: the logits' (R, K), or with the probability targets'
    gradient (``target`` given, options' ``target_grad``) both, stacked (2, R, K): ``[0]`` the
    logits', ``[1]`` the targets', in :func:`gradient_dtype`."""
    shape = logits.shape if target is None else (2, *logits.shape)
    return logits.new_empty(shape, dtype=gradient_dtype(logits, target))


def saved_output(logits: Tensor, grad_mode: int, target: Optional[Tensor] = None) -> Tensor:
    """The op's ``saved`` output, uninitialized: the gradient (:func:`gradient_output`, ``target``
    given for the targets' gradient too), the records, or nothing."""
    rows, classes = logits.shape
    if grad_mode == GRAD_IN_FORWARD:
        return gradient_output(logits, target)
    if grad_mode == GRAD_IN_BACKWARD:
        return logits.new_empty((rows + 1, STATS), dtype=accumulation_dtype(logits.dtype))
    return logits.new_empty((0,))


def fake_inplace(logits, target, weight, bases, coefficients, options):
    """``<op>_`` (the gradient written over the logits, the loss returned): the loss's shape."""
    return fake(logits, target, weight, bases, coefficients, options)[0]


def fake_backward(logits, target, weight, stats, grad_loss, bases, coefficients, options):
    return gradient_output(logits, target if options[TARGET_GRAD] else None)


# ---------------------------------------------------------------- the C++ side, generated

HEADER = Path(__file__).resolve().parent.parent.parent / "csrc" / "apl_catalogue.h"


def _constant(name: str) -> str:
    return "k" + "".join(part.title() for part in name.split("_"))


def header() -> str:
    """The text of csrc/apl_catalogue.h: the catalogue's bases and families and the ops' layout."""
    bases = " \\\n".join(f"  X({base.name.upper()})" for base in BASES)
    families = "\n".join(f"    case k{base.name.upper()}: return k{base.family.title()};" for base in BASES)
    above_one = " || ".join(f"base == k{base.name.upper()}" for base in BASES if base.a_above_one) or "false"
    enum = "".join(f"  k{base.name.upper()} = {i},\n" for i, base in enumerate(BASES))
    coefficients = "".join(f"  kCoefficient{_constant(c)[1:]} = {i},\n" for i, c in enumerate(COEFFICIENTS))
    options = "".join(f"  kOption{_constant(o)[1:]} = {i},\n" for i, o in enumerate(OPTIONS))
    return f"""\
// Generated by `python -m apl_kernels.backends.contract` from apl_kernels/catalogue.py and the ops'
// contract (apl_kernels/backends/contract.py); tests/test_catalogue.py checks that it is current.
// Do not edit: change the catalogue and regenerate.

#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define APL_HD __host__ __device__ __forceinline__
#else
#define APL_HD inline
#endif

namespace apl {{

// The base losses of catalogue.BASES, in order. X(NAME) for each: dispatch over every base
// (`case k##NAME: ...`) with this, so that a base is never left out of a switch.
#define APL_BASES(X) \\
{bases}

enum Base : int {{
{enum}  kNumBases = {len(BASES)}
}};
enum Family : int {{ {", ".join(f"k{f.title()} = {i}" for i, f in enumerate(FAMILIES))} }};

// How a base's expectation over the labels is formed (apl_rowmath.h); -1 for no base.
APL_HD constexpr int family_of(int base) {{
  switch (base) {{
{families}
  }}
  return -1;
}}

// Their names, for messages.
constexpr const char* kBaseNames[kNumBases] = {{{", ".join(f'"{base.name}"' for base in BASES)}}};

// Whether a base takes (a - p)^q, and so needs a > 1 (catalogue.Base.a_above_one).
APL_HD constexpr bool needs_a_above_one(int base) {{ return {above_one}; }}

// The ops' lists (contract.py): coefficients hold one weight per term (at most kMaxTerms), then
// these at terms + position; options these.
constexpr int kMaxTerms = {MAX_TERMS};
enum Coefficient : int {{
{coefficients}  kNumCoefficients = {len(COEFFICIENTS)}
}};
constexpr int kNumParameters = {len(PARAMETERS)};
enum Option : int {{
{options}  kNumOptions = {len(OPTIONS)}
}};
enum Reduction : int64_t {{ {", ".join(f"{_constant(r)} = {c}" for r, c in REDUCTION_CODES.items())} }};
enum GradMode : int64_t {{ {", ".join(f"{_constant(m)} = {i}" for i, m in enumerate(GRAD_MODES))} }};
constexpr int64_t kStats = {STATS};  // values of a RowRecord

}}  // namespace apl
"""


def write_header() -> None:
    """Regenerate csrc/apl_catalogue.h after a change of the catalogue (CONTRIBUTING.md)."""
    HEADER.write_text(header())


if __name__ == "__main__":
    write_header()
