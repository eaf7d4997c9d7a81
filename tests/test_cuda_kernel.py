"""The CUDA C++ kernels (csrc/apl_cuda.cu) where no GPU runs them.

* Their rows and blocks, run on the host: csrc/apl_cuda_emulation.cpp executes the code of
  csrc/apl_cuda_rows.h that the kernels execute (the launch plan, each lane's units of a row, the
  shared-memory rows, every reduction in the device's butterfly order, the blocks in a shuffled
  order with the last-block protocol) as the test-only ops ``apl::cuda_emulation`` and
  ``apl::cuda_emulation_backward``, with fused_loss's schemas on CPU tensors. Here they are a
  backend, ``cuda-emulated``, held to the reference by the suite's tolerance rule, with every
  group size, alignment, stride and shared-memory limit forced in turn.
* Their build for sm_80 and sm_90: ptxas reports no spills and no local memory.

What the emulation cannot show (the shuffles and barriers themselves, memory ordering between
blocks, launch configuration, the device's math library): docs/kernels.md, "CUDA C++". On a GPU
machine the shared tests of test_backends.py run the kernels themselves, and
test_emulation_matches_the_device compares the two.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from pathlib import Path

import pytest
import torch

import apl_kernels as ak
from apl_kernels import backends
from apl_kernels.backends import Backend, BackendUnavailable, cpp, fused
from apl_kernels.catalogue import make_spec
from apl_kernels.options import CallOptions
from apl_kernels.reference import reference_loss
from cases import (
    LOSS_CASES, LOSS_IDS, TARGET_MODES, check_parity, make_target, random_logits, random_probabilities, random_target,
    random_weight, sample_inputs, term_magnitudes,
)

BACKEND = "cuda-emulated"
GROUPS = (0, 4, 32, 512)  # 0: the kernels' own choice
SHARED = 112 * 1024  # an H100's limit for two blocks per SM (shared_memory_limit in apl_cuda.cu)
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

_registered = False


def _op(name: str):
    return getattr(torch.ops.apl, name).default


@pytest.fixture(scope="module")
def emulated():
    """The CUDA library loaded (its emulation ops are CPU ops in it), and the ``cuda-emulated``
    backend registered for this module's tests."""
    global _registered
    reason = cpp.cuda_unavailable_reason()
    if reason:
        pytest.skip(f"the CUDA library (which holds the emulation) cannot be built here: {reason}")
    try:
        cpp.ensure_loaded("cuda")
    except BackendUnavailable as err:
        if torch.cuda.is_available():  # where a GPU would run it, a failed build is a failure
            raise
        pytest.skip(f"the CUDA library (which holds the emulation) did not build, and no GPU is visible: {err}")
    if not _registered:
        fused.register("apl::cuda_emulation", "apl::cuda_emulation_backward")
        _registered = True
    backend = Backend(BACKEND, lambda: ("cpu",),
                      lambda: fused.backend_function(_op("cuda_emulation"), fused.GRAD_IN_BACKWARD))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(backends.REGISTRY, BACKEND, backend)
        yield
    _op("cuda_emulation_launch")(0, SHARED, 0)


@contextlib.contextmanager
def launch(group: int = 0, shared: int = SHARED, seed: int = 0):
    """Emulate with ``group`` threads per row (0: the kernels' choice), ``shared`` bytes of shared
    memory per block, and the blocks in the order of ``seed``."""
    _op("cuda_emulation_launch")(group, shared, seed)
    try:
        yield
    finally:
        _op("cuda_emulation_launch")(0, SHARED, 0)


def emulate(z, target, name, reduction="none", upstream=None, weight=None, label_smoothing=0.0,
            ignore_index=-100, mode=fused.GRAD_IN_BACKWARD, params=None, op="cuda_emulation"):
    """The emulated ops (or, with op="fused_loss", the kernels) called directly: (loss, saved,
    gradient for ``upstream`` or None)."""
    args = fused.op_arguments(make_spec(name, **(params or {})),
                              CallOptions(reduction, ignore_index, label_smoothing), mode)
    loss, saved = _op(op)(z, target, weight, *args)
    grad = None
    if upstream is not None:
        grad = _op(op + "_backward")(z, target, weight, saved, upstream, *args)
    return loss, saved, grad


