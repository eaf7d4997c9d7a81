"""The loss catalogue: the base losses, the names built from them, their parameters and limits.

Every loss of the library is a weighted sum of at most two *base losses* (:data:`BASES`, the one
list that the reference, the C++/CUDA header and the Triton kernels follow). A :class:`LossSpec`
says which, with what weights, and with which parameters; every backend computes exactly a
``LossSpec``. The contract (formulas, gradients, call semantics) is docs/losses.md:

* a single loss ``"nce"`` with ``scale=s`` is ``s * nce``;
* ``"sce"`` is ``alpha * ce + beta * rce``;
* a pair ``"nce+mae"`` is ``alpha * nce + beta * mae``.

Parameters are validated here, once, for every backend, with limits that float32 arithmetic can
honour (see :data:`LIMITS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Base:
    """A base loss: its name, its module's name, its formula, and its own parameters' defaults."""

    name: str
    module: str
    formula: str  # the per-label value, in the notation of docs/losses.md
    defaults: dict = field(default_factory=dict)  # its parameters beyond the weight
    official_grad: bool = False  # has focal factors that official_grad may hold constant
    # How the kernels form its expectation over the target distribution (apl_rowmath.h, family_of):
    # "local" (a function of p[j] alone), "reverse" (of the other classes' probabilities),
    # "normalized" (over a sum across classes), "negative" (one minus a normalized complement),
    # "split" (one function at the label, another at every other class).
    family: str = "local"
    # Its parameters that its paper names otherwise than the kernels' parameter (PARAMETERS) that
    # carries them: {its name: the kernels' name}.
    slots: dict = field(default_factory=dict)
    a_above_one: bool = False  # takes (a - p)^q: needs a >= 1 + AUL_MIN_EXCESS
    powers_a: bool = False  # takes (a + 1)^q or (a - p)^q: needs q ln(a + 1) <= 88 (check_params)


# The kernels' enum order: csrc/apl_rowmath.h's `Base` and the Triton kernel's constants follow
# this tuple (tests/test_catalogue.py checks the header against it).
BASES = (
    Base("ce", "CE", "-lp[y]"),
    Base("fl", "FL", "-(1 - p[y])^γ · lp[y]", {"gamma": 0.5}, official_grad=True),
    Base("gce", "GCE", "(1 - p̂[y]^q) / q", {"q": 0.7}),
    Base("mae", "MAE", "1 - p[y]"),
    Base("rce", "RCE", "A · Σ_{j≠y} p̂[j]", family="reverse"),
    Base("nce", "NCE", "lp[y] / Σ_j lp[j]", family="normalized"),
    Base("nfl", "NFL", "f[y] / Σ_j f[j],  f[j] = -(1 - p[j])^γ · lp[j]", {"gamma": 0.5}, official_grad=True,
         family="normalized"),
    Base("ngce", "NGCE", "(1 - p̂[y]^q) / (K - Σ_j p̂[j]^q)", {"q": 0.7}, family="normalized"),
    Base("nmae", "NMAE", "(1 - p[y]) / (K - 1)"),
    Base("nrce", "NRCE", "Σ_{j≠y} p̂[j] / (K - 1)", family="reverse"),
    Base("nnce", "NNCE", "1 - s[y] / Σ_k s[k],  s[k] = -ln m + max(lp[k], ln m)", {"min_prob": 1e-7},
         family="negative"),
    Base("nnfl", "NNFL", "1 - (B - f̂[y]) / (K·B - Σ_k f̂[k]),  f̂ = f at max(lp, ln m),  B = -(1 - m)^γ ln m",
         {"gamma": 0.5, "min_prob": 1e-7}, official_grad=True, family="negative"),
    Base("agce", "AGCE", "((a + 1)^q - (a + p[y])^q) / q", {"a": 1.0, "q": 2.0}, powers_a=True),
    Base("aul", "AUL", "((a - p[y])^q - (a - 1)^q) / q", {"a": 1.5, "q": 0.9}, a_above_one=True, powers_a=True),
    Base("ael", "AEL", "exp(-p[y] / a)", {"a": 3.0}),
    Base("anorm", "ANorm", "(Σ_k |a·[k = y] - p̂[k]|^p - (a - 1)^p) / p,  p̂ = clamp(p, 1e-5, 1)", {"a": 1.5, "p": 0.9},
         family="split", slots={"p": "q"}, a_above_one=True, powers_a=True),
)
BASE = {base.name: base for base in BASES}
BASE_LOSSES = tuple(base.name for base in BASES)
BASE_INDEX = {name: i for i, name in enumerate(BASE_LOSSES)}
FAMILIES = ("local", "reverse", "normalized", "negative", "split")  # the kernels' enum order (apl_rowmath.h)
FOCAL = frozenset(base.name for base in BASES if base.official_grad)
# Every loss parameter the kernels take, in the order of the fused ops' coefficient list.
PARAMETERS = ("gamma", "q", "a", "min_prob")

ACTIVE = ("ce", "fl", "gce", "nce", "nfl", "ngce")
PASSIVE = ("mae", "rce", "nmae", "nrce")
# Active Negative Loss (Ye et al., NeurIPS 2023) and the asymmetric losses (Zhou et al., ICML 2021)
# as their papers pair them: ANL-CE = nce+nnce, ANL-FL = nfl+nnfl.
LATER_PAIRS = ("nce+agce", "nce+aul", "nce+ael", "nce+nnce", "nfl+nnfl", "nce+anorm")
EXTRA_PAIRS = ("gce+nce", "mae+rce", "nfl+nce", "ngce+nce") + LATER_PAIRS
PAIRS = tuple(f"{a}+{p}" for a in ACTIVE for p in PASSIVE) + EXTRA_PAIRS
SINGLES = BASE_LOSSES + ("sce",)

# The pairs with modules of their own (alpha and beta first): the APL paper's, in the order of its
# tables, then the later families'.
NAMED_PAIRS = {
    "nce+mae": "NCEMAE", "nce+rce": "NCERCE", "nfl+mae": "NFLMAE", "nfl+rce": "NFLRCE",
    "ngce+mae": "NGCEMAE", "ngce+rce": "NGCERCE", "gce+mae": "GCEMAE", "gce+rce": "GCERCE",
    "gce+nce": "GCENCE", "mae+rce": "MAERCE", "nfl+nce": "NFLNCE", "ngce+nce": "NGCENCE",
    "nce+agce": "NCEAGCE", "nce+aul": "NCEAUL", "nce+ael": "NCEAEL", "nce+nnce": "ANLCE", "nfl+nnfl": "ANLFL",
    "nce+anorm": "NCEANorm",
}
PAPER_PAIRS = tuple(NAMED_PAIRS)[:12]
SCE_DEFAULTS = {"alpha": 0.1, "beta": 1.0}
SCE_FORMULA = "α · ce + β · rce"

# What float32 arithmetic can honour (docs/losses.md, "Parameters"). A weight times a loss must
# stay finite in float32 for any loss up to ~3e8 (logits of 1e4 give CE ~ 2e4); gamma above 100
# makes every focal factor of a two-class row underflow float32 ((1/2)^gamma < 1e-38 from
# gamma ~ 126 on), so NFL would divide 0 by 0; q and a keep (a + 1)^q finite (see check_params);
# min_prob must be a normal float32 below 1.
MAX_WEIGHT = 1e30
# aul's gradient -(a - p)^(q-1) p at a row's largest p needs 1 - p, which a float32 softmax resolves
# only to ~1e-7 (an ulp of its sum near 1): with a - 1 far below that, (a - 1) + (1 - p) and so the
# gradient are off by orders of magnitude. a - 1 >= 1e-8 keeps that error within ~1e-5 of the terms.
AUL_MIN_EXCESS = 1e-8
LIMITS = {
    "gamma": (0.0, 100.0),
    "q": (1e-30, 100.0),
    "a": (1e-30, 1e30),
    "min_prob": (1e-30, 1.0 - 2.0**-24),
}
PARAMETER_TEXT = {
    "scale": "the loss is multiplied by it",
    "alpha": "weight of the first (active) term",
    "beta": "weight of the second (passive) term",
    "gamma": "focal exponent γ of (1 - p)^γ",
    "q": "exponent q",
    "a": "offset a",
    "min_prob": "probability floor m of the clamp",
    "p": "exponent p of the norm",
    "official_grad": "True: the published code's gradient, every focal factor (1 - p)^γ held constant",
}


def available_losses() -> list[str]:
    """Every loss name :func:`get_loss` accepts: the singles, then the pairs."""
    return list(SINGLES + PAIRS)


def members(name: str) -> tuple[str, ...]:
    """The base losses of catalogue loss ``name`` (a canonical name)."""
    return ("ce", "rce") if name == "sce" else tuple(name.split("+"))


@dataclass(frozen=True)
class LossSpec:
    """What a backend computes: ``sum(weight * base(z, y) for base, weight in terms)``, with the
    members' parameters ``params`` (a value for each of :data:`PARAMETERS`)."""

    name: str
    terms: tuple[tuple[str, float], ...]
    params: tuple[tuple[str, float], ...]  # every name of PARAMETERS with its value
    official_grad: bool = False
    accepted: tuple[tuple[str, object], ...] = ()  # every accepted parameter's value, for repr
    # What the fused backends pass to their op on every call, made once (plain attributes, not
    # cached properties: torch.compile traces their reads).
    base_indices: tuple[int, ...] = field(init=False, repr=False, compare=False)  # the kernels' enum values
    weights: tuple[float, ...] = field(init=False, repr=False, compare=False)
    param_values: tuple[float, ...] = field(init=False, repr=False, compare=False)  # in PARAMETERS' order
    limits_classes: bool = field(init=False, repr=False, compare=False)  # check_classes has a limit to check

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits_classes", any(BASE[base].family == "negative" for base, _ in self.terms))
        object.__setattr__(self, "base_indices", tuple(BASE_INDEX[base] for base, _ in self.terms))
        object.__setattr__(self, "weights", tuple(float(weight) for _, weight in self.terms))
        object.__setattr__(self, "param_values", tuple(float(value) for _, value in self.params))

    def param(self, name: str) -> float:
        return dict(self.params)[name]


def canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a loss name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace(" ", "")
    if key not in SINGLES and key not in PAIRS:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(available_losses())}")
    return key


def accepted_params(name: str) -> dict[str, object]:
    """The parameters loss ``name`` accepts, in their positional order, with their defaults."""
    name = canonical_name(name)
    if name == "sce":
        return dict(SCE_DEFAULTS)
    parts = members(name)
    params: dict[str, object] = {"scale": 1.0} if len(parts) == 1 else {"alpha": 1.0, "beta": 1.0}
    for member in parts:
        for param, default in BASE[member].defaults.items():
            params.setdefault(param, default)
    if any(BASE[m].official_grad for m in parts):
        params["official_grad"] = False
    return params


def check_number(name: str, value: object, low: float = -math.inf, high: float = math.inf,
                 *, open_low: bool = False) -> float:
    """``value`` as a float in [low, high] (or (low, high] with ``open_low``), or a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < low or (open_low and value == low) or value > high:
        interval = f"{'(' if open_low else '['}{_shown(low)}, {_shown(high)}]"
        raise ValueError(f"{name} must be in {interval}, got {_shown(value)}")
    return value


def _shown(x: float) -> str:
    """``x`` short (``1e+06``), or in full where the short form is another number (1 - 2^-25 is not 1)."""
    return f"{x:g}" if float(f"{x:g}") == x else repr(x)


def slot_names(base_names: tuple[str, ...]) -> dict[str, str]:
    """{kernel parameter: the name these members accept it by}: the name itself, or a member's own
    name for it (Base.slots)."""
    names = {param: param for param in PARAMETERS}
    for base in base_names:
        names.update({kernel: own for own, kernel in BASE[base].slots.items()})
    return names


def check_params(base_names: tuple[str, ...], values: dict[str, object]) -> dict[str, float]:
    """Checked values of the members' parameters (every name of :data:`PARAMETERS`); ``values`` holds
    them by the members' names (slot_names)."""
    checked: dict[str, float] = {}
    names = slot_names(base_names)
    for param in PARAMETERS:
        value = values.get(names[param])
        if value is None:  # not a parameter of these members: the first default that exists
            value = next(b.defaults[param] for b in BASES if param in b.defaults)
            checked[param] = float(value)
            continue
        low, high = LIMITS[param]
        checked[param] = check_number(names[param], value, low, high)
    for base in base_names:
        if BASE[base].a_above_one and checked["a"] < 1 + AUL_MIN_EXCESS:
            raise ValueError(f"a must be >= 1 + {AUL_MIN_EXCESS:g} for {base} (its gradient has (a - p)^(q-1), and "
                             f"float32 resolves 1 - p near p = 1 only to ~1e-7), got {_shown(checked['a'])}")
    # (a + 1)^q (agce) and a^q (aul) must be finite in float32: q ln(a + 1) <= 88.
    q = names["q"]
    if any(BASE[b].powers_a for b in base_names) and checked["q"] * math.log1p(checked["a"]) > 88.0:
        raise ValueError(f"(a + 1)^{q} overflows float32 for a = {checked['a']:g}, {q} = {checked['q']:g}: "
                         f"need {q} · ln(a + 1) <= 88")
    return checked


