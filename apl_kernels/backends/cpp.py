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
  CUDA_HOME               the CUDA toolkit used by nvcc (default: see cuda_toolkit)
"""

from __future__ import annotations

import contextlib
import errno
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
INSTALL_ROOT = Path("/usr/local")  # where CUDA toolkits install themselves: cuda -> cuda-X.Y

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


def _has_runtime(home: Path) -> bool:
    """Whether ``home`` is a CUDA toolkit an extension can be linked in: nvcc and libcudart."""
    libraries = [home / "lib64", home / "lib", *home.glob("targets/*/lib")]
    return (home / "bin" / "nvcc").is_file() and any(any(d.glob("libcudart.so*")) for d in libraries)


def cuda_toolkit() -> tuple[Path | None, str]:
    """The CUDA toolkit to build with, and a note on how it was chosen (or why there is none).

    ``CUDA_HOME`` (or ``CUDA_PATH``) when set is used as given. Otherwise torch guesses the
    toolkit as the parent of the ``bin`` that holds the first ``nvcc`` on the PATH; where that is
    a wrapper (``/usr/local/bin/nvcc`` calling the real one) the guess has no runtime library and
    the link fails (``cannot find -lcudart``). So the guess is kept only if it can link, else the
    first complete toolkit of ``/usr/local/cuda`` and ``/usr/local/cuda-*`` (newest first)."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        home = Path(explicit)
        if _has_runtime(home):
            return home, f"CUDA_HOME={home}"
        return None, (f"CUDA_HOME={home} is not a complete CUDA toolkit (it needs bin/nvcc and the "
                      f"runtime library lib64/libcudart.so); set CUDA_HOME to one, or unset it")
    nvcc = shutil.which("nvcc")
    guess = Path(nvcc).resolve().parent.parent if nvcc else None
    if guess is not None and _has_runtime(guess):
        return guess, f"the toolkit of nvcc on the PATH, {guess}"
    installed = sorted(INSTALL_ROOT.glob("cuda-*"), key=lambda p: p.name, reverse=True)
    for home in (INSTALL_ROOT / "cuda", *installed):
        if _has_runtime(home):
            why = (f"{guess}, where nvcc on the PATH is, has no CUDA runtime library" if guess
                   else "no nvcc is on the PATH")
            return home, f"{home} ({why})"
    if guess is not None:
        return None, (f"nvcc was found ({nvcc}) but no CUDA runtime library (libcudart) beside it or "
                      f"in {INSTALL_ROOT / 'cuda'}; set CUDA_HOME to a complete CUDA toolkit")
    return None, "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA library cannot be built here, or None."""
    if os.environ.get("APL_KERNELS_CPU_ONLY") == "1":
        return "APL_KERNELS_CPU_ONLY=1 is set"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is not a CUDA build"
    home, note = cuda_toolkit()
    return None if home else note


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
        home, _ = cuda_toolkit()
        if home is not None:  # the child's cpp_extension reads it at import
            env["CUDA_HOME"] = str(home)
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
                    cuda_home=env.get("CUDA_HOME"),
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


def _holder(handle) -> dict:
    """The record the lock's holder wrote into it ({pid, host, since}), or {} if there is none
    (a holder that has not written it yet, or is gone)."""
    try:
        handle.seek(0)
        record = json.loads(handle.read() or "{}")
        return record if isinstance(record, dict) and {"pid", "host", "since"} <= record.keys() else {}
    except (OSError, ValueError):
        return {}