def reference(z, target, name, reduction="none", upstream=None, weight=None, label_smoothing=0.0,
              ignore_index=-100, params=None):
    """The reference in float64 on the same inputs: (loss, gradient for ``upstream``), then the
    size of the terms each is computed from (cases.term_magnitudes)."""
    x = z.detach().double().requires_grad_()
    target = target.double() if target.is_floating_point() else target
    loss = reference_loss(x, target, None if weight is None else weight.double(), make_spec(name, **(params or {})),
                          CallOptions(reduction, ignore_index, label_smoothing))
    loss.backward(upstream.double() if upstream is not None else torch.ones_like(loss))
    terms = term_magnitudes(z, target, name, params or {}, reduction, "sum" if upstream is None else upstream,
                            weight=weight, label_smoothing=label_smoothing, ignore_index=ignore_index)
    return loss.detach(), x.grad, *terms


def assert_close_to_reference(got, want, rtol):
    """Values and gradients within rtol of each row's largest magnitude: of the reference's
    result, or of the terms it is computed from, which is larger where the result cancels
    (rounding is relative to the terms); NaN where NaN."""
    magnitudes = want[2:] if len(want) > 2 else (None, None)
    for g, w, m in zip(got, want[:2], magnitudes):
        rows = w.shape[0] if w.dim() else 1
        g, w = g.double().reshape(rows, -1), w.double().reshape(rows, -1)
        scale = w.abs().nan_to_num(0).amax(dim=1, keepdim=True)
        if m is not None:
            scale = torch.maximum(scale, m.reshape(rows, -1).amax(dim=1, keepdim=True))
        scale = scale.clamp_min(1e-30)
        bad = ~((g - w).abs() <= rtol * scale) & ~(g.isnan() & w.isnan())
        assert not bad.any(), f"{int(bad.any(dim=1).sum())} rows differ; first: {g[bad][:4]} vs {w[bad][:4]}"


# ---------------------------------------------------------------- parity, the suite's rule