def check_classes(spec: LossSpec, num_classes: int) -> None:
    """The limit that depends on K, checked when a call sees K: nnce and nnfl divide by a sum over
    the classes that is 0 when every p[k] <= min_prob, which a row can reach once K · min_prob >= 1.
    K · min_prob <= 1/2 keeps the largest p at least twice min_prob, so that sum well above 0."""
    if spec.limits_classes:
        min_prob = spec.param("min_prob")
        if min_prob * num_classes > 0.5:
            raise ValueError(f"min_prob = {_shown(min_prob)} is too large for K = {num_classes} classes: {spec.name} "
                             f"divides by a sum that is 0 when every probability is at most min_prob; use "
                             f"min_prob <= 1/(2K) = {_shown(0.5 / num_classes)}")


def make_spec(name: str, **params: object) -> LossSpec:
    """Validate ``params`` for loss ``name`` and return its :class:`LossSpec`."""
    name = canonical_name(name)
    accepted = accepted_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(
            f"loss {name!r} got unexpected parameter(s) {', '.join(unknown)}; it accepts: {', '.join(accepted)}"
        )
    values = {**accepted, **params}
    official = values.get("official_grad", False)
    if not isinstance(official, bool):
        raise TypeError(f"official_grad must be a bool, got {official!r}")
    parts = members(name)
    if len(parts) == 1:
        weights = (check_number("scale", values["scale"], -MAX_WEIGHT, MAX_WEIGHT),)
    else:
        weights = tuple(check_number(w, values[w], -MAX_WEIGHT, MAX_WEIGHT) for w in ("alpha", "beta"))
    member_params = check_params(parts, {p: values.get(p) for p in slot_names(parts).values() if p in accepted})
    return LossSpec(
        name=name,
        terms=tuple(zip(parts, weights)),
        params=tuple(member_params.items()),
        official_grad=official,
        accepted=tuple(values.items()),
    )


def check_ignore_index(ignore_index: object) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64 (labels are int64), got {ignore_index}")
    return ignore_index

