"""The build cache heals itself (apl_kernels.backends.cpp): a damaged, unverified or stale library
is rebuilt, never loaded; a build is installed whole, one at a time, even when its process is
killed; ``python -m apl_kernels.build --force`` rebuilds.

Every case runs in a child process with its own APL_KERNELS_BUILD_DIR: loading a damaged library
can kill its process (Bus error), and the suite's own cache stays untouched. The module compiles
once, for real (the good cache below); the cases copy that cache, damage the copy, and replace the
compiler with a copy of the good library, which tests every decision around the compiler.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apl_kernels.backends import cpp

# The child: `python -m apl_kernels.build --cpu-only [args]` with a stand-in compiler that logs
# each build and copies argv[1] (HOLD_BUILD=1: hangs until killed), then a loss on the C++
# backend held to the reference.
CHILD = r"""
import os, shutil, sys, time
from pathlib import Path
import torch
import apl_kernels as ak
import apl_kernels.build
from apl_kernels.backends import cpp

good, log = sys.argv[1], sys.argv[2]

def stand_in_compiler(spec, env, directory, verbose):
    with open(log, "a") as f:
        f.write(f"{directory}\n")
    while os.environ.get("HOLD_BUILD"):
        time.sleep(0.05)
    return Path(shutil.copy(good, Path(directory) / (spec["name"] + ".so")))

cpp._build = stand_in_compiler
if os.environ.get("SOURCES"):
    cpp.source_dir = lambda: Path(os.environ["SOURCES"])
code = apl_kernels.build.main(["--cpu-only", *sys.argv[3:]])
if code == 0:
    logits, target = torch.randn(16, 7), torch.randint(0, 7, (16,))
    loss = ak.NCEMAE(1.0, 1.0, backend="cpp")(logits, target)
    expected = ak.NCEMAE(1.0, 1.0, backend="torch")(logits, target)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    print("loss ok")