def upstream_for(mode: int, n: int, dtype, seed: int):
    """(reduction, upstream) of test_backends' modes: loss.sum() (a stride-0 upstream), a random
    upstream, a plain backward of a mean, a scaled sum."""
    if mode == 1:
        return "none", torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    if mode == 3:
        return "sum", torch.tensor(2.5, dtype=dtype)
    return ("none", "mean")[mode // 2], "sum"


SHAPES = [(1, 2), (9, 3), (33, 10), (17, 100), (6, 1000), (3, 2051)]


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_parity_with_reference(case, emulated, seed):
    """Every loss case in every dtype, rotating shapes, target modes, reductions, group sizes and
    shared memory (none: the sums pass reads the row again from memory)."""
    name, params = case
    index = LOSS_CASES.index(case)
    for j, dtype in enumerate(DTYPES):
        n, k = SHAPES[(index + j) % len(SHAPES)]
        target_mode = TARGET_MODES[(index + 3 * j) % len(TARGET_MODES)]
        if k > 100 and target_mode not in ("index", "weighted"):
            target_mode = "index"  # the independent formulas are O(K^2) per row for dense targets
        z = random_logits(n, k, seed + j, dtype=dtype)
        target, options = make_target(target_mode, n, k, seed + j)
        reduction, upstream = upstream_for((index + j) % 4, n, dtype, seed + j)
        with launch(GROUPS[(index + 2 * j) % len(GROUPS)], SHARED if (index + j) % 3 else 0):
            check_parity(z, target, name, params, BACKEND, "cpu", reduction, upstream, **options)


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_targets_gradient_parity_with_reference(case, emulated, seed):
    """The probability targets' gradient (target_grad) of every loss case, with the value and the
    logits' gradient of the same call, in every dtype, rotating layouts, upstream gradients,
    reductions, class weights, smoothing, group sizes and shared memory (test_target_grad.py's
    check)."""
    from test_target_grad import check_target_parity, combos, upstream_of
    index = LOSS_CASES.index(case)
    for j, (dtype, rows, classes, mode, layout, weighted, eps) in enumerate(combos(index, "cpu", BACKEND, seed)):
        s = seed + 7 * j
        z = random_logits(rows, classes, s, dtype=dtype)
        t = random_probabilities(rows, classes, s, dtype=dtype)
        weight = random_weight(classes, s, dtype=dtype) if weighted else None
        reduction, upstream = upstream_of(mode, (rows // 3, 3) if layout == "spatial" else (rows,), dtype, s)
        with launch(GROUPS[(index + j) % len(GROUPS)], SHARED if (index + j) % 3 else 0):
            check_target_parity(z, t, case[0], case[1], BACKEND, "cpu", reduction, upstream, layout, weight, eps)


@pytest.mark.parametrize("case", LOSS_CASES[::2], ids=LOSS_IDS[::2])
def test_targets_gradient_at_masked_classes(case, emulated, seed):
    """test_target_grad.py's masked classes: a coefficient of 0 where V is infinite adds nothing."""
    from test_target_grad import check_masked_class
    with launch(GROUPS[LOSS_CASES.index(case) % len(GROUPS)]):
        check_masked_class(*case, BACKEND, "cpu", seed)


def test_targets_gradcheck_and_gradient_in_forward(emulated, seed):
    """gradcheck in float64 in both inputs through the emulated kernels, and the pair that
    GRAD_IN_FORWARD returns (an upstream gradient of 1, over the divisor) equal to backward's."""
    g = torch.Generator().manual_seed(seed)
    for j, (name, reduction) in enumerate((("nce+rce", "mean"), ("nfl+nnfl", "none"), ("ngce+mae", "sum"),
                                           ("nce+anorm", "mean"), ("anorm", "none"))):
        z = (torch.randn(4, 6, generator=g, dtype=torch.float64) * 2).requires_grad_()
        t = torch.rand(4, 6, generator=g, dtype=torch.float64).requires_grad_()
        weight = torch.rand(6, generator=g, dtype=torch.float64) + 0.2
        with launch(GROUPS[j % len(GROUPS)]):
            assert torch.autograd.gradcheck(
                lambda z, t: ak.functional.apl_loss(z, t, name, weight=weight, reduction=reduction,
                                                    label_smoothing=0.1, backend=BACKEND),
                (z, t), eps=1e-6, atol=1e-6, rtol=1e-5)
            args = fused.op_arguments(make_spec(name), CallOptions(reduction, -100, 0.1), fused.GRAD_IN_FORWARD, True)
            loss, saved = _op("cuda_emulation")(z.detach(), t.detach(), weight, *args)
            backward_args = fused.op_arguments(make_spec(name), CallOptions(reduction, -100, 0.1),
                                               fused.GRAD_IN_BACKWARD, True)
            loss, stats = _op("cuda_emulation")(z.detach(), t.detach(), weight, *backward_args)
            pair = _op("cuda_emulation_backward")(z.detach(), t.detach(), weight, stats, torch.ones_like(loss),
                                                  *backward_args)
        assert saved.shape == pair.shape == (2, 4, 6)
        torch.testing.assert_close(saved, pair, rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------- how rows are cut and read


LAYOUT_LOSSES = [("ce", {}), ("nce+rce", {}), ("nfl+nnfl", {}), ("ngce+mae", {"q": 0.3}), ("nce+agce", {})]
LAYOUT_K = (2, 3, 4, 5, 7, 8, 9, 31, 33, 64, 65, 127, 129, 513, 1025, 2049)


@pytest.mark.parametrize("group", (4, 32, 512))
def test_every_row_length_alignment_and_stride_in_every_group(group, emulated, seed):
    """Ragged K against every group size (partial last units, lanes without a unit), rows off the
    vector alignment and strided rows (read element by element), rows kept in shared memory or
    read again, index and probability targets, weights and smoothing. In float64 (packs of 2;
    exact math, so that an element read twice, skipped or misplaced shows) for every loss here, and
    in float32 (packs of 4) for nfl+nnfl, whose float32 gradient does not cancel
    (others lose up to ~1e-2 of a confident row's largest element in float32 in every kernel, the
    C++ one included: the parity test above holds them to the suite's rule)."""
    for i, k in enumerate(LAYOUT_K):
        for dtype, (name, params) in ((torch.float64, LAYOUT_LOSSES[(i + group) % len(LAYOUT_LOSSES)]),
                                      (torch.float32, ("nfl+nnfl", {}))):
            n = 5
            offset = i % 4
            base = random_logits(n, 2 * k + 4, seed + i, dtype=dtype, spread=False)
            z = base[:, offset:offset + k] if i % 3 else base[:, offset:offset + 2 * k:2]  # shifted, or strided
            target = random_probabilities(n, k, seed + i) if i % 2 else random_target(n, k, seed + i)
            weight = random_weight(k, seed + i)
            smoothing = 0.1 if i % 4 == 1 else 0.0
            upstream = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(seed + i))
            want = reference(z, target, name, "none", upstream, weight, smoothing, params=params)
            for shared in (SHARED, 0):
                with launch(group, shared, seed + i):
                    got = emulate(z, target, name, "none", upstream, weight, smoothing, params=params)
                assert_close_to_reference((got[0], got[2]), want, 1e-9 if dtype == torch.float64 else 1e-4)


def test_every_layout_gives_the_same_bits(emulated, seed):
    """A lane's elements depend on their index alone, so contiguous, shifted (rows off the vector
    alignment), strided and transposed copies of the logits and of probability targets give the
    same bits, as test_backends asks of every kernel."""
    for k in (10, 11, 100, 2051):
        n = 6
        z = random_logits(n, k, seed, dtype=torch.bfloat16 if k == 100 else torch.float32)
        t = random_probabilities(n, k, seed).float()

        def copies(x):
            views = [torch.zeros(n, 2 * k + 4, dtype=x.dtype)[:, offset:offset + k] for offset in (1, 2, 3)]
            views += [torch.zeros(n, 2 * k, dtype=x.dtype)[:, ::2], torch.zeros(k, n, dtype=x.dtype).t()]
            for view in views:
                view.copy_(x)
            return views

        for target, targets in ((random_target(n, k, seed), None), (t, copies(t))):
            for reduction, upstream in (("none", torch.ones(n)), ("mean", torch.tensor(1.0))):
                want = emulate(z, target, "nfl+rce", reduction, upstream, label_smoothing=0.1)
                for i, view in enumerate(copies(z)):
                    got = emulate(view, target if targets is None else targets[i], "nfl+rce", reduction, upstream,
                                  label_smoothing=0.1)
                    assert all(torch.equal(g, w) for g, w in zip(got, want)), (k, i, reduction)


def test_shared_memory_rows_change_nothing(emulated, seed):
    """A row read again from shared memory or from memory gives the same bits; so do a block's
    coefficients cached or recomputed (probability targets)."""
    z = random_logits(7, 300, seed, dtype=torch.bfloat16)
    for target in (random_target(7, 300, seed), random_probabilities(7, 300, seed).float()):
        results = []
        for shared in (SHARED, 0):
            with launch(32, shared):
                results.append(emulate(z, target, "nfl+rce", "mean", torch.tensor(1.5), random_weight(300, seed), 0.1))
        for a, b in zip(results[0], results[1]):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- blocks and the reduction


@pytest.mark.parametrize("group,rows", [(512, 1100), (4, 3000), (32, 700)])
def test_reduction_is_bitwise_the_same_whichever_block_finishes_last(group, rows, emulated, seed):
    """The last block to finish sums the blocks' partials in a fixed order: the blocks run here in
    five different orders and give the same bits (1100 blocks of one row: more partials than a
    block has threads)."""
    k = 3
    z = random_logits(rows, k, seed, spread=False)
    y = random_target(rows, k, seed)
    y[::7] = -100
    weight = random_weight(k, seed)
    results = []
    for order in range(5):
        with launch(group, SHARED, order):
            results.append(emulate(z, y, "nce+rce", "mean", torch.tensor(1.0), weight))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    want = reference(z, y, "nce+rce", "mean", torch.tensor(1.0), weight)
    assert_close_to_reference((results[0][0], results[0][2]), want, 1e-9)
    assert results[0][1][-1, 0].item() == pytest.approx(weight[y[y != -100]].sum().item(), rel=1e-13)  # the divisor


# ---------------------------------------------------------------- labels, modes, upstream gradients


def test_ignored_and_out_of_range_labels(emulated, seed):
    """Ignored rows give 0 (NaN logits there do not leak), whether ignore_index lies in [0, K) or
    not; a label outside [0, K) gives its row NaN and is never used as an index (1 << 40 would fault
    here); every other row is exact. With class weights and label smoothing too."""
    k = 6
    z = random_logits(8, k, seed, spread=False)
    z[0] = float("nan")
    for ignore_index in (-100, 3):
        y = torch.tensor([ignore_index, 1, k, 5, -1, ignore_index, 1 << 40, 0])
        bad = torch.tensor([2, 4, 6])
        good = torch.tensor([1, 3, 7])
        for smoothing, weight in ((0.0, None), (0.1, random_weight(k, seed))):
            for group in (4, 32, 512):
                with launch(group):
                    loss, _, grad = emulate(z, y, "nce+rce", "none", torch.ones(8, dtype=z.dtype), weight, smoothing,
                                            ignore_index)
                    total, stats, _ = emulate(z, y, "nce+rce", "sum", None, weight, smoothing, ignore_index)
                assert torch.all(loss[[0, 5]] == 0) and torch.all(grad[[0, 5]] == 0)
                assert loss[bad].isnan().all() and grad[bad].isnan().all() and stats[bad].isnan().all()
                want = reference(z[good], y[good], "nce+rce", "none", torch.ones(3, dtype=z.dtype), weight, smoothing,
                                 ignore_index)
                assert_close_to_reference((loss[good], grad[good]), want, 1e-9)
                assert total.isnan()
                assert stats[0, 1] == float("inf") and stats[-1, 0] == 1  # a zero row; sum divides by 1


def test_masked_extreme_and_undefined_rows(emulated, seed):
    """-inf logits (a masked class; a row of them is undefined), maxima of -0 and +0 in different
    lanes (the lanes of a reduction must agree bit for bit), |z| = 1e4, p[y] == 1, and NaN and
    +inf logits (NaN rows, never a clamp's number), in every group size. With dense targets a
    masked class has a coefficient, and the losses whose sums then meet -inf are NaN in the
    reference too: NaN where it is NaN."""
    k = 40
    z = random_logits(8, k, seed, spread=False) - 20
    z[1, :] = -30.0
    z[1, 0], z[1, 37] = -0.0, 0.0  # the max, as -0 and +0 in different lanes
    z[:, 3] = float("-inf")
    z[2, 0], z[3, 1] = 1e4, -1e4
    z[4, :8] = torch.tensor([30.0, -30.0, 0, float("-inf"), 0, 0, 0, 0])
    z[5, 2], z[6, 4], z[7] = float("nan"), float("inf"), float("-inf")
    y = torch.tensor([0, 0, 2, 4, 0, 7, 1, 2])
    undefined = torch.tensor([5, 6, 7])
    defined = torch.tensor([0, 1, 2, 3, 4])
    for name, params in (("nce+rce", {}), ("nfl+nnfl", {}), ("ngce", {}), ("nce+agce", {}), ("gce+nce", {})):
        for group in (4, 32, 512):
            for target, smoothing in ((y, 0.0), (y, 0.1), (random_probabilities(8, k, seed), 0.0)):
                with launch(group, SHARED, seed):
                    loss, _, grad = emulate(z, target, name, "none", torch.ones(8, dtype=z.dtype), None, smoothing,
                                            params=params)
                want = reference(z[defined], target[defined], name, "none", torch.ones(5, dtype=z.dtype), None,
                                 smoothing, params=params)
                assert_close_to_reference((loss[defined], grad[defined]), want, 1e-9)
                if target is y and not smoothing:
                    assert torch.isfinite(loss[defined]).all() and torch.isfinite(grad[defined]).all()
                    assert torch.all(grad[defined][:, 3] == 0)
                assert loss[undefined].isnan().all() and grad[undefined].isnan().all()


def test_gradient_modes(emulated, seed):
    """NO_GRAD: the same loss, nothing saved. GRAD_IN_FORWARD: the backward kernel's gradient for
    an upstream gradient of 1, already divided by the mean's divisor."""
    z = random_logits(40, 12, seed, spread=False)
    for target, weight in ((random_target(40, 12, seed), random_weight(12, seed)), (random_probabilities(40, 12, seed), None)):
        for reduction in ("mean", "sum", "none"):
            one = torch.tensor(1.0, dtype=z.dtype) if reduction != "none" else torch.ones(40, dtype=z.dtype)
            loss, stats, grad = emulate(z, target, "nfl+nnfl", reduction, one, weight, 0.05)
            no_grad = emulate(z, target, "nfl+nnfl", reduction, None, weight, 0.05, mode=fused.NO_GRAD)
            in_forward = emulate(z, target, "nfl+nnfl", reduction, None, weight, 0.05, mode=fused.GRAD_IN_FORWARD)
            assert stats.shape == (41, fused.STATS) and no_grad[1].numel() == 0
            assert torch.equal(no_grad[0], loss) and torch.equal(in_forward[0], loss)
            assert torch.equal(in_forward[1], grad)
            assert_close_to_reference((loss, grad), reference(z, target, "nfl+nnfl", reduction, one, weight, 0.05), 1e-9)


def test_upstream_gradients_of_any_stride_and_dtype(emulated, seed):
    z = random_logits(16, 9, seed, spread=False)
    y = random_target(16, 9, seed)
    g = torch.Generator().manual_seed(seed)
    for upstream in (torch.randn(32, generator=g, dtype=torch.float64)[::2], torch.tensor(0.7).expand(16),
                     torch.randn(16, generator=g).float()):
        got = emulate(z, y, "nce+aul", "none", upstream)
        want = reference(z, y, "nce+aul", "none", upstream.double())
        assert_close_to_reference((got[0], got[2]), want, 1e-9)
    for reduction in ("mean", "sum"):
        got = emulate(z, y, "nce+aul", reduction, torch.tensor(-0.5, dtype=torch.float32))
        want = reference(z, y, "nce+aul", reduction, torch.tensor(-0.5, dtype=torch.float64))
        assert_close_to_reference((got[0], got[2]), want, 1e-7)


def test_empty_batch(emulated):
    for target in (torch.zeros(0, dtype=torch.long), torch.zeros(0, 7)):
        for reduction in ("mean", "sum", "none"):
            upstream = torch.tensor(1.0, dtype=torch.float64) if reduction != "none" else torch.zeros(0)
            loss, stats, grad = emulate(torch.zeros(0, 7, dtype=torch.float64), target, "nce+rce", reduction, upstream)
            assert loss.numel() == (0 if reduction == "none" else 1) and torch.all(loss == 0)
            assert stats.shape == (1, fused.STATS) and grad.shape == (0, 7)


def test_opcheck(emulated):
    for mode in (fused.GRAD_IN_BACKWARD, fused.GRAD_IN_FORWARD):
        for args in sample_inputs("cpu", mode):
            torch.library.opcheck(_op("cuda_emulation"), args)


# ---------------------------------------------------------------- on a GPU: the kernels themselves


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_emulation_matches_the_device(emulated, seed):
    """The same rows through the kernels and through their emulation (same group sizes, so the
    same sums in the same order; only the device's math library and FMA contraction differ)."""
    for i, (n, k) in enumerate(((300, 10), (64, 1000), (5, 20000))):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            z = random_logits(n, k, seed + i, dtype=dtype)
            for target, weight, smoothing in ((random_target(n, k, seed), None, 0.0),
                                              (random_probabilities(n, k, seed).float(), random_weight(k, seed), 0.1)):
                upstream = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
                host = emulate(z, target, "nfl+rce", "none", upstream, weight, smoothing)
                device = emulate(z.cuda(), target.cuda(), "nfl+rce", "none", upstream.cuda(),
                                 None if weight is None else weight.cuda(), smoothing, op="fused_loss")
                want = reference(z, target, "nfl+rce", "none", upstream, weight, smoothing)
                tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
                assert_close_to_reference((device[0].cpu(), device[2].cpu()), (host[0], host[2].double()), tolerance)
                assert_close_to_reference((device[0].cpu(), device[2].cpu()), want, tolerance)


# ---------------------------------------------------------------- the build


def _nvcc() -> Path | None:
    home, _ = cpp.cuda_toolkit()
    return home / "bin" / "nvcc" if home else None


# The kernels' template arguments as mangled: the dtype, then E (forward_kernel<T>) or a bool
# (backward_kernel<T, kTargets>: Lb0E or Lb1E).
KERNEL_DTYPES = {"If": torch.float32, "Id": torch.float64, "IN3c104HalfE": torch.float16,
                 "IN3c108BFloat16E": torch.bfloat16}


def ptxas_report(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(kernel, arch): {registers, stack, spill_stores, spill_loads}} from ``ptxas -v`` output."""
    report = {}
    for entry in re.split(r"(?=ptxas info\s+: Compiling entry function)", text)[1:]:
        name, arch = re.search(r"entry function '(\S+)' for '(sm_\d+)'", entry).groups()
        stack, stores, loads = map(int, re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", entry).groups())
        registers = int(re.search(r"Used (\d+) registers", entry).group(1))
        report[(name, arch)] = {"registers": registers, "stack": stack, "spill_stores": stores, "spill_loads": loads}
    return report


@pytest.mark.skipif(_nvcc() is None, reason=cpp.cuda_toolkit()[1])
def test_kernels_build_for_sm80_and_sm90_without_spills_or_local_memory(tmp_path):
    """The device code, compiled as the library compiles it, for each architecture at once: every
    kernel fits the registers its launch bounds give (64 at two 512-thread blocks per SM; 128 for
    float64 and for the backward with the targets' gradient, one block) with no stack frame (no local arrays) and no spills."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    source = cpp.source_dir() / "apl_cuda.cu"
    includes = [f"-I{p}" for p in [str(cpp.source_dir()), *include_paths("cuda")]]
    runs = {arch: subprocess.Popen(
        [str(_nvcc()), *COMMON_NVCC_FLAGS, *includes, "-O3", "-std=c++20", "-cubin", f"-arch={arch}",
         "-Xptxas", "-v", str(source), "-o", str(tmp_path / f"{arch}.cubin")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for arch in ("sm_80", "sm_90")}
    kernels = {}
    for arch, run in runs.items():
        output = run.communicate(timeout=900)[0]
        assert run.returncode == 0, output[-3000:]
        kernels.update(ptxas_report(output))
    for arch in ("sm_80", "sm_90"):
        found = {(kind, dtype) for (name, a) in kernels if a == arch
                 for kind in ("forward_kernel", "backward_kernel") if kind in name
                 for code, dtype in KERNEL_DTYPES.items() if re.search(f"{kind}{code}(E|Lb)", name)}
        assert len(found) == 8, (arch, sorted(map(str, found)))
    for (name, arch), usage in kernels.items():
        limit = 128 if re.search("kernelId(E|Lb)|Lb1E", name) else 64  # float64; the targets' backward
        assert usage["stack"] == 0 and usage["spill_stores"] == 0 and usage["spill_loads"] == 0, (name, arch, usage)
        assert usage["registers"] <= limit, (name, arch, usage)
