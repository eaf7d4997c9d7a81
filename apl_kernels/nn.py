"""Loss modules in the spirit of ``torch.nn``: ``apl_kernels.NCEMAE(alpha, beta)``."""

from __future__ import annotations

from torch import Tensor, nn

from . import backends
from .catalogue import PAPER_PAIRS, SINGLES, LossSpec, canonical_name, make_spec
from .functional import _bind, check_options, compute, signature_of


class Loss(nn.Module):
    """A catalogue loss by name: ``Loss("nce+mae", alpha=1.0, beta=1.0)``."""

    def __init__(self, name: str, *args, reduction: str = "mean", ignore_index: int = -100,
                 backend: str = "auto", **params) -> None:
        super().__init__()
        check_options(reduction, ignore_index)
        backends.check_name(backend)
        name = canonical_name(name)
        self.spec: LossSpec = make_spec(name, **_bind(name, args, params))
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return compute(self.spec, input, target, self.reduction, self.ignore_index, self.backend)

    def extra_repr(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.spec.params]
        defaults = {"reduction": "mean", "ignore_index": -100, "backend": "auto"}
        parts += [f"{k}={getattr(self, k)!r}" for k, d in defaults.items() if getattr(self, k) != d]
        return ", ".join(parts)


class _NamedLoss(Loss):
    """A loss whose class names it: subclasses set ``loss_name``."""

    loss_name: str

    def __init__(self, *args, reduction: str = "mean", ignore_index: int = -100,
                 backend: str = "auto", **params) -> None:
        super().__init__(self.loss_name, *args, reduction=reduction, ignore_index=ignore_index,
                         backend=backend, **params)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__signature__ = signature_of(cls.loss_name, [])  # for help() and IDEs


class APLLoss(Loss):
    """An Active Passive Loss ``alpha * active + beta * passive`` from any catalogue pair.

    ``APLLoss("nce", "rce", alpha=1.0, beta=1.0)`` equals ``NCERCE(1.0, 1.0)``;
    member parameters (``gamma``, ``q``, ``official_grad``) go as keywords.
    """

    def __init__(self, active: str, passive: str, alpha: float = 1.0, beta: float = 1.0, *,
                 reduction: str = "mean", ignore_index: int = -100, backend: str = "auto",
                 **params) -> None:
        super().__init__(f"{active}+{passive}", alpha=alpha, beta=beta, reduction=reduction,
                         ignore_index=ignore_index, backend=backend, **params)

    def extra_repr(self) -> str:
        return f"{self.spec.name!r}, " + super().extra_repr()


# Singles. Each takes ``scale`` (and ``gamma``/``q``) first, then the keyword options.
class CE(_NamedLoss):
    """Cross entropy ``-log p[y]``, times ``scale``."""
    loss_name = "ce"


class FL(_NamedLoss):
    """Focal loss ``-(1 - p[y])^gamma log p[y]``; ``official_grad`` as the published code."""
    loss_name = "fl"


class GCE(_NamedLoss):
    """Generalized cross entropy ``(1 - p̂[y]^q) / q``."""
    loss_name = "gce"


class SCE(_NamedLoss):
    """Symmetric cross entropy ``alpha * CE + beta * RCE`` (alpha 0.1, beta 1)."""
    loss_name = "sce"


class MAE(_NamedLoss):
    """Mean absolute error ``1 - p[y]``."""
    loss_name = "mae"


class RCE(_NamedLoss):
    """Reverse cross entropy ``A * sum_{j != y} p̂[j]``, ``A = -ln 1e-4``."""
    loss_name = "rce"


class NCE(_NamedLoss):
    """Normalized cross entropy ``log p[y] / sum_j log p[j]``."""
    loss_name = "nce"


class NFL(_NamedLoss):
    """Normalized focal loss ``f[y] / sum_j f[j]``, ``f[j] = -(1 - p[j])^gamma log p[j]``."""
    loss_name = "nfl"


class NGCE(_NamedLoss):
    """Normalized GCE ``(1 - p̂[y]^q) / (K - sum_j p̂[j]^q)``."""
    loss_name = "ngce"


class NMAE(_NamedLoss):
    """Normalized MAE ``(1 - p[y]) / (K - 1)`` (the exact normalization)."""
    loss_name = "nmae"


class NRCE(_NamedLoss):
    """Normalized RCE ``sum_{j != y} p̂[j] / (K - 1)`` (the exact normalization)."""
    loss_name = "nrce"


# The paper's Active Passive pairs: ``alpha * active + beta * passive``, alpha and beta first.
class NCEMAE(_NamedLoss):
    """``alpha * NCE + beta * MAE``."""
    loss_name = "nce+mae"


class NCERCE(_NamedLoss):
    """``alpha * NCE + beta * RCE``."""
    loss_name = "nce+rce"


class NFLMAE(_NamedLoss):
    """``alpha * NFL + beta * MAE``."""
    loss_name = "nfl+mae"


class NFLRCE(_NamedLoss):
    """``alpha * NFL + beta * RCE``."""
    loss_name = "nfl+rce"


class NGCEMAE(_NamedLoss):
    """``alpha * NGCE + beta * MAE``."""
    loss_name = "ngce+mae"


class NGCERCE(_NamedLoss):
    """``alpha * NGCE + beta * RCE``."""
    loss_name = "ngce+rce"


class GCEMAE(_NamedLoss):
    """``alpha * GCE + beta * MAE``."""
    loss_name = "gce+mae"


class GCERCE(_NamedLoss):
    """``alpha * GCE + beta * RCE``."""
    loss_name = "gce+rce"


class GCENCE(_NamedLoss):
    """``alpha * GCE + beta * NCE``."""
    loss_name = "gce+nce"


class MAERCE(_NamedLoss):
    """``alpha * MAE + beta * RCE``."""
    loss_name = "mae+rce"


class NFLNCE(_NamedLoss):
    """``alpha * NFL + beta * NCE``."""
    loss_name = "nfl+nce"


class NGCENCE(_NamedLoss):
    """``alpha * NGCE + beta * NCE``."""
    loss_name = "ngce+nce"


NAMED_MODULES = {cls.loss_name: cls for cls in _NamedLoss.__subclasses__()}
assert set(NAMED_MODULES) == set(SINGLES) | set(PAPER_PAIRS)


def get_loss(name: str, **params) -> Loss:
    """The module of loss ``name`` (a name of :func:`available_losses`), e.g. ``get_loss("nce+mae")``."""
    name = canonical_name(name)
    cls = NAMED_MODULES.get(name)
    if cls is not None:
        return cls(**params)
    active, passive = name.split("+")
    return APLLoss(active, passive, **params)
