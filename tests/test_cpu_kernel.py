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


# ---------------------------------------------------------------- apl::fused_loss_ (the gradient over the logits)


def _inplace_op():
    ak.backends.resolve("cpp", "cpu")  # loads the library: the ops exist from then on
    return torch.ops.apl.fused_loss_.default


def _both_forms(z, target, weight, bases, coefficients, options):
    """fused_loss's (loss, grad), and fused_loss_'s loss and what it left in a copy of the logits."""
    inplace_op = _inplace_op()
    loss, grad = torch.ops.apl.fused_loss.default(z, target, weight, bases, coefficients, options)
    overwritten = z.detach().clone()
    return (loss, grad), (inplace_op(overwritten, target, weight, bases, coefficients, options), overwritten)


@pytest.mark.parametrize("mode", ["index", "smoothed", "weighted", "probabilities"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradient_over_the_logits_is_the_gradient(mode, dtype, reduction, seed):
    """fused_loss_ (the fused linear + loss's form) writes over its logits exactly the gradient that
    fused_loss returns, and returns the same loss: each row is read before its gradient is written."""
    from apl_kernels.backends import contract
    from apl_kernels.catalogue import make_spec
    from apl_kernels.options import CallOptions
    from cases import loss_cases, make_target

    n, k = 37, 1 + seed % 300 + 2  # odd K: partial vectors; rows of one block and of many
    target, options = make_target(mode, n, k, seed)
    target[seed % n] = -100 if mode != "probabilities" else target[seed % n]
    weight = options.get("weight")
    z = random_logits(n, k, seed, dtype=torch.float64).to(dtype)
    for name, params in loss_cases()[seed % 7::7]:
        arguments = contract.op_arguments(make_spec(name, **params),
                                          CallOptions(reduction, label_smoothing=options.get("label_smoothing", 0.0)),
                                          contract.GRAD_IN_FORWARD)
        (loss, grad), (inplace_loss, overwritten) = _both_forms(z, target.to(dtype) if target.is_floating_point()
                                                                else target, weight, *arguments)
        torch.testing.assert_close(inplace_loss, loss, rtol=0, atol=0, equal_nan=True, msg=name)
        torch.testing.assert_close(overwritten, grad, rtol=0, atol=0, equal_nan=True, msg=name)


def test_gradient_over_the_logits_opcheck():
    from apl_kernels.backends import contract
    from cases import sample_inputs

    for z, *rest in sample_inputs("cpu", contract.GRAD_IN_FORWARD):
        options = rest[-1]
        if options[contract.GRAD_MODE] == contract.GRAD_IN_FORWARD and not options[contract.TARGET_GRAD]:
            torch.library.opcheck(_inplace_op(), (z.detach().contiguous(), *rest))


def test_gradient_over_the_logits_refuses_what_it_cannot_overwrite():
    from apl_kernels.backends import contract
    from apl_kernels.catalogue import make_spec
    from apl_kernels.options import CallOptions

    spec = make_spec("nce+mae")
    z, y = torch.randn(4, 6), torch.randint(0, 6, (4,))
    with pytest.raises(ValueError, match=r"must be contiguous; got strides .* logits.contiguous"):
        _inplace_op()(torch.randn(6, 4).t(), y, None, *contract.op_arguments(spec, CallOptions(),
                                                                               contract.GRAD_IN_FORWARD))
    for mode in (contract.NO_GRAD, contract.GRAD_IN_BACKWARD):
        with pytest.raises(ValueError, match=r"gradient mode \(options\[3\]\) must be 1"):
            _inplace_op()(z, y, None, *contract.op_arguments(spec, CallOptions(), mode))
    with pytest.raises(ValueError, match=r"the target must not share their memory; pass a copy"):
        _inplace_op()(z, z, None, *contract.op_arguments(spec, CallOptions(), contract.GRAD_IN_FORWARD))
    probabilities = torch.softmax(torch.randn(4, 6), 1)
    with pytest.raises(ValueError, match=r"the logits' gradient alone .* call fused_loss"):
        _inplace_op()(z, probabilities, None, *contract.op_arguments(spec, CallOptions(), contract.GRAD_IN_FORWARD,
                                                                       target_grad=True))
