"""The C++ CPU backend against the reference: parity, semantics, op checks, torch.compile."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

import apl_kernels as ak
from apl_kernels.backends import cpp as cpp_backend, fused
from formulas import loss_and_grad
from cases import (
    LOSS_CASES,
    LOSS_IDS,
    assert_close_to_scale,
    assert_parity,
    random_logits,
    random_target,
)

F = ak.functional


@pytest.fixture(scope="module", autouse=True)
def extension():
    # No skip: CI must build the extension, so a build failure fails these tests.
    cpp_backend.ensure_loaded("cpu")


def run(logits, target, name, params, backend, reduction="none", upstream=None, **kw):
    x = logits.detach().clone().requires_grad_()
    loss = F.apl_loss(x, target, name, reduction=reduction, backend=backend, **params, **kw)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), x.grad


# Accuracy relative to the terms a result is computed from, per dtype: half types compute in
# float32 and are otherwise held to the reference computed in that half type (assert_parity).
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
DTYPES = list(RTOL)
SHAPES = [(1, 2), (9, 3), (33, 10), (17, 100), (6, 1000), (3, 4099)]


def check_parity(z, y, name, params):
    """cpp in z's dtype against the reference in that dtype and the float64 truth, per row."""
    fused = run(z, y, name, params, "cpp")
    reference = run(z, y, name, params, "torch")
    truth = run(z.double(), y, name, params, "torch")
    assert fused[0].dtype == z.dtype and fused[1].dtype == z.dtype
    _, _, grad_terms, value_terms = loss_and_grad(z.double().numpy(), y.numpy(), name, **params)
    value_terms = torch.maximum(torch.from_numpy(value_terms), truth[0].abs())
    tiny = torch.finfo(z.dtype).tiny
    assert_parity(fused[0], reference[0], truth[0], value_terms, RTOL[z.dtype], floor=tiny)
    assert_parity(fused[1], reference[1], truth[1], torch.from_numpy(grad_terms), RTOL[z.dtype], floor=tiny)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_parity_with_reference(case, dtype, seed):
    name, params = case
    for i, (n, k) in enumerate(SHAPES):
        z = random_logits(n, k, seed + i, dtype=dtype)
        y = random_target(n, k, seed + i)
        check_parity(z, y, name, params)


