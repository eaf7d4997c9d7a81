"""The ``cpp`` (CPU) and ``cuda`` backends: the extension in ``csrc/``.

The extension is compiled against the torch that imports it, on first use or
ahead of time with ``python -m apl_kernels.build`` (README, "Build design"),
with ninja, into a cache directory keyed by the torch, Python and CUDA
versions and the CPU's vector width. Two libraries: the CPU one defines the op
and its CPU kernel; the CUDA one adds the CUDA kernel and is only compiled
when a CUDA tensor asks for it (or by the build command), so CPU users never
wait for nvcc.

Environment:
  APL_KERNELS_BUILD_DIR   where the libraries are built and cached
  APL_KERNELS_CPU_ONLY=1  never build the CUDA library
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0" when no GPU is visible)
  CUDA_HOME               the CUDA toolkit used by nvcc
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Callable

import torch

from . import BackendUnavailable, fused

OP = "apl::fused_loss"
HEADERS = ("apl_rowmath.h", "apl_op.h")
LIBRARIES = {"cpu": ("apl_kernels_cpu", ("apl_cpu.cpp",)), "cuda": ("apl_kernels_cuda", ("apl_cuda.cu",))}
DEFAULT_CUDA_ARCHS = "8.0;9.0"

_loaded: dict[str, Path] = {}


def source_dir() -> Path:
    """The C++/CUDA sources: inside the installed package, or csrc/ of a source checkout."""
    package = Path(__file__).resolve().parent.parent
    installed = package / "csrc"
    return installed if installed.is_dir() else package.parent / "csrc"


# at::vec widths by the capability torch itself uses on this CPU (which ATEN_CPU_CAPABILITY
# can lower), with the flags torch compiles its own kernels of that width with.
_X86_VECTOR_FLAGS = {
    "AVX512": ("avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                          "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]),
    "AVX2": ("avx2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]),
}


def _vector_flags() -> tuple[str, list[str]]:
    """The at::vec width to compile for this CPU, as a cache tag and compiler flags."""
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine() in ("x86_64", "AMD64") and capability in _X86_VECTOR_FLAGS:
        return _X86_VECTOR_FLAGS[capability]
    return "generic", []


def build_directory(variant: str) -> Path:
    root = os.environ.get("APL_KERNELS_BUILD_DIR") or Path.home() / ".cache" / "apl_kernels"
    vector_tag, _ = _vector_flags()
    cuda_tag = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{cuda_tag}-{vector_tag}"
    path = Path(root) / tag / variant
    path.mkdir(parents=True, exist_ok=True)
    return path


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA library cannot be built here, or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("APL_KERNELS_CPU_ONLY") == "1":
        return "APL_KERNELS_CPU_ONLY=1 is set"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is not a CUDA build"
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    return None


def _compile(variant: str, verbose: bool = False) -> Path:
    from torch.utils import cpp_extension

    name, sources = LIBRARIES[variant]
    src = source_dir()
    directory = build_directory(variant)
    target = directory / f"{name}.so"
    newest_source = max((src / f).stat().st_mtime for f in sources + HEADERS)
    if not target.exists() or target.stat().st_mtime < newest_source:
        print(f"apl_kernels: compiling the {variant} extension for torch {torch.__version__} "
              f"into {directory} (once; about a minute)...", file=sys.stderr, flush=True)
    _, vector_flags = _vector_flags()
    # at::parallel_for is inline: with an OpenMP build of torch it is an OpenMP pragma,
    # which runs on one thread unless this library is compiled with OpenMP too.
    openmp = ["-fopenmp"] if torch._C.has_openmp and platform.system() == "Linux" else []
    kwargs = {}
    if variant == "cuda":
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        kwargs["extra_cuda_cflags"] = ["-O3"]  # no fast math: the kernels match the reference
    cpp_extension.load(
        name=name,
        sources=[str(src / f) for f in sources],
        extra_cflags=["-O3", *vector_flags, *openmp],
        extra_ldflags=openmp,
        extra_include_paths=[str(src)],
        build_directory=str(directory),
        is_python_module=False,
        verbose=verbose,
        **kwargs,
    )
    return target


def ensure_loaded(variant: str, verbose: bool = False) -> Path:
    """Compile (if needed) and load library ``variant`` ("cpu" or "cuda"); return its path."""
    if variant in _loaded:
        return _loaded[variant]
    if variant == "cuda":
        reason = cuda_unavailable_reason()
        if reason:
            raise BackendUnavailable(reason)
        ensure_loaded("cpu", verbose)  # it defines the op the CUDA library implements
    try:
        path = _compile(variant, verbose)
    except (RuntimeError, OSError, ImportError) as err:
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise BackendUnavailable(
            f"the {variant} extension failed to compile ({detail}); run "
            f"`python -m apl_kernels.build --verbose` to see the compiler's output"
        ) from None
    if variant == "cpu":
        fused.register(OP)
    _loaded[variant] = path
    return path


def load(device_type: str) -> Callable:
    """The backend function of the ``cpp`` (device_type "cpu") or ``cuda`` backend."""
    ensure_loaded(device_type)
    return fused.backend_function(torch.ops.apl.fused_loss.default)
