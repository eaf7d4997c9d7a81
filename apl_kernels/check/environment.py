"""Phase 1: the environment (versions, compilers, CPU, GPU) and the backends that run on the device."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

import apl_kernels as ak
from apl_kernels import backends
from .common import Check, Progress, short


# ---------------------------------------------------------------- 1. environment


def first_line(command: list[str], match: str = "") -> str | None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if match in line and line.strip()]
    return lines[0] if lines else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(check: Check) -> None:
    from torch.utils.cpp_extension import CUDA_HOME

    from apl_kernels.backends import cpp

    if torch.version.cuda:
        accelerator = f"CUDA {torch.version.cuda}"
    else:
        accelerator = f"ROCm {torch.version.hip}" if torch.version.hip else "no CUDA"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        triton = f"triton {importlib.metadata.version('triton')}"
    except importlib.metadata.PackageNotFoundError:
        triton = "triton: not installed"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    compiler = os.environ.get("CXX", "c++")
    nvcc = Path(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    nvcc_version = first_line([str(nvcc), "--version"], "release") if nvcc and nvcc.is_file() else None
    lines = [
        f"Python {platform.python_version()} ({platform.system()} {platform.machine()}); apl_kernels "
        f"{ak.__version__} ({Path(ak.__file__).parent})",
        f"torch {torch.__version__} ({accelerator}{f', cuDNN {cudnn}' if cudnn else ''})",
        triton + (" (TRITON_INTERPRET=1: its kernels run under the interpreter on CPU tensors)" if interpret else ""),
        f"C++ compiler: {first_line([compiler, '--version']) or f'{compiler} not found'}",
        f"nvcc: {f'{nvcc_version} ({nvcc})' if nvcc_version else 'not found'}",
        f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch's vector width "
        f"{torch.backends.cpu.get_cpu_capability()} (the C++ kernel is built for {cpp.vector_width()[0]})",
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (timings of a busy machine vary)",
        f"extension build cache: {os.environ.get('APL_KERNELS_BUILD_DIR') or Path.home() / '.cache' / 'apl_kernels'}",
    ]
    if check.cuda:
        p = torch.cuda.get_device_properties(check.device)
        lines.append(f"GPU {check.device}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability "
                     f"{p.major}.{p.minor}, {p.multi_processor_count} SMs ({torch.cuda.device_count()} visible)")
    else:
        lines.append(f"GPU: {'none visible' if not torch.cuda.is_available() else 'not checked (--device cpu)'}")
    check.environment = lines
    check.environment_summary = [lines[1], lines[2], lines[-1]]  # torch, triton, GPU


def load_backends(check: Check) -> None:
    """Load every backend that serves the device (a first use compiles the extension) and say why
    the others cannot run. A backend missing its tools (no triton, no nvcc) is a fact of this
    machine; one that fails to build or load is a failure."""
    from apl_kernels.backends import cpp

    kind = check.device.type
    progress = Progress("loading backends (a first use compiles the C++/CUDA extension)", len(backends.REGISTRY))
    for name, backend in backends.REGISTRY.items():
        started = time.monotonic()
        if not backend.serves(kind):
            check.backend_rows.append([name, "no", f"serves {', '.join(backend.device_types())} tensors only"])
            progress.step(name)
            continue
        try:
            ok, why = backend.available(), backend.error
        except Exception as err:  # noqa: BLE001 - a loader's bug is reported, not raised
            ok, why = False, short(err)
        seconds = time.monotonic() - started
        if ok:
            how = " under the interpreter" if check.interpreted(name) else ""
            loaded = f", loaded in {seconds:.0f} s" if seconds >= 1 else ""
            check.backend_rows.append([name, "yes", f"available{how}{loaded}"])
            check.fused += [name] if name != "torch" else []
        else:
            missing_tools = (name == "cuda" and cpp.cuda_unavailable_reason() is not None) or (
                name == "triton" and importlib.util.find_spec("triton") is None)
            check.backend_rows.append([name, "no", why])
            if not missing_tools:
                check.fail(f"backend {name} cannot load on {kind}: {why}", progress)
        progress.step(name)
    progress.close()
    if not check.fused:
        check.fail(f"no fused backend runs on {kind} here: losses fall back to the PyTorch reference")