@pytest.mark.parametrize("name,params", [("nce+rce", {}), ("nfl+mae", {"official_grad": True}), ("ngce+nce", {}), ("sce", {})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_at_vocabulary_size(name, params, dtype, seed):
    for n in (1, 3):
        z = random_logits(n, 50257, seed + n, dtype=dtype)
        check_parity(z, random_target(n, 50257, seed + n), name, params)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["nce+mae", "nfl+rce", "ngce", "gce+nce", "nrce"])
def test_ignore_index_and_reductions(name, reduction, seed):
    z = random_logits(40, 13, seed, dtype=torch.float64)
    y = random_target(40, 13, seed)
    y[::4] = 255
    z[0] = float("nan")  # ignored: must not leak
    fused = run(z, y, name, {}, "cpp", reduction, ignore_index=255)
    reference = run(z, y, name, {}, "torch", reduction, ignore_index=255)
    for f, r in zip(fused, reference):
        assert_close_to_scale(f, r, 1e-12)
    assert torch.all(fused[1][::4] == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(reduction):
    loss, grad = run(torch.randn(5, 7), torch.full((5,), -100), "nce+rce", {}, "cpp", reduction)
    assert torch.all(loss == 0) and torch.all(grad == 0)


def test_empty_batch():
    for reduction in ("mean", "sum", "none"):
        loss, grad = run(torch.randn(0, 7), torch.zeros(0, dtype=torch.long), "nce+rce", {}, "cpp", reduction)
        assert loss.numel() == (0 if reduction == "none" else 1) and grad.shape == (0, 7)
        assert torch.all(loss == 0)


@pytest.mark.parametrize("name", ["nce+rce", "nfl+mae", "ngce+rce"])
def test_non_contiguous_transposed_and_spatial_inputs(name, seed):
    base = random_logits(11, 20, seed, dtype=torch.float32)  # (K, 2N) storage
    y = random_target(10, 11, seed)
    for z in (base.t()[::2], random_logits(10, 22, seed, dtype=torch.float32)[:, ::2], base.t()[1::2].contiguous()):
        fused = run(z, y, name, {}, "cpp")
        contiguous = run(z.contiguous(), y, name, {}, "cpp")
        assert torch.equal(fused[0], contiguous[0]) and torch.equal(fused[1], contiguous[1])
        check_parity(z, y, name, {})
    # (N, K, d1, d2) against the reference.
    z = random_logits(2 * 3 * 4, 6, seed, dtype=torch.float64).reshape(2, 3, 4, 6).movedim(-1, 1)
    y = random_target(24, 6, seed).reshape(2, 3, 4)
    for reduction in ("none", "mean"):
        fused = run(z, y, name, {}, "cpp", reduction)
        reference = run(z, y, name, {}, "torch", reduction)
        assert fused[0].shape == reference[0].shape and fused[1].shape == z.shape
        for f, r in zip(fused, reference):
            assert_close_to_scale(f, r, 1e-12)


@pytest.mark.parametrize("name", ["nce+rce", "nfl+rce", "ngce+mae"])
def test_random_and_stride_zero_upstream_gradients(name, seed):
    z = random_logits(16, 9, seed, dtype=torch.float64)
    y = random_target(16, 9, seed)
    upstream = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    fused = run(z, y, name, {}, "cpp", upstream=upstream)
    reference = run(z, y, name, {}, "torch", upstream=upstream)
    assert_close_to_scale(fused[1], reference[1], 1e-12)
    # loss(reduction="none").sum() sends an expanded (stride-0) upstream gradient.
    for backend in ("cpp", "torch"):
        x = z.clone().requires_grad_()
        F.apl_loss(x, y, name, reduction="none", backend=backend).sum().backward()
        if backend == "cpp":
            fused_grad = x.grad
    assert_close_to_scale(fused_grad, x.grad, 1e-12)
    # A reduced loss scaled by the caller (upstream gradient != 1).
    x = z.clone().requires_grad_()
    (3.0 * F.apl_loss(x, y, name, backend="cpp")).backward()
    assert_close_to_scale(x.grad, 3.0 * run(z, y, name, {}, "torch", "mean")[1], 1e-12)


def test_backward_twice_and_accumulation_do_not_alias_the_saved_gradient(seed):
    z = random_logits(8, 5, seed, dtype=torch.float64).requires_grad_()
    y = random_target(8, 5, seed)
    loss = F.nce_rce(z, y, backend="cpp")
    loss.backward(retain_graph=True)
    first = z.grad.clone()
    loss.backward()
    assert torch.equal(z.grad, 2 * first)
    z.grad = None
    F.nce_rce(z, y, backend="cpp").backward()
    F.nce_rce(z, y, backend="cpp").backward()
    assert torch.equal(z.grad, 2 * first)


def test_double_backward_is_refused(seed):
    z = random_logits(4, 5, seed, dtype=torch.float64).requires_grad_()
    loss = F.nce_mae(z, random_target(4, 5, seed), backend="cpp")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, z, create_graph=True)


def test_forward_without_grad_matches(seed):
    z = random_logits(12, 30, seed, dtype=torch.float32)
    y = random_target(12, 30, seed)
    with torch.no_grad():
        inference = F.nfl_rce(z, y, backend="cpp")
    assert torch.equal(inference, run(z, y, "nfl+rce", {}, "cpp", "mean")[0])


def test_bitwise_reproducible(seed):
    z = random_logits(300, 517, seed, dtype=torch.float32)
    y = random_target(300, 517, seed)
    first = run(z, y, "nfl+rce", {}, "cpp", "mean")
    second = run(z, y, "nfl+rce", {}, "cpp", "mean")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


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


@pytest.mark.parametrize("name,params", [("nce+rce", {}), ("nfl+mae", {"official_grad": True}), ("ngce", {})])
def test_masked_and_extreme_logits(name, params, seed):
    z = random_logits(6, 8, seed, dtype=torch.float32)
    z[:, 3] = float("-inf")
    z[1, 0], z[2, 1] = 1e4, -1e4
    z[4] = torch.tensor([30.0, -30.0, 0, float("-inf"), 0, 0, 0, 0])
    y = torch.tensor([0, 0, 2, 4, 0, 7])
    fused = run(z, y, name, params, "cpp")
    reference = run(z, y, name, params, "torch")
    for f, r in zip(fused, reference):
        assert torch.equal(torch.isfinite(f), torch.isfinite(r))
        assert torch.isfinite(f).all()
        assert_close_to_scale(f, r, 1e-5)


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_undefined_rows_give_nan_like_the_reference(case):
    """A NaN or +inf logit, or a row of -inf, has no softmax: NaN, never a clamp's number."""
    name, params = case
    z = torch.randn(5, 6)
    z[1, 2] = float("nan")
    z[2, 4] = float("inf")
    z[3] = float("-inf")
    y = torch.tensor([0, 1, 2, 3, 4])
    for backend in ("cpp", "torch"):
        loss, grad = run(z, y, name, params, backend)
        assert torch.isnan(loss[1:4]).all() and torch.isnan(grad[1:4]).all(), backend
        assert torch.isfinite(loss[[0, 4]]).all() and torch.isfinite(grad[[0, 4]]).all(), backend


def test_out_of_range_target_raises_before_reading(seed):
    z = random_logits(4, 10, seed, dtype=torch.float32)
    for bad in (10, -1, 1 << 40):
        y = torch.tensor([0, bad, 2, 3])
        with pytest.raises(ValueError, match=rf"target {bad} at flat position 1 is outside \[0, 10\)"):
            F.nce_rce(z, y, backend="cpp")
        # The op checks them itself: the same error for direct callers.
        with pytest.raises(ValueError, match=rf"target {bad} at flat position 1 is outside \[0, 10\)"):
            torch.ops.apl.fused_loss(z, y, [5, 4], [1.0, 1.0, 0.5, 0.7], [-100, 1, 0, 1])


def test_op_rejects_bad_arguments():
    z, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    op = torch.ops.apl.fused_loss
    ce, coefficients, options = [0], [1.0, 0.5, 0.7], [-100, 1, 0, 1]  # weight, gamma, q; ignore, mean, flags
    op(z, y, ce, coefficients, options)
    cases = [
        ((z[0], y, ce, coefficients, options), "2-D"),
        ((z, y.int(), ce, coefficients, options), "int64"),
        ((z.int(), y, ce, coefficients, options), "float16, bfloat16, float32 or float64"),
        ((z, y, [42], coefficients, options), "unknown base loss index 42"),
        ((z, y, [0, 1, 2], [1.0, 1.0, 1.0, 0.5, 0.7], options), "1 or 2 terms"),
        ((z, y, ce, [1.0, 0.5], options), "one weight per term, then gamma and q"),
        ((z, y, [2], [1.0, 0.5, 0.0], options), "q must be finite and > 0"),
        ((z, y, [2], [1.0, 0.5, float("inf")], options), "q must be finite and > 0"),
        ((z, y, [2], [1.0, 0.5, 1e-300], options), "in float32 for Float logits"),
        ((z, y, ce, [1.0, -0.5, 0.7], options), "gamma must be finite and >= 0"),
        ((z, y, ce, [1.0, float("nan"), 0.7], options), "gamma must be finite and >= 0"),
        ((z, y, ce, [float("inf"), 0.5, 0.7], options), "weights must be finite"),
        ((z, y, ce, coefficients, [-100, 7, 0, 1]), "reduction code"),
        ((z, y, ce, coefficients, [-100, 1, 0]), "options must be"),
        ((z, y, ce, coefficients, [-100, 1, 2, 1]), "must be 0 or 1"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args)


def sample_inputs():
    """Arguments for opcheck: dtypes, reductions, strides, both gradient modes and ignore_index."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        nfl_rce = ak.NFLRCE(1.0, 0.5, official_grad=dtype == torch.float32).spec
        for reduction in ("none", "mean", "sum"):
            z = torch.randn(6, 11, generator=g).to(dtype)
            y = torch.randint(0, 11, (6,), generator=g)
            y[2] = -100
            yield (z.requires_grad_(), y, *fused.op_arguments(nfl_rce, reduction, -100, True))
    z = torch.randn(11, 12, generator=g).t()[:, :9]
    ngce = ak.NGCE(2.0, q=0.1).spec
    yield (z.requires_grad_(), torch.randint(0, 9, (12,), generator=g), *fused.op_arguments(ngce, "mean", -100, True))
    nce_mae = ak.NCEMAE().spec
    yield (torch.randn(5, 4, generator=g), torch.randint(0, 4, (5,), generator=g),
           *fused.op_arguments(nce_mae, "mean", -100, False))


@pytest.mark.parametrize("args", list(sample_inputs()))
def test_opcheck(args):
    torch.library.opcheck(torch.ops.apl.fused_loss.default, args)


def test_torch_compile_fullgraph_matches_eager(seed):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    criterion = ak.NFLRCE(1.0, 1.0, official_grad=True, backend="cpp")
    x = torch.randn(64, 12, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)

    def step(inputs, labels):
        return criterion(model(inputs), labels)

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        model.zero_grad()
        loss = fn(x, y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-7)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-6)


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
    differ (and every width has its own partial vectors), so the narrower builds are compiled
    and held to the reference too, in a subprocess that lowers torch's capability."""
    env = {
        **os.environ,
        "ATEN_CPU_CAPABILITY": capability,
        "APL_TEST_SEED": str(seed),  # this test's seed: a failure reproduces with the parent's
        # Inductor's cache does not key its generated C++ by vector width: keep it apart.
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    tests = "test_parity_with_reference or test_masked_and_extreme_logits or test_undefined_rows"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-p", "no:cacheprovider", "-k", tests],
        env=env, cwd=os.path.dirname(__file__), capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"vector width): {capability.upper()}" in result.stdout, result.stdout[:2000]
