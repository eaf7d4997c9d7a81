"""What only the C++ CPU kernel has: builds for every vector width, and the memory it keeps."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

import apl_kernels as ak
from cases import random_logits, random_target

F = ak.functional


def test_saves_only_the_gradient_for_backward(seed):
    n, k = 64, 1000
    z = random_logits(n, k, seed, dtype=torch.float32).requires_grad_()
    y = random_target(n, k, seed)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.nce_rce(z, y, backend="cpp")
    assert sum(saved) <= n * k * 4 + 64 * n, saved
    loss.backward()


def lower_vector_widths() -> list[str]:
    """ATEN_CPU_CAPABILITY values below the one torch uses here (x86-64: AVX-512 > AVX2 > default)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    order = ["default", "avx2", "avx512"]
    native = torch.backends.cpu.get_cpu_capability().lower()
    return order[: order.index(native)] if native in order else []


@pytest.mark.parametrize("capability", lower_vector_widths())
def test_parity_at_lower_vector_widths(capability, tmp_path, seed):
    """The kernel is compiled for the vector width torch uses on the CPU at hand; users' CPUs
    differ (and every width has its own partial vectors), so the narrower builds are compiled and
    held to the reference too, in a subprocess that lowers torch's capability."""
    env = {
        **{k: v for k, v in os.environ.items() if k != "APL_TEST_SWEEP"},  # this seed, not a sweep of its own
        "ATEN_CPU_CAPABILITY": capability,
        "APL_TEST_SEED": str(seed),  # this test's seed: a failure reproduces with the parent's
        # Inductor's cache does not key its generated C++ by vector width: keep it apart.
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    tests = "cpp and (test_parity_with_reference or test_masked_and_extreme_logits or test_undefined_rows)"
    backends_tests = os.path.join(os.path.dirname(__file__), "test_backends.py")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", backends_tests, "-p", "no:cacheprovider", "-k", tests],
        env=env, cwd=os.path.dirname(__file__), capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"vector width): {capability.upper()}" in result.stdout, result.stdout[:2000]
