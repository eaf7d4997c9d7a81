"""Backends: who computes a loss for which device, and how ``"auto"`` chooses.

A backend is a function ``(logits (R, K), target (R,) int64 or (R, K) probabilities, weight,
spec, options) -> loss`` plus the device types it serves. Fused backends load lazily (a C++
extension may compile on first use); one that cannot load says why, and ``"auto"`` then falls
back to the next candidate.

* ``torch`` (reference.py): the plain PyTorch reference, every device.
* ``cpp`` (cpp.py, csrc/apl_cpu.cpp): the fused C++ kernel for CPU tensors.
* ``cuda`` (cpp.py, csrc/apl_cuda.cu): the same row math compiled with nvcc, for CUDA tensors.
* ``triton`` (triton.py): the fused Triton kernels for CUDA tensors (and CPU tensors under
  ``TRITON_INTERPRET=1``, which is how they are tested without a GPU).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message says why."""


@dataclass
class Backend:
    name: str
    device_types: Callable[[], tuple[str, ...]]  # empty: every device type
    loader: Callable[[], Callable]  # returns the loss function or raises BackendUnavailable
    checks_labels: bool = False  # it raises on out-of-range labels itself (no separate check needed)
    _fn: Callable | None = field(default=None, repr=False)
    error: str | None = field(default=None, repr=False)  # why it cannot load, once it failed
    _warned: bool = field(default=False, repr=False)

    def serves(self, device_type: str) -> bool:
        types = self.device_types()
        return not types or device_type in types

    def load(self) -> Callable:
        if self._fn is None and self.error is None:
            if torch.compiler.is_compiling():  # loading compiles and opens a library: not traceable
                raise RuntimeError(
                    f"apl_kernels: backend {self.name!r} is loaded on first use, which torch.compile cannot "
                    f"trace: use a loss module (it loads its backend when it is made), call the loss once "
                    f"before compiling, or call apl_kernels.backends.preload({self.name!r}) first")
            try:
                self._fn = self.loader()
            except BackendUnavailable as err:
                self.error = str(err)
        if self._fn is None:
            raise BackendUnavailable(f"backend {self.name!r} is unavailable: {self.error}")
        return self._fn

    def available(self) -> bool:
        try:
            self.load()
        except BackendUnavailable:
            return False
        return True


REGISTRY: dict[str, Backend] = {}
# "auto" tries these in order for a device type; the reference serves the rest.
AUTO_ORDER = {"cpu": ("cpp",), "cuda": ("triton", "cuda")}


def _load_torch() -> Callable:
    from .. import reference

    return reference.reference_loss


def _load_cpp() -> Callable:
    from . import cpp

    return cpp.load("cpu")


def _load_cuda() -> Callable:
    from . import cpp

    return cpp.load("cuda")


def _load_triton() -> Callable:
    try:
        from . import triton as triton_kernels
    except ImportError as err:
        raise BackendUnavailable(f"triton cannot be imported ({err})") from None
    return triton_kernels.load()


def _triton_device_types() -> tuple[str, ...]:
    # Under TRITON_INTERPRET=1 Triton kernels run on CPU tensors: that is how they are tested
    # without a GPU, so the triton backend then serves CPU tensors too (never chosen by "auto").
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


for _backend in (
    Backend("torch", lambda: (), _load_torch),
    Backend("cpp", lambda: ("cpu",), _load_cpp, checks_labels=True),
    Backend("cuda", lambda: ("cuda",), _load_cuda),
    Backend("triton", _triton_device_types, _load_triton),
):
    REGISTRY[_backend.name] = _backend


def available_backends(device_type: str = "cpu") -> list[str]:
    """The backends that can run on ``device_type`` here."""
    return [b.name for b in REGISTRY.values() if b.serves(device_type) and b.available()]


def check_name(name: str) -> None:
    """Raise unless ``name`` is ``"auto"`` or a known backend (whether or not it runs here)."""
    if not isinstance(name, str) or (name != "auto" and name not in REGISTRY):
        raise ValueError(f"unknown backend {name!r}; known: auto, {', '.join(REGISTRY)}")


def resolve(name: str, device_type: str) -> Backend:
    """The backend that computes for a tensor on ``device_type`` (raises ValueError saying why
    a named backend cannot)."""
    if name == "auto":
        for candidate in AUTO_ORDER.get(device_type, ()):
            backend = REGISTRY[candidate]
            if backend.available():
                return backend
            if not backend._warned:
                backend._warned = True
                warnings.warn(
                    f"apl_kernels: {backend.error} (backend {candidate!r}); backend='auto' uses the next candidate",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return REGISTRY["torch"]
    backend = REGISTRY.get(name) if isinstance(name, str) else None
    if backend is None:
        raise ValueError(f"unknown backend {name!r}; known: auto, {', '.join(REGISTRY)}; "
                         f"available for {device_type} tensors: {', '.join(available_backends(device_type))}")
    if not backend.serves(device_type):
        raise ValueError(
            f"backend {name!r} does not run on {device_type} tensors (it serves "
            f"{', '.join(backend.device_types())}); available for {device_type} tensors: "
            f"{', '.join(available_backends(device_type))}"
        )
    try:
        backend.load()
    except BackendUnavailable as err:
        raise ValueError(
            f"{err}; available for {device_type} tensors: {', '.join(available_backends(device_type))}"
        ) from None
    return backend


def preload(name: str = "auto") -> None:
    """Load now the backend(s) that ``name`` picks for this machine's devices (CPU, and CUDA when a
    GPU is visible), so that no first call has to: loss modules call it when they are made, which
    lets ``torch.compile`` trace their first call."""
    device_types = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    for device_type in device_types:
        if name == "auto" or REGISTRY[name].serves(device_type):
            try:
                resolve(name, device_type)
            except ValueError:
                pass  # unavailable here: the call that needs it says why