sys.exit(code)
"""


def child_env(cache: Path, **extra: str) -> dict:
    return {**os.environ, "APL_KERNELS_BUILD_DIR": str(cache), "APL_KERNELS_CPU_ONLY": "1", **extra}


def run_child(cache: Path, good: Path, log: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(good), str(log), *args],
                          env=child_env(cache, **extra), capture_output=True, text=True, timeout=300)


def library_in(cache: Path, monkeypatch) -> Path:
    monkeypatch.setenv("APL_KERNELS_BUILD_DIR", str(cache))
    return cpp.build_directory("cpu") / f"{cpp.LIBRARIES['cpu'][0]}.so"


def builds(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def describe(result) -> str:
    crashed = " (Bus error)" if result.returncode in (-signal.SIGBUS, 128 + signal.SIGBUS) else ""
    return f"exit {result.returncode}{crashed}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


def assert_healthy(library: Path, good_bytes: bytes) -> None:
    assert library.read_bytes() == good_bytes
    assert not list(library.parent.glob("build-*")), "a temporary build directory was left behind"


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory) -> Path:
    """A cache holding one real, fresh build of the CPU library."""
    cache = tmp_path_factory.mktemp("good-cache")
    result = subprocess.run([sys.executable, "-m", "apl_kernels.build", "--cpu-only"],
                            env=child_env(cache), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, describe(result)
    return cache


@pytest.fixture
def cache(good_cache, tmp_path, monkeypatch):
    """A copy of the good cache, its library's path and the good library's bytes."""
    copy = tmp_path / "cache"
    shutil.copytree(good_cache, copy)
    library = library_in(copy, monkeypatch)
    return copy, library, library.read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "empty", "random bytes", "no checksum"])
def test_damaged_library_is_rebuilt(damage, cache, tmp_path):
    cache, library, good_bytes = cache
    good = tmp_path / "good.so"
    good.write_bytes(good_bytes)
    if damage == "truncated":  # as a full disk or a killed copy leaves it: loading it was a Bus error
        library.write_bytes(good_bytes[: len(good_bytes) // 2])
    elif damage == "empty":
        library.write_bytes(b"")
    elif damage == "random bytes":
        library.write_bytes(os.urandom(len(good_bytes)))
    else:  # a cache from before checksums, or a build killed between its two renames
        cpp._manifest(library).unlink()
    log = tmp_path / "builds.log"
    result = run_child(cache, good, log)
    assert result.returncode == 0 and "loss ok" in result.stdout, describe(result)
    assert len(builds(log)) == 1, describe(result)
    reason = "no checksum" if damage == "no checksum" else "damaged"
    assert reason in result.stderr, describe(result)
    assert_healthy(library, good_bytes)


def test_changed_sources_rebuild_and_moved_sources_do_not(cache, tmp_path):
    cache, library, good_bytes = cache
    sources = tmp_path / "csrc"
    shutil.copytree(cpp.source_dir(), sources)
    log = tmp_path / "builds.log"
    # The same sources at another path (another checkout, or the installed package): no build.
    result = run_child(cache, library, log, SOURCES=str(sources))
    assert result.returncode == 0 and "loss ok" in result.stdout, describe(result)
    assert builds(log) == [] and "compiling" not in result.stderr, describe(result)
    header = next(p for p in sorted(sources.iterdir()) if p.suffix == ".h")
    header.write_text(header.read_text() + "\n// changed\n")
    good = tmp_path / "good.so"
    good.write_bytes(good_bytes)
    result = run_child(cache, good, log, SOURCES=str(sources))
    assert result.returncode == 0 and "loss ok" in result.stdout, describe(result)
    assert len(builds(log)) == 1 and "sources, flags or torch changed" in result.stderr, describe(result)


def test_verified_library_that_cannot_load_is_rebuilt_or_reported(cache, tmp_path):
    cache, library, good_bytes = cache
    # A complete file under a valid checksum that the loader refuses: rebuilt once.
    garbage = os.urandom(4096)
    library.write_bytes(garbage)
    manifest = json.loads(cpp._manifest(library).read_text())
    manifest.update(size=len(garbage), sha256=cpp._sha256(library))
    cpp._manifest(library).write_text(json.dumps(manifest))
    good = tmp_path / "good.so"
    good.write_bytes(good_bytes)
    log = tmp_path / "builds.log"
    result = run_child(cache, good, log)
    assert result.returncode == 0 and "loss ok" in result.stdout, describe(result)
    assert len(builds(log)) == 1 and "cannot be loaded" in result.stderr, describe(result)
    assert_healthy(library, good_bytes)
    # A fresh build that cannot load either: one line saying so and what to run, no traceback.
    bad = tmp_path / "bad.so"
    bad.write_bytes(garbage)
    result = run_child(cache, bad, log, "--force")
    assert result.returncode == 1, describe(result)
    assert "cannot be loaded" in result.stderr and "--force --verbose" in result.stderr, describe(result)
    assert "Traceback" not in result.stderr, describe(result)


def test_killed_build_leaves_no_library_and_blocks_nobody(tmp_path, good_cache, monkeypatch):
    """One process builds at a time; a killed one leaves nothing under the final name and its lock
    goes with it, so the process waiting behind it builds and installs a whole library."""
    good = library_in(good_cache, monkeypatch)
    cache = tmp_path / "cache"
    library = library_in(cache, monkeypatch)
    log = tmp_path / "builds.log"

    def start(name, **extra):
        out, err = (tmp_path / f"{name}.out").open("w"), (tmp_path / f"{name}.err").open("w")
        return subprocess.Popen([sys.executable, "-c", CHILD, str(good), str(log)],
                                env=child_env(cache, **extra), stdout=out, stderr=err, text=True)

    def wait_for(condition, process, what):
        deadline = time.monotonic() + 300
        while not condition():
            assert process.poll() is None, f"exit {process.returncode} before {what}: " + \
                "".join(p.read_text() for p in sorted(tmp_path.glob("*.err")))
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    first = start("first", HOLD_BUILD="1")
    second = None
    try:
        wait_for(lambda: len(builds(log)) == 1, first, "the first build started")
        second = start("second")
        wait_for(lambda: "waiting for another process" in (tmp_path / "second.err").read_text(),
                 second, "the second process waited")
        assert len(builds(log)) == 1, "two processes built at once"
        assert not library.exists(), "a library appeared under the final name before its build ended"
        first.kill()
        first.wait()
        assert second.wait(timeout=300) == 0, (tmp_path / "second.err").read_text()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert "loss ok" in (tmp_path / "second.out").read_text()
    assert len(builds(log)) == 2
    assert not Path(builds(log)[0]).exists(), "the killed build's directory was not cleaned up"
    assert_healthy(library, good.read_bytes())


def test_verified_library_is_loaded_and_force_rebuilds(cache, tmp_path):
    cache, library, good_bytes = cache
    good = tmp_path / "good.so"
    good.write_bytes(good_bytes)
    log = tmp_path / "builds.log"
    result = run_child(cache, good, log)
    assert result.returncode == 0 and "loss ok" in result.stdout, describe(result)
    assert builds(log) == [] and "compiling" not in result.stderr, describe(result)
    before = library.stat().st_ino
    result = run_child(cache, good, log, "--force")
    assert result.returncode == 0 and "loss ok" in result.stdout, describe(result)
    assert len(builds(log)) == 1 and "--force was given" in result.stderr, describe(result)
    assert library.stat().st_ino != before, "--force did not install a new library"
    manifest = json.loads(cpp._manifest(library).read_text())
    assert manifest["size"] == len(good_bytes) and manifest["sha256"] == cpp._sha256(library)
    assert_healthy(library, good_bytes)


def test_a_failed_cuda_build_fails_the_command_only_where_it_is_needed(monkeypatch, capsys):
    """nvcc beside a broken toolkit: the CPU library stands and the command succeeds on a machine
    without a GPU, unless --require-cuda; with a GPU visible the failure is the command's."""
    import torch

    import apl_kernels.build as build

    def ensure_loaded(variant, verbose=False, force=False):
        if variant == "cuda":
            raise cpp.BackendUnavailable("the cuda extension failed to compile: collect2: error: ld returned 1 exit status")
        return Path("cache/cpu/apl_kernels_cpu.so")

    monkeypatch.setattr(build, "ensure_loaded", ensure_loaded)
    monkeypatch.setattr(build, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build.main([]) == 0
    printed = capsys.readouterr()
    assert "cpu library ready" in printed.out and "ld returned 1" in printed.err
    assert "the CUDA library was not built: its build failed" in printed.out
    assert build.main(["--require-cuda"]) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build.main([]) == 1


def _toolkit(home: Path, runtime: bool) -> Path:
    """A stand-in CUDA toolkit at ``home``: bin/nvcc, and lib64/libcudart.so when ``runtime``."""
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (home / "bin" / "nvcc").chmod(0o755)
    if runtime:
        (home / "lib64").mkdir()
        (home / "lib64" / "libcudart.so.13").write_bytes(b"")
    return home


@pytest.mark.parametrize("case", ["wrapper on PATH", "complete on PATH", "no nvcc", "no runtime anywhere",
                                  "CUDA_HOME set", "CUDA_HOME incomplete", "no toolkit"])
def test_the_cuda_toolkit_is_one_that_can_link(case, tmp_path, monkeypatch):
    """nvcc on the PATH as a wrapper (``/usr/local/bin/nvcc`` calling the real one) makes torch guess
    CUDA_HOME=/usr/local, which has no runtime library: the link failed with ``cannot find
    -lcudart``. The build takes the complete toolkit under the install root instead and says why;
    with none anywhere, the reason names the missing runtime library; CUDA_HOME is used as given."""
    root = tmp_path / "local"
    root.mkdir()
    monkeypatch.setattr(cpp, "INSTALL_ROOT", root)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    complete = _toolkit(root / "cuda-13.0", runtime=True) if case not in ("no runtime anywhere", "no toolkit") else None
    if case in ("wrapper on PATH", "no runtime anywhere"):
        wrapper = _toolkit(root / "wrapper", runtime=False)
        monkeypatch.setenv("PATH", str(wrapper / "bin"))
    elif case == "complete on PATH":
        monkeypatch.setenv("PATH", str(complete / "bin"))
    else:
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    if case == "CUDA_HOME set":
        monkeypatch.setenv("CUDA_HOME", str(complete))
    if case == "CUDA_HOME incomplete":
        monkeypatch.setenv("CUDA_HOME", str(_toolkit(tmp_path / "partial", runtime=False)))

    home, note = cpp.cuda_toolkit()
    if case == "no runtime anywhere":
        assert home is None and "no CUDA runtime library" in note and "set CUDA_HOME" in note, note
    elif case == "CUDA_HOME incomplete":
        assert home is None and "is not a complete CUDA toolkit" in note, note
    elif case == "no toolkit":
        assert home is None and note.startswith("nvcc was not found"), note
    else:
        assert home == complete, (home, note)
        assert (str(root / "wrapper") in note) == (case == "wrapper on PATH"), note
    if home is None:
        monkeypatch.setattr(cpp.torch.version, "cuda", "13.0")
        monkeypatch.delenv("APL_KERNELS_CPU_ONLY", raising=False)
        assert cpp.cuda_unavailable_reason() == note


AUTO_CHILD = r"""
import warnings, torch, apl_kernels as ak
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    logits, target = torch.randn(16, 7), torch.randint(0, 7, (16,))
    loss = ak.NCEMAE(1.0, 1.0)(logits, target)
torch.testing.assert_close(loss, ak.NCEMAE(1.0, 1.0, backend="torch")(logits, target))
print("auto ok:", " | ".join(str(w.message) for w in caught))
"""


def test_a_stopped_build_blocks_nobody_for_long(tmp_path, good_cache, monkeypatch):
    """A build stopped while it holds the lock (SIGSTOP, a suspended job): waiters say whom they wait
    for; once it has made no progress for APL_KERNELS_BUILD_WAIT seconds an explicit build fails in
    one line naming the lock and its holder, and ``auto`` computes with the reference and warns."""
    good = library_in(good_cache, monkeypatch)
    cache = tmp_path / "cache"
    library_in(cache, monkeypatch)
    log = tmp_path / "builds.log"
    with (tmp_path / "first.err").open("w") as err:
        first = subprocess.Popen([sys.executable, "-c", CHILD, str(good), str(log)],
                                 env=child_env(cache, HOLD_BUILD="1"), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while len(builds(log)) < 1:
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.err").read_text()
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)
        start = time.monotonic()
        explicit = run_child(cache, good, log, APL_KERNELS_BUILD_WAIT="2")
        waited = time.monotonic() - start
        assert explicit.returncode == 1, describe(explicit)
        assert f"(pid {first.pid} on " in explicit.stderr, describe(explicit)
        assert f"the build lock {cache}" in explicit.stderr and "made no progress for 2 s" in explicit.stderr
        assert waited < 60, waited
        auto = subprocess.run([sys.executable, "-c", AUTO_CHILD], env=child_env(cache, APL_KERNELS_BUILD_WAIT="2"),
                              capture_output=True, text=True, timeout=300)
        assert auto.returncode == 0 and "auto ok:" in auto.stdout, describe(auto)
        assert "made no progress" in auto.stdout, describe(auto)  # the fallback's warning names why
        assert len(builds(log)) == 1, "a waiter built while the lock was held"
    finally:
        os.kill(first.pid, signal.SIGCONT)
        first.kill()
        first.wait()


@pytest.mark.parametrize("verbose", [False, True])
def test_a_failed_build_names_its_cause(tmp_path, monkeypatch, verbose):
    """A full disk shows first as ``No space left on device`` in the compiler's output, then as the
    linker's ``collect2: error: ld returned 1 exit status``: the error names the first. With
    --verbose the output is on the screen already, so the message does not suggest --verbose."""
    output = ("[1/2] c++ -c apl_cpu.cpp\n/usr/bin/ld: final link failed: No space left on device\n"
              "collect2: error: ld returned 1 exit status\nninja: build stopped: subcommand failed.\n")
    monkeypatch.setattr(cpp.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, stdout=None if verbose else output))
    with pytest.raises(cpp.BackendUnavailable) as raised:
        cpp._build({"name": "apl_kernels_cpu"}, {}, tmp_path, verbose)
    message = str(raised.value)
    if verbose:
        assert "the compiler's output is above" in message and "--verbose" not in message, message
    else:
        assert "No space left on device" in message and "`python -m apl_kernels.build --verbose`" in message, message


@pytest.mark.parametrize("error,fix", [(errno.EROFS, "it is read-only here: set APL_KERNELS_BUILD_DIR"),
                                       (errno.ENOSPC, "its disk is full")])
def test_an_unwritable_cache_is_named_for_what_it_is(monkeypatch, error, fix):
    """A read-only cache is not told to free some space, and a full one is."""
    def refuse(variant):
        raise OSError(error, os.strerror(error), "/cache/apl_kernels")

    monkeypatch.setattr(cpp, "build_directory", refuse)
    with pytest.raises(cpp.BackendUnavailable, match=fix) as raised:
        cpp._compile("cpu")
    assert ("free some space" in str(raised.value)) == (error == errno.ENOSPC)
