"""The build cache heals itself (apl_kernels.backends.cpp): a damaged, unverified or stale library
is rebuilt, never loaded; a build is installed whole, one at a time, even when its process is
killed; ``python -m apl_kernels.build --force`` rebuilds.

Every case runs in a child process with its own APL_KERNELS_BUILD_DIR: loading a damaged library
can kill its process (Bus error), and the suite's own cache stays untouched. The module compiles
once, for real (the good cache below); the cases copy that cache, damage the copy, and replace the
compiler with a copy of the good library, which tests every decision around the compiler.
"""

from __future__ import annotations

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
