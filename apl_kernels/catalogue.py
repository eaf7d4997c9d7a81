"""The loss catalogue: names, parameters and their validation.

Every loss of the library is a weighted sum of at most two *base losses*
(``ce, fl, gce, mae, rce, nce, nfl, ngce, nmae, nrce``). A :class:`LossSpec`
says which, with what weights, and with which ``gamma``/``q``; every backend
computes exactly a ``LossSpec`` (see ``../shared/spec/losses.md``):

* a single loss ``"nce"`` with ``scale=s`` is ``s * nce``;
* ``"sce"`` is ``alpha * ce + beta * rce``;
* a pair ``"nce+mae"`` is ``alpha * nce + beta * mae``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

# The order is the kernels' enum order (csrc/apl_rowmath.h, apl_kernels/triton_backend.py).
BASE_LOSSES = ("ce", "fl", "gce", "mae", "rce", "nce", "nfl", "ngce", "nmae", "nrce")
BASE_INDEX = {name: i for i, name in enumerate(BASE_LOSSES)}

# Parameters of the base losses beyond their weight, and their defaults.
MEMBER_PARAMS = {"fl": ("gamma",), "nfl": ("gamma",), "gce": ("q",), "ngce": ("q",)}
PARAM_DEFAULTS = {"gamma": 0.5, "q": 0.7}
FOCAL = frozenset({"fl", "nfl"})

ACTIVE = ("ce", "fl", "gce", "nce", "nfl", "ngce")
PASSIVE = ("mae", "rce", "nmae", "nrce")
EXTRA_PAIRS = ("gce+nce", "mae+rce", "nfl+nce", "ngce+nce")
PAIRS = tuple(f"{a}+{p}" for a in ACTIVE for p in PASSIVE) + EXTRA_PAIRS
SINGLES = BASE_LOSSES + ("sce",)

# The pairs of the paper, in the order of its tables (the modules named after them).
PAPER_PAIRS = (
    "nce+mae", "nce+rce", "nfl+mae", "nfl+rce", "ngce+mae", "ngce+rce",
    "gce+mae", "gce+rce", "gce+nce", "mae+rce", "nfl+nce", "ngce+nce",
)


def available_losses() -> list[str]:
    """Every loss name :func:`get_loss` accepts: the singles, then the pairs."""
    return list(SINGLES + PAIRS)


@dataclass(frozen=True)
class LossSpec:
    """What a backend computes: ``sum(weight * base(z, y) for base, weight in terms)``."""

    name: str
    terms: tuple[tuple[str, float], ...]
    gamma: float = PARAM_DEFAULTS["gamma"]
    q: float = PARAM_DEFAULTS["q"]
    official_grad: bool = False
    params: tuple[tuple[str, object], ...] = ()  # every accepted parameter's value, for repr

    # Cached: the fused backends pass both to their op on every call.
    @cached_property
    def base_indices(self) -> tuple[int, ...]:
        """The terms' base losses as the kernels' enum values."""
        return tuple(BASE_INDEX[base] for base, _ in self.terms)

    @cached_property
    def weights(self) -> tuple[float, ...]:
        return tuple(float(weight) for _, weight in self.terms)


def canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a loss name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace(" ", "")
    if key not in SINGLES and key not in PAIRS:
        raise ValueError(
            f"unknown loss {name!r}; available: {', '.join(available_losses())}"
        )
    return key


def accepted_params(name: str) -> dict[str, object]:
    """The parameters loss ``name`` accepts, with their defaults."""
    name = canonical_name(name)
    if name == "sce":
        return {"alpha": 0.1, "beta": 1.0}
    members = name.split("+")
    params: dict[str, object] = {"scale": 1.0} if len(members) == 1 else {"alpha": 1.0, "beta": 1.0}
    for member in members:
        for p in MEMBER_PARAMS.get(member, ()):
            params[p] = PARAM_DEFAULTS[p]
    if any(m in FOCAL for m in members):
        params["official_grad"] = False
    return params


def _check_number(name: str, value: object, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def make_spec(name: str, **params: object) -> LossSpec:
    """Validate ``params`` for loss ``name`` and return its :class:`LossSpec`."""
    name = canonical_name(name)
    accepted = accepted_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(
            f"loss {name!r} got unexpected parameter(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted)}"
        )
    values = {**accepted, **params}
    resolved = tuple(values.items())
    official = values.pop("official_grad", False)
    if not isinstance(official, bool):
        raise TypeError(f"official_grad must be a bool, got {official!r}")
    gamma = _check_number("gamma", values.get("gamma", PARAM_DEFAULTS["gamma"]), nonnegative=True)
    q = _check_number("q", values.get("q", PARAM_DEFAULTS["q"]), positive=True)
    if name == "sce":
        members = ("ce", "rce")
    else:
        members = tuple(name.split("+"))
    if len(members) == 1:
        weights = (_check_number("scale", values["scale"]),)
    else:
        weights = (_check_number("alpha", values["alpha"]), _check_number("beta", values["beta"]))
    return LossSpec(
        name=name,
        terms=tuple(zip(members, weights)),
        gamma=gamma,
        q=q,
        official_grad=official,
        params=resolved,
    )
