"""Loss modules in the spirit of ``torch.nn``: ``apl_kernels.NCEMAE(alpha, beta)``.

Each module takes its loss's parameters first (``scale`` for a single loss, ``alpha, beta`` for
a pair), then ``nn.CrossEntropyLoss``'s options as keywords; ``weight`` is a buffer, so it moves
with ``module.to(device)``. Docstrings and signatures come from the catalogue.
"""

from __future__ import annotations

from torch import Tensor, nn

from . import backends
from .catalogue import BASES, NAMED_PAIRS, LossSpec, canonical_name, make_spec
from .functional import bind, compute, describe, signature_of, title
from .options import DEFAULTS, CallOptions, check_weight


class Loss(nn.Module):
    """A catalogue loss by name: ``Loss("nce+mae", alpha=1.0, beta=1.0)``.

    ``name`` is any name of ``apl_kernels.available_losses()``; positional and keyword
    parameters are the loss's (see ``help(apl_kernels.get_loss(name))``), followed by the options
    of ``nn.CrossEntropyLoss`` as keywords: ``weight``, ``reduction``, ``ignore_index``,
    ``label_smoothing``, and ``backend``.
    """

    def __init__(self, name: str, *args, weight: Tensor | None = None, reduction: str = DEFAULTS.reduction,
                 ignore_index: int = DEFAULTS.ignore_index, label_smoothing: float = DEFAULTS.label_smoothing,
                 backend: str = DEFAULTS.backend, **params) -> None:
        super().__init__()
        self.options = CallOptions(reduction, ignore_index, label_smoothing, backend)
        backends.check_name(backend)
        backends.preload(backend)  # now rather than in a first call that torch.compile may trace
        check_weight(weight)
        name = canonical_name(name)
        self.spec: LossSpec = make_spec(name, **bind(name, args, params))
        self.register_buffer("weight", weight)

    # The options as attributes, as nn.CrossEntropyLoss has them.
    reduction = property(lambda self: self.options.reduction)
    ignore_index = property(lambda self: self.options.ignore_index)
    label_smoothing = property(lambda self: self.options.label_smoothing)
    backend = property(lambda self: self.options.backend)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return compute(self.spec, input, target, self.weight, self.options)

    def extra_repr(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.spec.accepted]
        parts += [f"{k}={getattr(self, k)!r}" for k in ("reduction", "ignore_index", "label_smoothing", "backend")
                  if getattr(self, k) != getattr(DEFAULTS, k)]
        if self.weight is not None:
            parts.append(f"weight=<{tuple(self.weight.shape)[0]} class weights>")
        return ", ".join(parts)


class _NamedLoss(Loss):
    """A loss whose class names it: subclasses set ``loss_name``."""

    loss_name: str

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(self.loss_name, *args, **kwargs)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # For help() and editors: the loss's own signature and documentation.
        cls.__signature__ = signature_of(cls.loss_name, [])
        example = (f"    >>> import torch, apl_kernels as ak\n    >>> criterion = ak.{cls.__name__}()\n"
                   f"    >>> loss = criterion(torch.randn(8, 10), torch.randint(0, 10, (8,)))")
        cls.__doc__ = describe(cls.loss_name, f"{title(cls.loss_name)}, as a module: where you wrote "
                               f"``nn.CrossEntropyLoss()``.", example)


class APLLoss(Loss):
    """An Active Passive Loss ``alpha * active + beta * passive`` from any catalogue pair.

    ``APLLoss("nce", "rce", alpha=1.0, beta=1.0)`` equals ``NCERCE(1.0, 1.0)``; member parameters
    (``gamma``, ``q``, ``a``, ``min_prob``, ``official_grad``) and the options (``weight``,
    ``reduction``, ``ignore_index``, ``label_smoothing``, ``backend``) go as keywords.
    """

    def __init__(self, active: str, passive: str, alpha: float = 1.0, beta: float = 1.0, **kwargs) -> None:
        super().__init__(f"{active}+{passive}", alpha=alpha, beta=beta, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.spec.name!r}, " + super().extra_repr()


def _named_class(name: str, module: str) -> type:
    """The module class ``module`` of loss ``name`` (``NCEMAE`` of ``"nce+mae"``)."""
    return type(module, (_NamedLoss,), {"loss_name": name, "__module__": __name__, "__qualname__": module})


# One class per single loss (``scale`` and its own parameters first) and per named pair (``alpha``
# and ``beta`` first), named as the catalogue says: CE, ..., SCE, NCEMAE, ..., ANLCE, ANLFL.
NAMED_MODULES = {name: _named_class(name, module) for name, module in (
    *((base.name, base.module) for base in BASES), ("sce", "SCE"), *NAMED_PAIRS.items())}
globals().update({cls.__name__: cls for cls in NAMED_MODULES.values()})


def get_loss(name: str, **params) -> Loss:
    """The module of loss ``name`` (a name of :func:`available_losses`), e.g. ``get_loss("nce+mae")``;
    ``params`` are its parameters and options as keywords."""
    name = canonical_name(name)
    cls = NAMED_MODULES.get(name)
    if cls is not None:
        return cls(**params)
    active, passive = name.split("+")
    return APLLoss(active, passive, **params)