def _holder_progress(record: dict, directory: Path) -> tuple | None:
    """A value that changes while the holder makes progress, or None if it certainly makes none.

    On this host the holder's process state says it: running or sleeping while its compiler works,
    stopped (SIGSTOP, a suspended terminal job) or gone otherwise. On another host only its
    files can: the newest modification time in its temporary build directories."""
    if record.get("host") == platform.node():
        try:
            state = Path(f"/proc/{int(record['pid'])}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            return None
        return None if state in ("T", "t", "Z", "X") else ("running", time.monotonic())
    stamps = [path.stat().st_mtime for path in directory.glob("build-*/**/*") if path.exists()]
    return ("files", max(stamps, default=0.0))


def build_wait_limit() -> float:
    """Seconds to wait for a build lock whose holder makes no progress (APL_KERNELS_BUILD_WAIT)."""
    return float(os.environ.get("APL_KERNELS_BUILD_WAIT", "120"))


@contextlib.contextmanager
def _build_lock(directory: Path, variant: str):
    """One build at a time per cache directory. flock is released by the kernel when its holder
    dies, so a killed build never blocks the next one (as a lock file's mere existence would). The
    holder writes who it is into the lock; a waiter says whom it waits for and gives up, raising
    BackendUnavailable (``auto`` then falls back to the reference), once the holder has made no
    progress for build_wait_limit() seconds: a stopped build must not block every process."""
    path = directory / "build.lock"
    with open(path, "a+") as handle:
        exclusive = fcntl is not None
        if exclusive:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _wait_for(handle, path, directory, variant)
            except OSError:  # a filesystem without locks: builds may overlap, each installs whole
                exclusive = False
        if exclusive:
            handle.truncate(0)
            handle.write(json.dumps({"pid": os.getpid(), "host": platform.node(), "since": time.time()}))
            handle.flush()
        try:
            yield exclusive
        finally:
            if exclusive:
                handle.truncate(0)


def _wait_for(handle, path: Path, directory: Path, variant: str) -> None:
    """Block until the lock on ``handle`` is ours, or raise when its holder makes no progress."""
    told, last, quiet_since = None, None, time.monotonic()
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        record = _holder(handle)
        holder = (f"pid {record['pid']} on {record['host']}, since "
                  f"{time.strftime('%H:%M:%S', time.localtime(record['since']))}") if record else ""
        if holder != told:
            print(f"apl_kernels: waiting for another process compiling the {variant} extension in "
                  f"{directory}{f' ({holder})' if holder else ''}...", file=sys.stderr, flush=True)
            told = holder
        progress = _holder_progress(record, directory)
        if progress is None or progress == last:
            if time.monotonic() - quiet_since > build_wait_limit():
                raise BackendUnavailable(
                    f"the build lock {path} is held by {holder or 'another process'}, which has made no "
                    f"progress for {build_wait_limit():.0f} s (stopped?): end or resume that process, or "
                    f"set APL_KERNELS_BUILD_DIR to another directory")
        else:
            last, quiet_since = progress, time.monotonic()
        time.sleep(0.2)


_SYSTEM_CAUSES = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied")
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
    # What the system said (a full disk, a read-only directory) is the cause; the compiler's or
    # linker's error after it ("collect2: error: ld returned 1 exit status") only its consequence.
    causes = [line for line in lines if any(cause in line for cause in _SYSTEM_CAUSES)]
    errors = [line for line in lines if "error:" in line]  # else the compiler's first error says most
    detail = (causes or errors or lines[-1:] or ["its output is above"])[0][:400]
    if result.returncode < 0:
        detail = f"the compiling process was killed by signal {-result.returncode}"
    elif library.is_file():  # linked, then the child could not load it
        see = "the build's output is above" if verbose else (
            "run `python -m apl_kernels.build --force --verbose` to see the build")
        raise BackendUnavailable(
            f"the C++ extension {spec['name']} compiled but cannot be loaded ({detail}); {see}, and check "
            f"that the compiler and CUDA toolkit suit this torch")
    see = "the compiler's output is above" if verbose else (
        "run `python -m apl_kernels.build --verbose` to see the compiler's output")
    raise BackendUnavailable(f"the C++ extension {spec['name']} failed to compile ({detail}); {see}")


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
            toolkit = f" with the CUDA toolkit {cuda_toolkit()[1]}" if variant == "cuda" else ""
            print(f"apl_kernels: compiling the {variant} extension for torch {torch.__version__}{toolkit} "
                  f"into {directory} ({why})...", file=sys.stderr, flush=True)
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
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            fix = "it is read-only here: set APL_KERNELS_BUILD_DIR to a writable directory"
        elif err.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "its disk is full: free some space there or set APL_KERNELS_BUILD_DIR to another disk"
        else:
            fix = "set APL_KERNELS_BUILD_DIR to a writable directory"
        raise BackendUnavailable(f"cannot build the {variant} extension in the build cache ({err}); {fix}") from None
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
