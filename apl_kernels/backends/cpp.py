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

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

try:
    import fcntl
except ImportError:  # Windows: builds are not serialized, but each still installs whole
    fcntl = None

from . import BackendUnavailable, fused

OP = "apl::fused_loss"
LIBRARIES = {"cpu": ("apl_kernels_cpu", ("apl_cpu.cpp",)),
             "cuda": ("apl_kernels_cuda", ("apl_cuda.cu", "apl_cuda_emulation.cpp"))}
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


def vector_width() -> tuple[str, list[str]]:
    """The at::vec width to compile for this CPU, as a cache tag and compiler flags."""
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine() in ("x86_64", "AMD64") and capability in _X86_VECTOR_FLAGS:
        return _X86_VECTOR_FLAGS[capability]
    return "generic", []


def build_directory(variant: str) -> Path:
    root = os.environ.get("APL_KERNELS_BUILD_DIR") or Path.home() / ".cache" / "apl_kernels"
    vector_tag, _ = vector_width()
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


def _build_spec(variant: str) -> tuple[dict, dict]:
    """The arguments of ``cpp_extension.load`` for library ``variant`` (less the build
    directory), and the environment its build needs."""
    name, sources = LIBRARIES[variant]
    src = source_dir()
    _, vector_flags = vector_width()
    # at::parallel_for is inline: with an OpenMP build of torch it is an OpenMP pragma,
    # which runs on one thread unless this library is compiled with OpenMP too.
    openmp = ["-fopenmp"] if torch._C.has_openmp and platform.system() == "Linux" else []
    spec = {"name": name, "sources": [str(src / f) for f in sources],
            "extra_cflags": ["-O3", *vector_flags, *openmp], "extra_ldflags": openmp,
            "extra_include_paths": [str(src)], "is_python_module": False}
    env = {}
    if variant == "cuda":
        spec["extra_cuda_cflags"] = ["-O3"]  # no fast math: the kernels match the reference
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            env["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    return spec, env


def _inputs_digest(spec: dict, env: dict) -> str:
    """What a library is built from: every source in csrc/ (by content, so any header counts and
    the checkout's path does not), the flags, the compiler and this exact torch build."""
    digest = hashlib.sha256()
    settings = {key: value for key, value in spec.items() if key not in ("sources", "extra_include_paths")}
    settings.update(torch=torch.__version__, git=torch.version.git_version, cxx=os.environ.get("CXX"),
                    archs=env.get("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST")),
                    sources=[Path(s).name for s in spec["sources"]])
    digest.update(json.dumps(settings, sort_keys=True).encode())
    src = source_dir()
    for path in sorted(src.rglob("*")):
        if path.suffix in (".h", ".hpp", ".cuh", ".cpp", ".cc", ".cu"):
            digest.update(f"\0{path.relative_to(src).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(library: Path) -> Path:
    return library.with_name(library.name + ".manifest")


def _unusable(library: Path, inputs: str) -> str | None:
    """Why the cached ``library`` must not be loaded, or None. Loading maps the file: a library
    truncated by a full disk or a killed copy crashes the process (Bus error) when its missing
    pages are touched, and other bytes can do anything. So the file is read (never mapped) and
    held to the size and checksum written after its build: well under a millisecond for the CPU
    library, and it catches truncated, empty, overwritten and half-installed libraries."""
    if not library.exists():
        return "first use; later imports load it"
    try:
        manifest = json.loads(_manifest(library).read_text())
        expected = (manifest["inputs"], manifest["size"], manifest["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "the cached library has no checksum file: an older apl_kernels or a killed build made it"
    if expected[0] != inputs:
        return "its sources, flags or torch changed"
    try:
        intact = library.stat().st_size == expected[1] and _sha256(library) == expected[2]
    except OSError:
        intact = False
    if not intact:
        return "the cached library is damaged: its size or checksum differs from its build's"
    return None


@contextlib.contextmanager
def _build_lock(directory: Path, variant: str):
    """One build at a time per cache directory. flock is released by the kernel when its holder
    dies, so a killed build never blocks the next one (as a lock file's mere existence would)."""
    with open(directory / "build.lock", "a") as handle:
        exclusive = fcntl is not None
        if exclusive:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"apl_kernels: waiting for another process compiling the {variant} extension "
                      f"in {directory}...", file=sys.stderr, flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError:  # a filesystem without locks: builds may overlap, each installs whole
                exclusive = False
        yield exclusive


_BUILD_SCRIPT = ("import json, sys; from torch.utils import cpp_extension; "
                 "cpp_extension.load(**json.loads(sys.argv[1]))")


def _build(spec: dict, env: dict, directory: Path, verbose: bool) -> Path:
    """Compile ``spec`` into the empty ``directory`` and return the library's path. A child
    process compiles it and loads it once, as ``cpp_extension.load`` does, so a library that
    cannot load is found there, not in the caller."""
    arguments = json.dumps({**spec, "build_directory": str(directory), "verbose": verbose})
    quiet = {} if verbose else {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    result = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, arguments], env={**os.environ, **env},
                            text=True, **quiet)
    library = directory / f"{spec['name']}.so"
    if result.returncode == 0 and library.is_file():
        return library
    lines = [line.strip() for line in (result.stdout or "").splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]  # the compiler's first error says most
    detail = (errors[0] if errors else lines[-1] if lines else "its output is above")[:400]
    if result.returncode < 0:
        detail = f"the compiling process was killed by signal {-result.returncode}"
    elif library.is_file():  # linked, then the child could not load it
        raise BackendUnavailable(
            f"the C++ extension {spec['name']} compiled but cannot be loaded ({detail}); run "
            f"`python -m apl_kernels.build --force --verbose` to see the build, and check that the "
            f"compiler and CUDA toolkit suit this torch")
    raise BackendUnavailable(
        f"the C++ extension {spec['name']} failed to compile ({detail}); run "
        f"`python -m apl_kernels.build --verbose` to see the compiler's output")


def _compile(variant: str, verbose: bool = False, rebuild: str | None = None) -> Path:
    """The path of library ``variant``, verified, compiled first when the cache has no usable one
    (or for the reason ``rebuild``). Built in a temporary directory beside it and renamed into place: the final
    name only ever holds a complete library, whoever is killed or builds at the same time."""
    spec, env = _build_spec(variant)
    try:
        directory = build_directory(variant)
        library = directory / f"{spec['name']}.so"
        inputs = _inputs_digest(spec, env)
        if not rebuild and _unusable(library, inputs) is None:
            return library
        with _build_lock(directory, variant) as exclusive:
            why = rebuild or _unusable(library, inputs)
            if why is None:  # built by the process this one waited for
                return library
            if exclusive:  # left by killed builds: nobody else builds here now
                for leftover in directory.glob("build-*"):
                    shutil.rmtree(leftover, ignore_errors=True)
            print(f"apl_kernels: compiling the {variant} extension for torch {torch.__version__} into "
                  f"{directory} ({why})...", file=sys.stderr, flush=True)
            start = time.monotonic()
            temporary = Path(tempfile.mkdtemp(prefix="build-", dir=directory))
            try:
                built = _build(spec, env, temporary, verbose)
                manifest = {"inputs": inputs, "size": built.stat().st_size, "sha256": _sha256(built)}
                with open(temporary / "manifest", "w") as f:
                    json.dump(manifest, f)
                    f.flush()
                    os.fsync(f.fileno())
                with open(built, "rb") as f:
                    os.fsync(f.fileno())
                # The library first: between the two renames a reader finds the old checksum,
                # rejects the new library and waits here for the lock, then finds both.
                os.replace(built, library)
                os.replace(temporary / "manifest", _manifest(library))
            finally:
                shutil.rmtree(temporary, ignore_errors=True)
            print(f"apl_kernels: compiled the {variant} extension in {time.monotonic() - start:.0f} s",
                  file=sys.stderr, flush=True)
    except OSError as err:
        raise BackendUnavailable(
            f"cannot build the {variant} extension in the build cache ({err}); free some space there "
            f"or set APL_KERNELS_BUILD_DIR to a writable directory") from None
    return library


def _load_library(path: Path) -> str | None:
    """Load ``path`` into this process; None, or why it cannot be loaded."""
    try:
        torch.ops.load_library(str(path))
    except OSError as err:
        return str(err.__cause__ or err).strip()
    return None


def ensure_loaded(variant: str, verbose: bool = False, force: bool = False) -> Path:
    """Compile (if needed, or always with ``force``) and load library ``variant`` ("cpu" or
    "cuda"); return its path."""
    if variant in _loaded:
        return _loaded[variant]
    if variant == "cuda":
        reason = cuda_unavailable_reason()
        if reason:
            raise BackendUnavailable(reason)
        ensure_loaded("cpu", verbose)  # it defines the op the CUDA library implements
    path = _compile(variant, verbose, "--force was given" if force else None)
    failure = _load_library(path)
    if failure and not force:
        # Complete (it passed its checksum) yet unloadable: built for an environment that the
        # cache's tag cannot tell from this one. A fresh build may load.
        path = _compile(variant, verbose, f"the cached library cannot be loaded: {failure}")
        failure = _load_library(path)
    if failure:
        raise BackendUnavailable(
            f"the {variant} library {path} was just built but cannot be loaded ({failure}); run "
            f"`python -m apl_kernels.build --force --verbose` to see the build, and check that the "
            f"compiler and CUDA toolkit suit this torch")
    if variant == "cpu":
        fused.register(OP, OP + "_backward")
    _loaded[variant] = path
    return path


def load(device_type: str) -> Callable:
    """The backend function of the ``cpp`` (device_type "cpu") or ``cuda`` backend."""
    ensure_loaded(device_type)
    # The CPU kernel is bound by its exponentials: it computes the gradient in forward. The CUDA
    # kernels are bound by memory: they compute it in backward from the logits (docs/kernels.md).
    mode = fused.GRAD_IN_FORWARD if device_type == "cpu" else fused.GRAD_IN_BACKWARD
    return fused.backend_function(torch.ops.apl.fused_loss.default, mode)
